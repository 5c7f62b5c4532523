"""``qat simulate``: a grid of post-training schemes over a float model, one top-1 each."""
import json
import os

import pytest

from qat.app import simulate
from qat.cli import main
from qat.errors import UserError
from tests.helpers import tiny_recipe


@pytest.fixture(scope='module')
def run_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('simulate')
    recipe = tiny_recipe(tmp, 'sim', qat={'epochs': 0, 'input_quant_epoch': 0, 'freeze_bn_epoch': 0,
                                          'freeze_ranges_epoch': 0})
    assert main(['train', recipe]) == 0
    return str(tmp / 'checkpoints' / 'sim'), recipe


def test_the_recipes_own_schemes_repeat_the_ptq_stage(run_folder, tmp_path):
    folder, _ = run_folder
    ptq = json.load(open(os.path.join(folder, 'state.json')))['results']['ptq']
    table, plot = str(tmp_path / 'grid.md'), str(tmp_path / 'grid.png')
    assert main(['simulate', folder, '--bits', '8,4', '--output', table, '--png', plot]) == 0
    rows = simulate.simulate(folder, {'bits': ['8', '4']}, show_progress=False,
                             out=lambda line: None)
    assert [row['top1'] for row in rows[1:]] == [ptq['W8A8'], ptq['W4A4']]
    float_top1 = json.load(open(os.path.join(folder, 'state.json')))['results']['float']
    assert rows[0]['scheme'] == 'float' and rows[0]['top1'] == float_top1
    text = open(table).read()
    assert f"| bits=8 | 8 | 8 | channel | yes | fold | 8 | mse | {ptq['W8A8']:.2f} |" in text
    assert open(plot, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_every_axis_changes_what_it_names(run_folder):
    folder, _ = run_folder
    grid = {'weight_bits': ['3'], 'input_bits': ['5'], 'granularity': ['tensor'],
            'input_signed': ['no'], 'bn': ['keep'], 'first_layer': ['float'],
            'method': ['max']}
    (row,) = simulate.simulate(folder, grid, show_progress=False, out=lambda line: None)[1:]
    assert (row['weight_bits'], row['input_bits'], row['granularity'], row['input_signed'],
            row['bn'], row['first_layer'], row['method']) == (3, 5, 'tensor', 'no', 'keep',
                                                               'float', 'max')
    assert 0 <= row['top1'] <= 100



def test_signed_after_relu_is_the_schemes_rule(run_folder, tmp_path):
    """``--input-signed after-relu`` simulates what ``quantize.unsigned_after_relu`` deploys:
    the same top-1 as a recipe with the rule set."""
    import yaml
    from qat.app.recipe import load
    folder, _ = run_folder
    rows = simulate.simulate(folder, {'bits': ['3'], 'input_signed': ['yes', 'after-relu']},
                             show_progress=False, out=lambda line: None)[1:]
    assert [row['input_signed'] for row in rows] == ['yes', 'after ReLU']
    recipe = load(os.path.join(folder, 'recipe.yaml'), check_files=False,
                  overrides=['quantize.unsigned_after_relu=true'])
    path = tmp_path / 'rule.yaml'
    path.write_text(yaml.safe_dump(recipe))
    with_rule = simulate.simulate(str(path), {'bits': ['3']},
                                  params=os.path.join(folder, 'float.params'),
                                  show_progress=False, out=lambda line: None)[1]
    assert with_rule['input_signed'] == 'after ReLU'
    assert with_rule['top1'] == rows[1]['top1']
    assert rows[1]['top1'] != rows[0]['top1']  # the rule changed the 3-bit net

def test_a_recipe_file_takes_the_float_weights_from_params(run_folder):
    folder, recipe = run_folder
    rows = simulate.simulate(recipe, {'bits': ['8']}, params=os.path.join(folder, 'float.params'),
                             show_progress=False, out=lambda line: None)
    again = simulate.simulate(folder, {'bits': ['8']}, show_progress=False,
                              out=lambda line: None)
    assert [r['top1'] for r in rows] == [r['top1'] for r in again]


@pytest.mark.parametrize('argv, message', [
    (['--bits', '9'], "--bits: 9 not valid"),
    (['--method', 'kl,median'], "--method: median not valid"),
    (['--granularity', ''], "--granularity: nothing not valid"),
    (['--bits', '8', '--weight-bits', '4'], "--bits sets weight and input bits together"),
])
def test_bad_grid_values_are_one_line_errors(run_folder, capsys, argv, message):
    folder, _ = run_folder
    assert main(['simulate', folder] + argv) == 2
    assert message in capsys.readouterr().err


def test_missing_sources_name_the_file(run_folder, tmp_path):
    _, recipe = run_folder
    with pytest.raises(UserError, match='no such run folder or recipe file'):
        simulate.simulate(str(tmp_path / 'nothing'), {})
    with pytest.raises(UserError, match='no float weights: pass --params'):
        simulate.simulate(recipe, {})
    with pytest.raises(UserError, match='float parameters not found'):
        simulate.simulate(recipe, {}, params=str(tmp_path / 'none.params'))


def test_a_detection_run_is_simulated_with_its_map(tmp_path):
    """A detection run: each scheme's VOC07 mAP; the recipe's own schemes repeat the PTQ
    stage's figures exactly."""
    from tests.test_detection_train import quiet, tiny_detection_recipe
    from qat.app import stages
    results = stages.run_recipe(tiny_detection_recipe(
        tmp_path, 'det', calibrate={'report_bits': [4]},
        qat={'epochs': 0, 'freeze_bn_epoch': None, 'freeze_ranges_epoch': None}), out=quiet)
    rows = simulate.simulate(results['folder'], {'bits': ['8', '4']}, show_progress=False,
                             out=lambda line: None)
    assert rows[0]['top1'] == results['float'] and rows[0]['metric'] == 'mAP'
    assert [row['top1'] for row in rows[1:]] == [results['ptq']['W8A8'],
                                                 results['ptq']['W4A4']]
    assert 'mAP (%)' in simulate.format_rows(rows)
