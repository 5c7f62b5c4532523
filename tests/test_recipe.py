"""Recipes: schema, loading, typed overrides and strict validation (no training here)."""
import glob
import os

import pytest

from qat import CALIBRATION_METHODS
from qat.app import recipe
from qat.app.recipe import RecipeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, 'recipes', '*.yaml')))


def write(tmp_path, text, name='r.yaml'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(path, overrides=(), check_files=True):
    with pytest.raises(RecipeError) as info:
        recipe.load(path, overrides, check_files=check_files)
    return str(info.value)


def test_recipes_folder_has_the_promised_files():
    names = {os.path.basename(p) for p in RECIPES}
    assert {'digits.yaml', 'cifar10_resnet20_w8a8.yaml', 'cifar10_resnet20_w4a4.yaml',
            'imagefolder_mobilenet_w8a8.yaml'} <= names


@pytest.mark.parametrize('path', RECIPES, ids=os.path.basename)
def test_every_recipe_validates_without_its_data(path):
    loaded = recipe.load(path, check_files=False)
    assert set(loaded) == set(recipe.SCHEMA)
    for section, keys in recipe.SCHEMA.items():
        assert set(loaded[section]) == set(keys)
    assert loaded['run']['name']


def test_digits_recipe_needs_no_files():
    loaded = recipe.load(os.path.join(ROOT, 'recipes', 'digits.yaml'))
    assert loaded['data']['source'] == 'digits'
    assert loaded['calibrate']['report_bits'] == [4]


def test_imagefolder_recipe_reports_its_missing_data_root(tmp_path):
    path = os.path.join(ROOT, 'recipes', 'imagefolder_mobilenet_w8a8.yaml')
    message = error_of(path)
    assert path in message and 'data.train' in message and 'not found' in message
    (tmp_path / 'train').mkdir()
    (tmp_path / 'val').mkdir()
    assert recipe.load(path, [f'data.root={tmp_path}'])['data']['root'] == str(tmp_path)


def test_defaults_are_complete_and_valid():
    loaded = recipe.load(None)
    assert loaded['run']['name'] == 'default'
    assert loaded['quantize']['weight_bits'] == 8
    assert loaded['model']['name'] == 'cifar_resnet20_v1'


# ----- bad recipes: each error names the file (or --set) and the key ------------------------
@pytest.mark.parametrize('text, key, words', [
    ('qat:\n  epoch: 3\n', 'qat.epoch', "unknown key (did you mean 'epochs'?)"),
    ('trainer:\n  epochs: 3\n', 'trainer', 'unknown key'),
    ('qat:\n  epochs: ten\n', 'qat.epochs', 'must be an integer'),
    ('qat:\n  epochs: 2.5\n', 'qat.epochs', 'must be an integer'),
    ('quantize:\n  input_signed: 1\n', 'quantize.input_signed', 'must be true or false'),
    ('quantize:\n  weight_bits: 9\n', 'quantize.weight_bits', 'must be in 2..8'),
    ('quantize:\n  first_layer_bits: 1\n', 'quantize.first_layer_bits', 'must be in 2..8'),
    ('qat:\n  epochs: -1\n', 'qat.epochs', 'must be >= 0'),
    ('quantize:\n  range_momentum: 1.0\n', 'quantize.range_momentum', 'in [0, 1)'),
    ('qat:\n  momentum: 1.5\n', 'qat.momentum', 'in [0, 1)'),
    ('qat:\n  epochs: 3\n  freeze_bn_epoch: 5\n', 'qat.freeze_bn_epoch',
     'beyond qat.epochs = 3'),
    ('qat:\n  epochs: 3\n  freeze_ranges_epoch: 4\n', 'qat.freeze_ranges_epoch',
     'beyond qat.epochs = 3'),
    ('calibrate:\n  method: magic\n', 'calibrate.method',
     'one of ' + ', '.join(sorted(CALIBRATION_METHODS))),
    ('qat:\n  optimizer: adamax\n', 'qat.optimizer', 'one of adam, nag, sgd'),
    ('preprocess:\n  mean: [1, 2]\n', 'preprocess.mean', 'one value per channel'),
    ('preprocess:\n  std: [1, 1, 1]\n  norm: [1, 1, 1]\n', 'preprocess.norm',
     'not both'),
    ('preprocess:\n  std: [1, 0, 1]\n', 'preprocess.std', 'must be > 0'),
    ('run:\n  devices: [tpu(0)]\n', 'run.devices', 'not cpu(N) or gpu(N)'),
    ('model:\n  name: resnet_does_not_exist\n', 'model.name', 'not a GluonCV model'),
    ('model:\n  checkpoint: /nonexistent/float.params\n', 'model.checkpoint',
     'file not found'),
    ('data:\n  source: folder\n  root: /nonexistent/imagenet\n', 'data.train',
     'folder not found: /nonexistent/imagenet/train'),
    ('data:\n  source: folder\n', 'data.root', 'needs data.root'),
    ('data:\n  source: recordio\n  root: /nonexistent\n', 'data.val',
     'file not found: /nonexistent/val.idx'),
    ('data:\n  source: cifar10\n  root: /nonexistent\n', 'data.root',
     'data_batch_1.bin'),
    ('model:\n  source: factory\n  name: no_such_module_xyz:build\n', 'model.name',
     "module 'no_such_module_xyz' not found"),
    ('export:\n  winograd: sometimes\n', 'export.winograd', 'one of bound'),
    ('export:\n  winograd: off\n', 'export.winograd', 'quote it'),
    ('verify:\n  thresholds: {min_accuracy: 0.9}\n', 'verify.thresholds',
     'min_top1_agreement'),
])
def test_bad_recipe_names_file_and_key(tmp_path, text, key, words):
    path = write(tmp_path, text)
    message = error_of(path)
    assert f"{path}: {key}: " in message, message
    assert words in message, message


def test_all_problems_are_reported_at_once(tmp_path):
    path = write(tmp_path, 'qat:\n  epochs: -1\n  lr: fast\nquantize:\n  weight_bits: 9\n')
    message = error_of(path)
    for key in ('qat.epochs', 'qat.lr', 'quantize.weight_bits'):
        assert f"{path}: {key}: " in message


def test_file_problems_can_be_skipped(tmp_path):
    path = write(tmp_path, 'data:\n  source: folder\n  root: /nonexistent\n')
    assert recipe.load(path, check_files=False)['data']['root'] == '/nonexistent'


def test_not_a_mapping_missing_file_and_bad_yaml(tmp_path):
    assert 'a recipe is a mapping' in error_of(write(tmp_path, '- 1\n- 2\n'))
    assert 'recipe file not found' in error_of(str(tmp_path / 'missing.yaml'))
    assert 'not valid YAML' in error_of(write(tmp_path, 'qat: [1, 2\n'))
    assert 'qat: a section is a mapping' in error_of(write(tmp_path, 'qat: 3\n'))


# ----- overrides -----------------------------------------------------------------------------
def test_overrides_are_typed_by_the_schema(tmp_path):
    path = write(tmp_path, 'qat:\n  epochs: 2\n')
    loaded = recipe.load(path, ['qat.lr=1e-3', 'qat.epochs=5', 'quantize.input_signed=false',
                                'quantize.exclude=*dense*,*conv0', 'run.name=007',
                                'preprocess.size=[32, 24]', 'model.kwargs.classes=7',
                                'qat.freeze_bn_epoch=null', 'qat.freeze_ranges_epoch=4'])
    assert loaded['qat']['lr'] == 0.001 and isinstance(loaded['qat']['lr'], float)
    assert loaded['qat']['epochs'] == 5
    assert loaded['quantize']['input_signed'] is False
    assert loaded['quantize']['exclude'] == ['*dense*', '*conv0']
    assert loaded['run']['name'] == '007'  # a str key keeps the text as written
    assert loaded['preprocess']['size'] == [32, 24]
    assert loaded['model']['kwargs'] == {'classes': 7}
    assert loaded['qat']['freeze_bn_epoch'] is None
    assert loaded['qat']['freeze_ranges_epoch'] == 4


def test_yaml_exponent_floats_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as a string; the schema makes it a float.
    loaded = recipe.load(write(tmp_path, 'qat:\n  wd: 1e-4\n'))
    assert loaded['qat']['wd'] == 1e-4


@pytest.mark.parametrize('override, words', [
    ('qat.epochs=abc', "--set: qat.epochs: must be an integer, got 'abc'"),
    ('qat.epoch=3', "--set: qat.epoch: unknown key (did you mean 'epochs'?)"),
    ('nosection.x=1', '--set: nosection: unknown key'),
    ('quantize.input_bits=1', '--set: quantize.input_bits: must be in 2..8'),
    ('qat.lr=-0.1', '--set: qat.lr: must be > 0'),
    ('qat.epochs.x=1', '--set: qat.epochs: is not a mapping'),
])
def test_bad_overrides_name_the_key(override, words):
    assert words in error_of(None, [override])


def test_override_without_equals_sign():
    with pytest.raises(RecipeError, match='expected key=value'):
        recipe.load(None, ['qat.epochs'])


def test_override_wins_over_file_and_is_checked_with_it(tmp_path):
    path = write(tmp_path, 'qat:\n  epochs: 4\n  freeze_bn_epoch: 3\n')
    assert recipe.load(path, ['qat.epochs=3'])['qat']['epochs'] == 3
    message = error_of(path, ['qat.epochs=2'])
    assert f"{path}: qat.freeze_bn_epoch: 3 is beyond qat.epochs = 2" in message


def test_norm_is_one_over_std(tmp_path):
    loaded = recipe.load(write(tmp_path, 'preprocess:\n  norm: [0.5, 0.25, 0.125]\n'))
    assert loaded['preprocess']['std'] == [2.0, 4.0, 8.0]


def test_resolved_recipe_round_trips_through_yaml(tmp_path):
    loaded = recipe.load(None, ['qat.epochs=4'])
    recipe.dump(loaded, str(tmp_path / 'recipe.yaml'))
    again = recipe.load(str(tmp_path / 'recipe.yaml'))
    assert again == loaded


def test_schema_markdown_lists_every_key():
    text = recipe.schema_markdown()
    for section, keys in recipe.SCHEMA.items():
        assert f"**`{section}`**" in text
        for name in keys:
            assert f"| `{name}` |" in text
    # registries appear with their valid keys
    assert 'one of: ' + ', '.join(f'`{m}`' for m in sorted(CALIBRATION_METHODS)) in text
    assert '| `weight_bits` | int | `8` |' in text
    assert '| `size` | ints | `[16, 16]` |' in text


def test_readme_documents_every_recipe_key_as_the_schema_says():
    """The README's key tables are the schema's own markdown: docs cannot drift."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    assert recipe.schema_markdown() in readme


def test_renamed_keys_of_earlier_recipes_still_load(tmp_path, caplog):
    """``quantize.granularity`` / ``signed`` are now the QuantConfig field names; a recipe (or
    a saved run folder) with the old names loads with a warning naming the new ones."""
    path = write(tmp_path, 'quantize:\n  granularity: tensor\n  signed: false\n')
    with caplog.at_level('WARNING'):
        loaded = recipe.load(path, ['quantize.granularity=channel'])
    assert loaded['quantize']['weight_granularity'] == 'channel'   # --set wins
    assert loaded['quantize']['input_signed'] is False
    assert 'granularity' not in loaded['quantize'] and 'signed' not in loaded['quantize']
    assert 'now called quantize.weight_granularity' in caplog.text
    assert 'now called quantize.input_signed' in caplog.text


def test_per_layer_overrides_reach_the_config_of_each_layer(tmp_path):
    """``quantize.layers`` maps patterns to QuantConfig fields (or null: float), on top of
    the section's own fields, with the first-layer rule: one QuantScheme for every path."""
    from qat.config import QuantScheme
    path = write(tmp_path, "quantize:\n  weight_bits: 4\n  input_bits: 4\n"
                           "  layers:\n    '*dense*': {weight_bits: 8}\n    '*conv3': null\n")
    scheme = QuantScheme.from_dict(recipe.load(path)['quantize'])
    assert scheme.default.weight_bits == 4 and scheme.first_layer_bits == 8
    assert scheme.by_name['*dense*'].weight_bits == 8
    assert scheme.by_name['*dense*'].input_bits == 4
    assert scheme.by_name['*conv3'] is None
    bad = write(tmp_path, "quantize:\n  layers:\n    '*dense*': {weight_bits: 12}\n")
    with pytest.raises(RecipeError, match=r"quantize.layers.\*dense\*: .*weight_bits must be"):
        recipe.load(bad)
