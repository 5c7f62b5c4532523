"""The ``qat`` command: train, export and verify a tiny run end to end; errors exit 2."""
import json
import os

from qat.cli import main
from tests.helpers import tiny_recipe


def test_train_then_export_and_verify_a_run_folder(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, 'cli', export={'enabled': True})
    assert main(['train', recipe]) == 0
    run = str(tmp_path / 'checkpoints' / 'cli')
    out = str(tmp_path / 'again')
    assert main(['export', run, '--out', out, '--winograd', 'bound']) == 0
    assert sorted(os.listdir(out)) == sorted(
        ['model' + suffix for suffix in ('.prototxt', '.caffemodel', '.table', '.param', '.bin',
                                         '-int8.param', '-int8.bin', '.json')])
    # The same trained net exported twice gives the same int8 model, byte for byte.
    with open(os.path.join(run, 'export', 'model-int8.bin'), 'rb') as a, \
            open(os.path.join(out, 'model-int8.bin'), 'rb') as b:
        assert a.read() == b.read()
    assert main(['verify', run, '--folder', out, '--no-packing']) == 0
    report = json.load(open(os.path.join(out, 'verify.json')))
    assert report['passed'] and report['int8']['max_abs_error'] == 0.0
    assert 'PASSED' in capsys.readouterr().out


def test_verify_fails_with_exit_1_below_a_threshold(tmp_path):
    recipe = tiny_recipe(tmp_path, 'strict')
    assert main(['train', recipe]) == 0
    run = str(tmp_path / 'checkpoints' / 'strict')
    assert main(['export', run]) == 0
    # An impossible threshold (fp32 error below zero) must fail the command.
    with open(os.path.join(run, 'recipe.yaml')) as handle:
        text = handle.read()
    with open(os.path.join(run, 'recipe.yaml'), 'w') as handle:
        handle.write(text.replace('thresholds: {}',
                                  'thresholds: {max_fp32_relative_error: -1.0}'))
    assert main(['verify', run]) == 1


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(['export', str(tmp_path / 'nothing')]) == 2
    assert 'not a run folder' in capsys.readouterr().err
    bad = tmp_path / 'bad.yaml'
    bad.write_text('qat:\n  epochs: -1\n')
    assert main(['train', str(bad)]) == 2
    assert 'qat.epochs' in capsys.readouterr().err
