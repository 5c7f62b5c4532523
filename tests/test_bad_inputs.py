"""Bad inputs (issue "Reliability"): every bad input is a one-line error that names it, and
nothing is lost or half-written.

CLI cases (``qat train / export / verify / calibrate / demo`` through ``qat.cli.main``) check
the exit status (2), that stderr is one line ``qat <command>: <message>`` (``qat calibrate:
error: <message>`` for ``qat calibrate``, argparse's usage + ``error:`` line for option
types; a recipe error may list several problems, one per line, each ``<file or --set>:
<key>: <problem>``), that the message names the culprit (a specific substring), that no
traceback was printed, and that the watched folders hold nothing new or changed (a snapshot
of the tree, file contents included, before and after). API cases check the exception type
(a ``qat.errors.UserError`` subclass where it is about user input) and the message.

Expensive things are made once per module: a tiny trained and exported run, and a run stopped
inside QAT; each case that changes a run works on its own copy.
"""
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import traceback
from pathlib import Path

import cv2
import mxnet as mx
import numpy as np
import pytest
import yaml

import qat
from qat.app import data as app_data
from qat.app import models as app_models
from qat.app import recipe as app_recipe
from qat.app import stages, trainer
from qat.cli import main
from qat.deploy import ExportError
from qat.errors import (BusyError, DataError, ExistsError, MissingFileError, NonFiniteError,
                        UserError)
from tests.helpers import random_batches, random_image, small_net, tiny_recipe

FACTORY = 'tests.helpers:tiny_net'
FAST_QAT = {'epochs': 1, 'input_quant_epoch': 0, 'freeze_bn_epoch': 1, 'freeze_ranges_epoch': 1}


def quiet(*args):
    pass


class Any:
    """A culprit given by any one of several substrings (wordings differ: 'damaged',
    'truncated', ...)."""

    def __init__(self, *options):
        self.options = options

    def __repr__(self):
        return ' or '.join(map(repr, self.options))


_BASETEMP = []


@pytest.fixture(autouse=True)
def _basetemp(tmp_path_factory):
    _BASETEMP[:] = [str(tmp_path_factory.getbasetemp())]


def _found(culprit, text):
    """``culprit`` is in ``text``; a culprit that is not a path must be in the message itself,
    not in the name of a test's temporary folder (derived from the test's name)."""
    if isinstance(culprit, Any):
        return any(_found(option, text) for option in culprit.options)
    culprit = str(culprit)
    if not culprit.startswith(os.sep):
        for base in _BASETEMP:
            text = re.sub(re.escape(base) + r'/[^/\s]+', '<tmp>', text)
    return culprit in text


# ----- snapshots of folders ------------------------------------------------------------------
def tree(*roots):
    """{path: 'dir' | (size, md5)} of everything under ``roots`` (a missing root: nothing; a
    file root: that file)."""
    found = {}
    for root in map(Path, roots):
        if root.is_file():
            found[str(root)] = (root.stat().st_size, hashlib.md5(root.read_bytes()).hexdigest())
            continue
        if not root.is_dir():
            continue
        for path in sorted(root.rglob('*')):
            if path.is_dir():
                found[str(path)] = 'dir'
            elif path.is_file():
                found[str(path)] = (path.stat().st_size,
                                    hashlib.md5(path.read_bytes()).hexdigest())
    return found


def tree_changes(before, after):
    """Lines describing what appeared, disappeared or changed between two snapshots."""
    changes = [f"new: {p}" for p in sorted(set(after) - set(before))]
    changes += [f"removed: {p}" for p in sorted(set(before) - set(after))]
    changes += [f"changed: {p}" for p in sorted(set(before) & set(after))
                if before[p] != after[p]]
    return changes


def leftovers(folder):
    """Half-written or stale files in ``folder``: temporary files, staging folders, a lock."""
    return [str(p) for p in Path(folder).rglob('*')
            if p.name.startswith(('.tmp-', '.export-', '.probe-')) or p.name == '.lock']


# ----- running the command -------------------------------------------------------------------
def run_qat(argv, capsys):
    """(status, stdout, stderr) of ``qat argv``. An exception escaping ``main`` is what a
    user sees as a traceback: status 'uncaught <type>', the traceback appended to stderr."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    except Exception as err:  # noqa: BLE001 - reported by the assertions
        status = f"uncaught {type(err).__name__}"
        captured = capsys.readouterr()
        return status, captured.out, captured.err + traceback.format_exc()
    captured = capsys.readouterr()
    return status, captured.out, captured.err


PROBLEM_LINE = re.compile(r"^\s*(--set|\S+): [a-z_]+(\.[\w*?\[\]-]+)*: \S")


def error_problems(status, out, err, command, culprits, style='line', max_len=None):
    """What is wrong with the command's reaction to a bad input (empty: all as wanted).

    style: 'line' (one line ``qat <command>: ...``; ``qat calibrate: error: ...`` for
    calibrate), 'recipe' (a first line, then one line per problem naming file and key), or
    'argparse' (usage lines, then ``qat <command>: error: ...``)."""
    problems = []
    if status != 2:
        problems.append(f"exit status {status!r}, expected 2")
    if 'Traceback' in err or 'Traceback' in out:
        problems.append("a traceback was printed")
    lines = [line for line in err.strip().splitlines() if line.strip()] \
        if 'Traceback' not in err else err.strip().splitlines()
    prefix = f"qat {command}: error: " if style == 'argparse' or command == 'calibrate' \
        else f"qat {command}: "
    message = err
    if not lines:
        problems.append("nothing on stderr")
    elif style == 'argparse':
        if not lines[-1].startswith(prefix):
            problems.append(f"last stderr line {lines[-1]!r} does not start with {prefix!r}")
        message = lines[-1][len(prefix):]
    else:
        if not lines[0].startswith(prefix):
            problems.append(f"stderr {lines[0]!r} does not start with {prefix!r}")
        if style == 'line' and len(lines) != 1:
            problems.append(f"stderr has {len(lines)} lines, expected 1")
        if style == 'recipe':
            bad = [line for line in lines[1:] if not PROBLEM_LINE.match(line)]
            if bad:
                problems.append(f"recipe problem lines not '<file>: <key>: <problem>': {bad}")
        message = '\n'.join([lines[0][len(prefix):]] + lines[1:]) \
            if lines[0].startswith(prefix) else err
    for culprit in culprits:
        if not _found(culprit, message):
            problems.append(f"the message does not name {culprit!r}")
    if max_len is not None and len(err) >= max_len:
        problems.append(f"stderr is {len(err)} characters long (limit {max_len})")
    return problems


def check_cli(argv, capsys, command, culprits, watch=(), style='line', max_len=None,
              allow_new=()):
    """Run ``qat argv`` and assert the wanted reaction; ``watch``: folders that must hold
    nothing new or changed (``allow_new``: paths that may appear). Returns stderr."""
    before = tree(*watch)
    status, out, err = run_qat(argv, capsys)
    problems = error_problems(status, out, err, command, culprits, style, max_len)
    changes = [c for c in tree_changes(before, tree(*watch))
               if not any(c.split(': ', 1)[1].startswith(str(a)) for a in allow_new)]
    if changes:
        problems.append(f"files changed: {changes[:8]}")
    assert not problems, ("\n".join(problems) + f"\n--- status: {status!r}\n--- stderr:\n"
                          f"{err[-3000:]}\n--- stdout (tail):\n{out[-600:]}")
    return err


def expect_error(call, kind, *culprits):
    """Call ``call()``; assert it raises ``kind`` whose message names every culprit."""
    try:
        result = call()
    except Exception as err:  # noqa: BLE001 - checked below
        problems = []
        if not isinstance(err, kind):
            problems.append(f"raised {type(err).__module__}.{type(err).__name__}, expected "
                            f"{kind.__module__}.{kind.__name__}")
        for culprit in culprits:
            if not _found(culprit, str(err)):
                problems.append(f"the message does not name {culprit!r}")
        if 'Traceback' in str(err):  # the message is what `qat` prints as its one line
            problems.append("the message holds a traceback header ('Traceback ...')")
        assert not problems, "\n".join(problems) + f"\n--- message: {err}"
        return err
    pytest.fail(f"no error: returned {result!r:.200}; expected {kind.__name__}")


# ----- data made here ------------------------------------------------------------------------
def write_png(path, seed=0, size=(10, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), random_image(size[0], size[1], seed))
    return path


def write_garbage(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(range(256)) * 3)
    return path


def class_folders(root, layout):
    """root/<split>/<class>/<i>.png for ``layout`` {split: {class: number of images}}."""
    for split, classes in layout.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                write_png(root / split / name / f'{i}.png', seed=hash((split, name, i)) % 997)
    return root


def list_files(root, train_labels, val_labels=(0, 1, 2, 3)):
    """root/img<i>.png with root/train.txt and root/val.txt of ``path label`` lines."""
    root.mkdir(parents=True, exist_ok=True)
    lines = {}
    for split, labels in (('train', train_labels), ('val', val_labels)):
        rows = []
        for i, label in enumerate(labels):
            name = f'{split}{i}.png'
            write_png(root / name, seed=i)
            rows.append(f'{name} {label}')
        lines[split] = rows
        (root / f'{split}.txt').write_text('\n'.join(rows) + '\n')
    return root


def folder_data(root):
    return {'source': 'folder', 'root': str(root), 'workers': 0}


def list_data(root):
    return {'source': 'list', 'root': str(root), 'train': 'train.txt', 'val': 'val.txt',
            'workers': 0}


def factory_module(tmp_path, monkeypatch, module, body):
    """A module ``module`` in tmp_path/factories on sys.path (no bytecode written)."""
    folder = tmp_path / 'factories'
    folder.mkdir(exist_ok=True)
    (folder / f'{module}.py').write_text(body)
    monkeypatch.setattr(sys, 'dont_write_bytecode', True)
    monkeypatch.syspath_prepend(str(folder))
    return folder


# ----- module fixtures: a trained run, a stopped run ------------------------------------------
@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    """A finished tiny run with its export (verify off): <out>/mod."""
    tmp = tmp_path_factory.mktemp('trained')
    path = tiny_recipe(tmp, 'mod', float={'epochs': 1}, qat=FAST_QAT,
                       calibrate={'batches': 2, 'report_bits': []},
                       export={'enabled': True}, verify={'enabled': False})
    stages.run_recipe(path, out=quiet)
    return tmp / 'checkpoints' / 'mod'


@pytest.fixture(scope='module')
def stopped_run(tmp_path_factory):
    """A run stopped (StopRun) in the first step of its QAT stage: float and ptq are done."""
    tmp = tmp_path_factory.mktemp('stopped')
    path = tiny_recipe(tmp, 'stopped', float={'epochs': 0}, qat=FAST_QAT,
                       calibrate={'batches': 2, 'report_bits': []})

    def stop_in_qat(stage, epoch, step, net):
        if stage == 'qat':
            raise trainer.StopRun('killed in qat')
    with pytest.raises(trainer.StopRun):
        stages.run_recipe(path, callbacks=[stop_in_qat], out=quiet)
    return tmp / 'checkpoints' / 'stopped'


def copy_run(run, tmp_path):
    """A copy of ``run`` in tmp_path/ck/<name> whose saved recipe names its new place, and
    that recipe as tmp_path/<name>.yaml. Returns (run folder, recipe file)."""
    dest = tmp_path / 'ck' / run.name
    shutil.copytree(run, dest)
    saved = yaml.safe_load((dest / 'recipe.yaml').read_text())
    saved['run']['out'] = str(tmp_path / 'ck')
    app_recipe.dump(saved, str(dest / 'recipe.yaml'))
    recipe_file = tmp_path / f'{run.name}.yaml'
    app_recipe.dump(saved, str(recipe_file))
    return dest, recipe_file


# =============================================================================================
# qat train: problems found up front (before a run folder exists)
# =============================================================================================
NAN, INF = float('nan'), float('inf')

# id -> (recipe sections, or a function tmp_path -> sections; extra argv; culprits; style;
#        max stderr length)
RECIPE_CASES = {
    'unknown-key': ({'run': {'bogus': 1}}, [], ['run.bogus'], 'recipe', None),
    'unknown-section': ({'bogus': {'x': 1}}, [], ['bogus: unknown key'], 'recipe', None),
    'misspelled-key-suggests': ({'float': {'epoch': 2}}, [], ['float.epoch', "'epochs'"],
                                'recipe', None),
    'wrong-type-int': ({'float': {'epochs': 'two'}}, [], ['float.epochs', "'two'"], 'recipe',
                       None),
    'wrong-type-list': ({'preprocess': {'size': 8}}, [], ['preprocess.size'], 'recipe', None),
    'wrong-type-bool': ({'export': {'enabled': 'yes'}}, [], ['export.enabled'], 'recipe', None),
    'yaml-off-read-as-false': ({'export': {'winograd': False}}, [], ['export.winograd'],
                               'recipe', None),
    'nan-in-preprocess-mean': ({'preprocess': {'mean': [NAN, 127.5, 127.5]}}, [],
                               ['preprocess.mean'], 'recipe', None),
    'inf-lr': ({'float': {'lr': INF}}, [], ['float.lr'], 'recipe', None),
    'negative-lr': ({'qat': {'lr': -0.1}}, [], ['qat.lr'], 'recipe', None),
    'run-name-dotdot': ({'run': {'name': '../x'}}, [], ['run.name', "'../x'"], 'recipe', None),
    'run-name-slash': ({'run': {'name': 'a/b'}}, [], ['run.name', "'a/b'"], 'recipe', None),
    'export-name-slash': ({'export': {'name': 'a/b'}}, [], ['export.name', "'a/b'"], 'recipe',
                          None),
    'schedule-epoch-beyond-epochs': ({'qat': {'freeze_bn_epoch': 9}}, [],
                                     ['qat.freeze_bn_epoch'], 'recipe', None),
    'weight-bits-9': ({'quantize': {'weight_bits': 9}}, [], ['quantize.weight_bits'], 'recipe',
                      None),
    'layer-override-bits-12': ({'quantize': {'layers': {'*conv*': {'weight_bits': 12}}}}, [],
                               ['quantize.layers', 'weight_bits'], 'recipe', None),
    'unknown-calibration-method': ({'calibrate': {'method': 'bogus'}}, [],
                                   ['calibrate.method', "'bogus'"], 'recipe', None),
    'unknown-verify-threshold': ({'verify': {'thresholds': {'bogus': 1}}}, [],
                                 ['verify.thresholds'], 'recipe', None),
    'export-input-shape-2d': ({'export': {'input_shape': [3, 8]}}, [], ['export.input_shape'],
                              'recipe', None),
    'mean-wrong-length': ({'preprocess': {'mean': [1.0, 2.0]}}, [], ['preprocess.mean'],
                          'recipe', None),
    'factory-malformed': ({'model': {'name': 'no_colon_here'}}, [], ['model.name'], 'recipe',
                          None),
    'factory-module-missing': ({'model': {'name': 'no_such_module_xyz:net'}}, [],
                               ['model.name', 'no_such_module_xyz'], 'recipe', None),
    'gluoncv-unknown-name': ({'model': {'source': 'gluoncv', 'name': 'resnet18_v9',
                                        'kwargs': {'classes': 10}}}, [],
                             ['model.name', 'resnet18_v1'], 'recipe', 400),
    'model-checkpoint-missing': (lambda tmp: {'model': {'checkpoint': str(tmp / 'no.params')}},
                                 [], ['model.checkpoint', 'no.params'], 'recipe', None),
    'data-root-missing': (lambda tmp: {'data': folder_data(tmp / 'nowhere')}, [],
                          ['data.train', 'nowhere'], 'recipe', None),
    'list-source-without-root': ({'data': {'source': 'list'}}, [], ['data.root'], 'recipe',
                                 None),
    'several-problems-at-once': ({'run': {'bogus': 1}, 'float': {'epochs': 'x'},
                                  'qat': {'lr': -1.0}}, [],
                                 ['run.bogus', 'float.epochs', 'qat.lr'], 'recipe', None),
    'device-gpu-on-cpu-mxnet': ({'run': {'devices': ['gpu(0)']}}, [],
                                ['run.devices', 'gpu(0)'], 'line', None),
    'device-malformed': ({'run': {'devices': ['tpu0']}}, [], ['run.devices', "'tpu0'"],
                         'recipe', None),
    'exclude-matches-nothing': ({'quantize': {'exclude': ['nomatch*']}}, [],
                                ['quantize.exclude', "'nomatch*'"], 'line', None),
    # bad constructor kwargs are found when the model is built, before any run folder
    'gluoncv-kwargs-bogus': ({'model': {'source': 'gluoncv', 'name': 'cifar_resnet20_v1',
                                        'kwargs': {'classes': 10, 'bogus': 1}}}, [],
                             ['bogus'], 'line', None),
    'factory-kwargs-bogus': ({'model': {'kwargs': {'bogus': 1}}}, [], ['bogus'], 'line', None),
    'set-without-equals': ({}, ['--set', 'qat.epochs'], ['--set', 'qat.epochs'], 'recipe',
                           None),
    'set-negative-epochs': ({}, ['--set', 'qat.epochs=-1'], ['qat.epochs', '-1'], 'recipe',
                            None),
    'set-unknown-key': ({}, ['--set', 'qat.bogus=1'], ['qat.bogus'], 'recipe', None),
    'set-wrong-type': ({}, ['--set', 'float.epochs=two'], ['float.epochs'], 'recipe', None),
    'set-into-non-mapping': ({}, ['--set', 'qat.epochs.x=1'], ['qat.epochs'], 'recipe', None),
}


@pytest.mark.parametrize('case', list(RECIPE_CASES))
def test_train_rejects_a_bad_recipe_before_any_work(case, tmp_path, capsys):
    sections, extra, culprits, style, max_len = RECIPE_CASES[case]
    sections = sections(tmp_path) if callable(sections) else sections
    recipe = tiny_recipe(tmp_path, 'run', **sections)
    # the whole tmp folder: a run.name like ../x would land outside <run.out>
    check_cli(['train', recipe] + extra, capsys, 'train', culprits, watch=[tmp_path],
              style=style, max_len=max_len)


def _recipe_missing(tmp_path):
    return tmp_path / 'absent.yaml', ['absent.yaml']


def _recipe_not_yaml(tmp_path):
    path = tmp_path / 'broken.yaml'
    path.write_text('run: {name: [unclosed\nqat:\n\t- : :\n')
    return path, ['broken.yaml', 'YAML']


def _recipe_not_a_mapping(tmp_path):
    path = tmp_path / 'list.yaml'
    path.write_text('- run\n- qat\n')
    return path, ['list.yaml', 'mapping']


@pytest.mark.parametrize('make', [_recipe_missing, _recipe_not_yaml, _recipe_not_a_mapping],
                         ids=['recipe-file-missing', 'recipe-not-yaml', 'recipe-not-a-mapping'])
def test_train_rejects_a_bad_recipe_file(make, tmp_path, capsys):
    path, culprits = make(tmp_path)
    check_cli(['train', path], capsys, 'train', culprits, watch=[tmp_path], style='recipe')


def test_train_rejects_a_factory_returning_none(tmp_path, monkeypatch, capsys):
    factory_module(tmp_path, monkeypatch, 'badfactory_none',
                   'def none_net(**kwargs):\n    return None\n')
    recipe = tiny_recipe(tmp_path, 'run', model={'name': 'badfactory_none:none_net'})
    check_cli(['train', recipe], capsys, 'train', ['badfactory_none:none_net', 'None'],
              watch=[tmp_path])


# ----- data: data.source folder / list, tiny factory model, 8x8 ------------------------------
def _empty_folder(root):
    (root / 'train').mkdir(parents=True)
    (root / 'val').mkdir(parents=True)
    return folder_data(root), ['data.train', str(root / 'train')]


def _no_class_subfolders(root):
    for split in ('train', 'val'):
        for i in range(3):
            write_png(root / split / f'{i}.png', seed=i)
    return folder_data(root), ['data.train', 'subfolder']


def _class_without_images(root):
    class_folders(root, {'train': {'a': 2, 'b': 0}, 'val': {'a': 1, 'b': 1}})
    return folder_data(root), ['data.train', "'b'"]


def _unreadable_first_image(root):
    class_folders(root, {'train': {'a': 2, 'b': 2}, 'val': {'a': 1, 'b': 1}})
    bad = write_garbage(root / 'train' / 'a' / '0.png')  # the first image of the split
    return folder_data(root), [str(bad)]


def _unreadable_val_image(root):
    class_folders(root, {'train': {'a': 2, 'b': 2}, 'val': {'a': 1, 'b': 1}})
    bad = write_garbage(root / 'val' / 'a' / '0.png')
    return folder_data(root), [str(bad)]


def _val_class_not_in_train(root):
    class_folders(root, {'train': {'a': 2, 'b': 2}, 'val': {'a': 1, 'c': 1}})
    return folder_data(root), ['data.val', "'c'"]


def _val_without_images(root):
    class_folders(root, {'train': {'a': 2, 'b': 2}, 'val': {'a': 0, 'b': 0}})
    return folder_data(root), ['data.val']


def _label_15(root):
    list_files(root, [0, 1, 15, 2])
    return list_data(root), ['data.train', '15', '10']


def _label_minus_1(root):
    list_files(root, [0, -1, 1, 2])
    return list_data(root), ['data.train', '-1']


def _val_label_12(root):
    list_files(root, [0, 1, 2, 3], val_labels=[0, 12])
    return list_data(root), ['data.val', '12']


def _list_missing_image(root):
    list_files(root, [0, 1])
    with open(root / 'train.txt', 'a') as handle:
        handle.write('gone.png 3\n')
    return list_data(root), ['data.train', 'train.txt:3', 'gone.png']


def _list_malformed_line(root):
    list_files(root, [0, 1])
    (root / 'train.txt').write_text('train0.png zero\n')
    return list_data(root), ['data.train', 'train.txt:1']


def _list_empty(root):
    list_files(root, [0, 1])
    (root / 'train.txt').write_text('# nothing here\n')
    return list_data(root), ['data.train', 'train.txt']


def _list_unreadable_image(root):
    list_files(root, [0, 1])
    write_garbage(root / 'train0.png')
    return list_data(root), [str(root / 'train0.png')]


DATA_CASES = {
    'folder-empty': _empty_folder,
    'folder-without-class-subfolders': _no_class_subfolders,
    'folder-class-without-images': _class_without_images,
    'folder-unreadable-first-image': _unreadable_first_image,
    'folder-unreadable-val-image': _unreadable_val_image,
    'folder-val-class-not-in-train': _val_class_not_in_train,
    'folder-val-without-images': _val_without_images,
    'list-label-15-for-10-classes': _label_15,
    'list-label-minus-1': _label_minus_1,
    'list-val-label-12': _val_label_12,
    'list-missing-image': _list_missing_image,
    'list-malformed-line': _list_malformed_line,
    'list-empty': _list_empty,
    'list-unreadable-image': _list_unreadable_image,
}


@pytest.mark.parametrize('case', list(DATA_CASES))
def test_train_rejects_bad_data_before_any_work(case, tmp_path, capsys):
    section, culprits = DATA_CASES[case](tmp_path / 'data')
    recipe = tiny_recipe(tmp_path, 'run', data=section, preprocess={'size': [8, 8]},
                         model={'name': FACTORY, 'kwargs': {'classes': 10}})
    check_cli(['train', recipe], capsys, 'train', culprits, watch=[tmp_path])


# ----- run.out -------------------------------------------------------------------------------
def test_train_rejects_run_out_that_is_a_file(tmp_path, capsys):
    out = tmp_path / 'afile'
    out.write_text('not a folder\n')
    recipe = tiny_recipe(tmp_path, 'run', run={'out': str(out)})
    check_cli(['train', recipe], capsys, 'train', ['run.out', str(out)], watch=[tmp_path])


@pytest.mark.skipif(os.geteuid() == 0, reason='root ignores permissions')
def test_train_rejects_a_read_only_run_out(tmp_path, capsys):
    out = tmp_path / 'readonly'
    out.mkdir()
    out.chmod(0o555)
    try:
        recipe = tiny_recipe(tmp_path, 'run', run={'out': str(out)})
        check_cli(['train', recipe], capsys, 'train', ['run.out', str(out)], watch=[tmp_path])
    finally:
        out.chmod(0o755)


# ----- a run folder that exists --------------------------------------------------------------
def _second_train(run, recipe):
    return [recipe], [str(run), '--resume']


def _resume_edited_recipe(run, recipe):
    edited = yaml.safe_load(recipe.read_text())
    edited['qat']['lr'] = 0.5
    path = recipe.parent / 'edited.yaml'
    app_recipe.dump(edited, str(path))
    return [path, '--resume'], ['qat.lr']


def _resume_with_changed_set(run, recipe):
    return [recipe, '--resume', '--set', 'qat.epochs=1', '--set', 'float.epochs=3'], \
        ['float.epochs']


def _resume_corrupt_state(run, recipe):
    (run / 'state.json').write_text('{"done": ["float", "ptq"], "epo')
    return [recipe, '--resume'], [str(run / 'state.json')]


def _resume_future_format(run, recipe):
    state = json.loads((run / 'state.json').read_text())
    (run / 'state.json').write_text(json.dumps(dict(state, format_version=99)))
    return [recipe, '--resume'], [str(run / 'state.json'), '99']


def _resume_damaged_saved_recipe(run, recipe):
    (run / 'recipe.yaml').write_text('run: {name: [unclosed\n\t: :\n')
    return [recipe, '--resume'], [str(run / 'recipe.yaml')]


def _busy(run, recipe):
    # a live process (our parent) on this host holds the lock
    (run / '.lock').write_text(f"{socket.gethostname()} {os.getppid()}\n")
    return [recipe, '--resume'], [str(run), Any('lock', 'another run', 'busy')]


RUN_CASES = {
    'second-train-without-resume': _second_train,
    'resume-with-edited-recipe': _resume_edited_recipe,
    'resume-with-changed-set': _resume_with_changed_set,
    'resume-corrupt-state-json': _resume_corrupt_state,
    'resume-future-state-format': _resume_future_format,
    'resume-damaged-saved-recipe': _resume_damaged_saved_recipe,
    'run-folder-locked-by-live-process': _busy,
}


@pytest.mark.parametrize('case', list(RUN_CASES))
def test_train_on_an_existing_run_changes_nothing(case, trained_run, tmp_path, capsys):
    run, recipe = copy_run(trained_run, tmp_path)
    args, culprits = RUN_CASES[case](run, recipe)
    check_cli(['train'] + args, capsys, 'train', culprits, watch=[tmp_path])


@pytest.mark.parametrize('case, kind', [
    ('second-train-without-resume', ExistsError),
    ('run-folder-locked-by-live-process', BusyError),
], ids=['second-run-exists-error', 'locked-run-busy-error'])
def test_run_recipe_on_an_existing_run_raises(case, kind, trained_run, tmp_path):
    run, recipe = copy_run(trained_run, tmp_path)
    args, culprits = RUN_CASES[case](run, recipe)
    before = tree(tmp_path)
    expect_error(lambda: stages.run_recipe(str(args[0]), resume='--resume' in args, out=quiet),
                 kind, *culprits)
    assert tree_changes(before, tree(tmp_path)) == []


def test_ctrl_c_exits_130_and_releases_the_run(tmp_path, monkeypatch, capsys):
    # Not a bad input, the command's other promise: Ctrl-C is status 130 with a hint, and
    # the run folder (it exists: training had started) is left resumable.
    def interrupt(stage, epoch, step, net):
        if (stage, step) == ('float', 3):
            raise KeyboardInterrupt

    def run_recipe(path, overrides=(), resume=False):
        return stages.run_recipe(path, overrides, resume=resume, callbacks=[interrupt],
                                 out=quiet)
    monkeypatch.setattr('qat.cli.run_recipe', run_recipe)
    recipe = tiny_recipe(tmp_path, 'ctrlc', run={'checkpoint_steps': 2})
    run = tmp_path / 'checkpoints' / 'ctrlc'
    status, out, err = run_qat(['train', recipe], capsys)
    assert status == 130 and '--resume' in err and 'Traceback' not in err, (status, err)
    assert len(err.strip().splitlines()) == 1, err
    assert not leftovers(run), leftovers(run)
    json.loads((run / 'state.json').read_text())


# ----- problems only detectable while training: a run folder legitimately exists -------------
@pytest.mark.parametrize('stage, checkpoint_steps', [
    ('float', 7), ('qat', 7), ('float', 2), ('qat', 2),
], ids=['float-lr-1e12', 'qat-lr-1e12', 'float-lr-1e12-checkpoint-every-2-steps',
        'qat-lr-1e12-checkpoint-every-2-steps'])
def test_a_diverging_loss_stops_with_the_last_good_checkpoint(stage, checkpoint_steps,
                                                              tmp_path, capsys):
    # Detected at the step where training diverges: the run folder exists (recipe.yaml,
    # state.json, the stages done so far, the last checkpoint); nothing may be half-written.
    # checkpoint_steps=2 puts a mid-epoch checkpoint before the divergence.
    recipe = tiny_recipe(tmp_path, 'lr', float={'epochs': 1}, qat=FAST_QAT,
                         run={'checkpoint_steps': checkpoint_steps},
                         calibrate={'batches': 2, 'report_bits': []})
    run = tmp_path / 'checkpoints' / 'lr'
    status, out, err = run_qat(['train', recipe, '--set', f'{stage}.lr=1e12'], capsys)
    problems = error_problems(status, out, err, 'train',
                              ['loss', f'{stage} epoch 1', 'step', str(run)])
    assert not problems, "\n".join(problems) + f"\n--- stderr:\n{err[-3000:]}"
    assert not leftovers(run), leftovers(run)
    state = json.loads((run / 'state.json').read_text())  # still valid JSON
    assert state['done'] == ([] if stage == 'float' else ['float', 'ptq'])
    for name in state['files'].values():  # the last good checkpoint is there, and finite
        assert (run / name).is_file(), name
        if name.endswith('.params'):
            assert all(np.isfinite(v.asnumpy()).all() for v in mx.nd.load(str(run / name))
                       .values()), f"{name} holds non-finite values"
    with pytest.raises(NonFiniteError):  # the same through the API
        stages.run_recipe(recipe, [f'{stage}.lr=1e12', 'run.name=api'], out=quiet)


def test_an_unreadable_image_found_while_training(tmp_path, capsys):
    # Only the first image of each split is decoded up front; a bad one later is found in
    # the first epoch, so the run folder exists (recipe.yaml, state.json): one line naming
    # the file, no half-written files, the lock released.
    root = class_folders(tmp_path / 'data', {'train': {'a': 3, 'b': 3},
                                             'val': {'a': 1, 'b': 1}})
    bad = write_garbage(root / 'train' / 'b' / '2.png')
    recipe = tiny_recipe(tmp_path, 'late', data=folder_data(root), preprocess={'size': [8, 8]},
                         run={'batch_size': 2})
    run = tmp_path / 'checkpoints' / 'late'
    status, out, err = run_qat(['train', recipe], capsys)
    problems = error_problems(status, out, err, 'train', [str(bad)])
    assert not problems, "\n".join(problems) + f"\n--- stderr:\n{err[-3000:]}"
    assert not leftovers(run), leftovers(run)
    json.loads((run / 'state.json').read_text())


# =============================================================================================
# qat export RUN
# =============================================================================================
def _export_not_a_run(tmp_path, trained_run, stopped_run):
    folder = tmp_path / 'empty'
    folder.mkdir()
    return [folder], [str(folder), 'not a run folder']


def _export_missing_folder(tmp_path, trained_run, stopped_run):
    return [tmp_path / 'nowhere'], [str(tmp_path / 'nowhere')]


def _export_corrupt_state(tmp_path, trained_run, stopped_run):
    run, _ = copy_run(trained_run, tmp_path)
    (run / 'state.json').write_text('{"done": ["float", "pt')
    return [run], [str(run / 'state.json')]


def _export_missing_state(tmp_path, trained_run, stopped_run):
    run, _ = copy_run(trained_run, tmp_path)
    (run / 'state.json').unlink()
    return [run], [str(run / 'state.json')]


def _export_truncated_params(tmp_path, trained_run, stopped_run):
    run, _ = copy_run(trained_run, tmp_path)
    data = (run / 'qat.params').read_bytes()
    (run / 'qat.params').write_bytes(data[:len(data) // 2])
    return [run], [str(run / 'qat.params'), Any('damaged', 'truncated', 'unreadable',
                                                'not a readable')]


def _export_missing_params(tmp_path, trained_run, stopped_run):
    run, _ = copy_run(trained_run, tmp_path)
    (run / 'qat.params').unlink()
    return [run], [str(run / 'qat.params')]


def _export_params_of_another_net(tmp_path, trained_run, stopped_run):
    run, _ = copy_run(trained_run, tmp_path)
    shutil.copy(run / 'float.params', run / 'qat.params')  # float: no quantizer parameters
    return [run], [str(run / 'qat.params')]


def _export_damaged_saved_recipe(tmp_path, trained_run, stopped_run):
    run, _ = copy_run(trained_run, tmp_path)
    (run / 'recipe.yaml').write_text('run: {name: [unclosed\n\t: :\n')
    return [run], [str(run / 'recipe.yaml')]


def _export_stopped_before_qat_finished(tmp_path, trained_run, stopped_run):
    run, _ = copy_run(stopped_run, tmp_path)
    return [run], [str(run), "'qat'", '--resume']


def _export_winograd_bogus(tmp_path, trained_run, stopped_run):
    run, _ = copy_run(trained_run, tmp_path)
    return [run, '--winograd', 'bogus'], ['--winograd', "'bogus'"]


def _export_out_is_a_file(tmp_path, trained_run, stopped_run):
    run, _ = copy_run(trained_run, tmp_path)
    out = tmp_path / 'afile'
    out.write_text('x')
    return [run, '--out', out], [str(out)]


def _export_name_with_slash(tmp_path, trained_run, stopped_run):
    run, _ = copy_run(trained_run, tmp_path)
    return [run, '--out', tmp_path / 'out', '--name', 'a/b'], ["'a/b'"]


EXPORT_CASES = {
    'not-a-run-folder': (_export_not_a_run, 'line'),
    'missing-run-folder': (_export_missing_folder, 'line'),
    'corrupt-state-json': (_export_corrupt_state, 'line'),
    'missing-state-json': (_export_missing_state, 'line'),
    'truncated-qat-params': (_export_truncated_params, 'line'),
    'missing-qat-params': (_export_missing_params, 'line'),
    'qat-params-of-another-net': (_export_params_of_another_net, 'line'),
    'damaged-saved-recipe': (_export_damaged_saved_recipe, 'recipe'),
    'run-stopped-before-qat-finished': (_export_stopped_before_qat_finished, 'line'),
    'winograd-bogus': (_export_winograd_bogus, 'argparse'),
    'out-is-a-file': (_export_out_is_a_file, 'line'),
    'name-with-slash': (_export_name_with_slash, 'line'),
}


@pytest.mark.parametrize('case', list(EXPORT_CASES))
def test_export_of_a_bad_run(case, trained_run, stopped_run, tmp_path, capsys):
    make, style = EXPORT_CASES[case]
    args, culprits = make(tmp_path, trained_run, stopped_run)
    check_cli(['export'] + args, capsys, 'export', culprits, watch=[tmp_path], style=style)


# =============================================================================================
# qat verify RUN
# =============================================================================================
def _damage(path, how):
    if how == 'truncate':
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif how == 'garble':
        path.write_bytes(b'\x00\xffgarbage\n7767517\nthis is not ncnn\n')
    elif how == 'delete':
        path.unlink()


VERIFY_CASES = {
    # id: (file in the export folder, damage, extra argv, culprits, style)
    'samples-negative': (None, None, ['--samples', '-1'], ['--samples', '-1'], 'argparse'),
    'threads-zero': (None, None, ['--threads', '0'], ['--threads', '0'], 'argparse'),
    'truncated-int8-bin': ('model-int8.bin', 'truncate', [], ['model-int8.bin'], 'line'),
    'garbled-int8-param': ('model-int8.param', 'garble', [], ['model-int8.param'], 'line'),
    'missing-int8-bin': ('model-int8.bin', 'delete', [], ['model-int8.bin'], 'line'),
    'truncated-fp32-bin': ('model.bin', 'truncate', [], ['model.bin'], 'line'),
    'garbled-manifest': ('model.json', 'garble', [], ['model.json'], 'line'),
    'missing-manifest': ('model.json', 'delete', [], ['model.json'], 'line'),
    'name-not-exported': (None, None, ['--name', 'other'], ['other.json'], 'line'),
}


@pytest.mark.parametrize('case', list(VERIFY_CASES))
def test_verify_of_a_bad_export(case, trained_run, tmp_path, capsys):
    name, how, extra, culprits, style = VERIFY_CASES[case]
    run, _ = copy_run(trained_run, tmp_path)
    if name is not None:
        _damage(run / 'export' / name, how)
    # no verify.json may appear (in <run>/ for the run's own export)
    check_cli(['verify', run, '--samples', '16'] + extra, capsys, 'verify', culprits,
              watch=[tmp_path], style=style)


def test_verify_of_a_missing_export_folder(trained_run, tmp_path, capsys):
    run, _ = copy_run(trained_run, tmp_path)
    check_cli(['verify', run, '--samples', '16', '--folder', tmp_path / 'nowhere'], capsys,
              'verify', [str(tmp_path / 'nowhere')], watch=[tmp_path])


def test_verify_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    check_cli(['verify', tmp_path / 'empty'], capsys, 'verify',
              [str(tmp_path / 'empty'), 'not a run folder'], watch=[tmp_path])


# =============================================================================================
# qat calibrate
# =============================================================================================
def calibrate_argv(images, out, *extra, model=FACTORY):
    return ['calibrate', '--model', model, '--images', images, '--shape', '8,8,3',
            '--output', out, '--batch-size', '4', '--method', 'max'] + list(extra)


def _cal_missing_images(tmp_path, images, monkeypatch):
    return {'images': tmp_path / 'nope'}, ['--images', str(tmp_path / 'nope')]


def _cal_empty_folder(tmp_path, images, monkeypatch):
    (tmp_path / 'empty').mkdir()
    return {'images': tmp_path / 'empty'}, ['--images', str(tmp_path / 'empty')]


def _cal_garbage_image(tmp_path, images, monkeypatch):
    folder = tmp_path / 'imgs'
    shutil.copytree(images, folder)
    bad = write_garbage(folder / 'img5.png')
    return {'images': folder}, ['--images', str(bad)]


def _cal_shape_not_numbers(tmp_path, images, monkeypatch):
    return {'extra': ['--shape', '8,x,3']}, ['--shape', '8,x,3']


def _cal_shape_four_values(tmp_path, images, monkeypatch):
    return {'extra': ['--shape', '8,8,3,1']}, ['--shape', '8,8,3,1']


def _cal_shape_zero(tmp_path, images, monkeypatch):
    return {'extra': ['--shape', '0,8,3']}, ['--shape', '0,8,3']


def _cal_unknown_model(tmp_path, images, monkeypatch):
    return {'model': 'resnet18_v9'}, ['--model', 'resnet18_v9', 'resnet18_v1']


def _cal_truncated_params(tmp_path, images, monkeypatch):
    net = qat.app.models.build(FACTORY, {}, input_shape=(3, 8, 8))
    path = tmp_path / 'float.params'
    net.save_parameters(str(path))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return {'extra': ['--params', path]}, [
        '--params', str(path), Any('damaged', 'unreadable', 'truncated', 'not a readable')]


def _cal_missing_params(tmp_path, images, monkeypatch):
    return {'extra': ['--params', tmp_path / 'no.params']}, ['--params', 'no.params']


def _cal_kwargs_not_json(tmp_path, images, monkeypatch):
    return {'extra': ['--model-kwargs', '{classes: 10']}, ['--model-kwargs']


def _cal_kwargs_not_object(tmp_path, images, monkeypatch):
    return {'extra': ['--model-kwargs', '[10]']}, ['--model-kwargs', '[10]']


def _cal_kwargs_bogus(tmp_path, images, monkeypatch):
    return {'extra': ['--model-kwargs', '{"bogus": 1}']}, ['bogus']


def _cal_exclude_nomatch(tmp_path, images, monkeypatch):
    return {'extra': ['--exclude', 'nomatch*']}, ['--exclude', 'nomatch*']


def _cal_bits_9(tmp_path, images, monkeypatch):
    return {'extra': ['--bits', '9']}, ['--bits', '9']


def _cal_winograd_bogus(tmp_path, images, monkeypatch):
    return {'extra': ['--winograd', 'bogus']}, ['--winograd', 'bogus']


def _cal_mean_wrong_length(tmp_path, images, monkeypatch):
    return {'extra': ['--mean', '1,2']}, ['--mean', '1,2']


def _cal_factory_none(tmp_path, images, monkeypatch):
    factory_module(tmp_path, monkeypatch, 'badfactory_cal',
                   'def none_net(**kwargs):\n    return None\n')
    return {'model': 'badfactory_cal:none_net'}, ['--model', 'badfactory_cal:none_net']


def _cal_factory_module_missing(tmp_path, images, monkeypatch):
    return {'model': 'no_such_module_xyz:net'}, ['--model', 'no_such_module_xyz']


def _cal_output_is_a_file(tmp_path, images, monkeypatch):
    out = tmp_path / 'afile'
    out.write_text('x')
    return {'out': out}, [str(out)]


def _cal_method_bogus(tmp_path, images, monkeypatch):
    return {'extra': ['--method', 'bogus']}, ['--method', 'bogus']


CALIBRATE_CASES = {
    'images-missing': (_cal_missing_images, 'line'),
    'images-empty-folder': (_cal_empty_folder, 'line'),
    'images-unreadable-file': (_cal_garbage_image, 'line'),
    'shape-not-numbers': (_cal_shape_not_numbers, 'line'),
    'shape-four-values': (_cal_shape_four_values, 'line'),
    'shape-zero-width': (_cal_shape_zero, 'line'),
    'model-unknown': (_cal_unknown_model, 'line'),
    'params-truncated': (_cal_truncated_params, 'line'),
    'params-missing': (_cal_missing_params, 'line'),
    'model-kwargs-not-json': (_cal_kwargs_not_json, 'line'),
    'model-kwargs-not-an-object': (_cal_kwargs_not_object, 'line'),
    'model-kwargs-bogus': (_cal_kwargs_bogus, 'line'),
    'exclude-matches-nothing': (_cal_exclude_nomatch, 'line'),
    'bits-9': (_cal_bits_9, 'line'),
    'winograd-bogus': (_cal_winograd_bogus, 'line'),
    'mean-wrong-length': (_cal_mean_wrong_length, 'line'),
    'factory-returns-none': (_cal_factory_none, 'line'),
    'factory-module-missing': (_cal_factory_module_missing, 'line'),
    'output-is-a-file': (_cal_output_is_a_file, 'line'),
    'method-bogus': (_cal_method_bogus, 'argparse'),
}


@pytest.mark.parametrize('case', list(CALIBRATE_CASES))
def test_calibrate_rejects_a_bad_input(case, images, tmp_path, monkeypatch, capsys):
    make, style = CALIBRATE_CASES[case]
    spec, culprits = make(tmp_path, images, monkeypatch)
    out = spec.get('out', tmp_path / 'out')
    argv = calibrate_argv(spec.get('images', images), out, *spec.get('extra', []),
                          model=spec.get('model', FACTORY))
    # the unknown model's message names close names, not hundreds
    check_cli(argv, capsys, 'calibrate', culprits, watch=[tmp_path], style=style,
              max_len=400 if case == 'model-unknown' else None)


# =============================================================================================
# qat demo
# =============================================================================================
DEMO_CASES = {
    'size-0': (['--size', '0'], ['--size', '0'], 'argparse'),
    'epochs-negative': (['--epochs', '-1'], ['--epochs', '-1'], 'argparse'),
    'model-bogus': (['--model', 'bogus'], ['--model', 'bogus'], 'line'),
    'model-close-name': (['--model', 'cifar_resnet20_v9'],
                         ['cifar_resnet20_v9', 'cifar_resnet20_v1'], 'line'),
    'model-factory-missing': (['--model', 'no_such_module_xyz:net'],
                              ['--model', 'no_such_module_xyz'], 'line'),
}


@pytest.mark.parametrize('case', list(DEMO_CASES))
def test_demo_rejects_a_bad_option(case, tmp_path, capsys):
    extra, culprits, style = DEMO_CASES[case]
    check_cli(['demo', '--folder', tmp_path / 'demo', '--epochs', '0'] + extra, capsys, 'demo',
              culprits, watch=[tmp_path], style=style, max_len=400)


# =============================================================================================
# The Python API
# =============================================================================================
def calibrated_net(seed=0):
    """small_net (conv-BN-relu-GAP-dense, 3x8x8 input) converted and calibrated."""
    net = small_net(seed)
    qat.convert_model(net)
    qat.calibrate(net, random_batches(seed, batches=2, size=8), method='max')
    return net


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """(calibrated net, its export folder)."""
    net = calibrated_net()
    folder = tmp_path_factory.mktemp('exported') / 'export'
    qat.export(net, str(folder), (3, 8, 8))
    return net, folder


# ----- qat.export ----------------------------------------------------------------------------
@pytest.mark.parametrize('shape, name, culprits', [
    ((3, 0, 16), 'model', ['input_shape', '(3, 0, 16)']),
    ((3, 16), 'model', ['input_shape', '(3, 16)']),
    ((3, 8.0, 8), 'model', ['input_shape']),
    ((3, 8, 8), 'a/b', ["'a/b'"]),
    ((3, 8, 8), '..', ["'..'"]),
    ((3, 8, 8), '', ["''"]),
], ids=['shape-zero-height', 'shape-2d', 'shape-float', 'name-with-slash', 'name-dotdot',
        'name-empty'])
def test_export_rejects_bad_arguments_writing_nothing(shape, name, culprits, tmp_path):
    net = calibrated_net()
    expect_error(lambda: qat.export(net, str(tmp_path / 'out'), shape, name=name), ExportError,
                 *culprits)
    assert tree(tmp_path) == {}


def test_export_rejects_an_unknown_winograd_policy(tmp_path):
    net = calibrated_net()
    expect_error(lambda: qat.export(net, str(tmp_path / 'out'), (3, 8, 8), winograd='bogus'),
                 UserError, "'bogus'")
    assert tree(tmp_path) == {}


def test_export_of_a_nan_weight_names_the_layer_and_writes_nothing(tmp_path):
    net = calibrated_net()
    weight = next(p for n, p in net.collect_params().items()  # small_conv0, calibrated
                  if n.endswith('conv0_weight'))
    values = weight.data().asnumpy()
    values[0, 0, 0, 0] = np.nan
    weight.set_data(mx.nd.array(values))
    out = tmp_path / 'out'
    expect_error(lambda: qat.export(net, str(out), (3, 8, 8)), ExportError, 'small_conv0',
                 'NaN')
    assert tree(tmp_path) == {}


def test_export_into_a_file_names_it(tmp_path):
    net = calibrated_net()
    out = tmp_path / 'afile'
    out.write_text('x')
    before = tree(tmp_path)
    expect_error(lambda: qat.export(net, str(out), (3, 8, 8)), ExportError, str(out))
    assert tree(tmp_path) == before


def test_export_of_an_uncalibrated_net_names_the_layer(tmp_path):
    net = small_net(1)
    qat.convert_model(net)
    expect_error(lambda: qat.export(net, str(tmp_path / 'out'), (3, 8, 8)), ExportError,
                 'small_conv0')
    assert tree(tmp_path) == {}


# ----- qat.calibrate -------------------------------------------------------------------------
def _generator(batches):
    return (b for b in batches)


@pytest.mark.parametrize('method, data, options, culprits', [
    ('bogus', 'batches', {}, ["'bogus'", 'kl']),
    ('ema', 'empty', {}, ['empty']),
    ('kl', 'empty', {}, ['empty']),
    ('kl', 'generator', {}, ['generator', Any('re-iterable', 'list')]),
    ('kl', 'batches', {'bogus': 1}, ["'bogus'", 'bins']),
    ('percentile', 'batches', {'percentile': 150}, ['percentile', '150']),
    ('max', 'nan', {}, ['small_conv0', Any('non-finite', 'NaN')]),
    ('kl', 'nan', {}, ['small_conv0', Any('non-finite', 'NaN')]),
], ids=['unknown-method', 'empty-list-ema', 'empty-list-kl', 'generator-for-kl',
        'unknown-option', 'percentile-150', 'nan-input-max', 'nan-input-kl'])
def test_calibrate_rejects_bad_arguments(method, data, options, culprits):
    net = small_net(2)
    qat.convert_model(net)
    batches = random_batches(0, batches=2, size=8)
    given = {'batches': batches, 'empty': [], 'generator': _generator(batches),
             'nan': [mx.nd.full((2, 3, 8, 8), np.nan)]}[data]
    expect_error(lambda: qat.calibrate(net, given, method=method, **options), UserError,
                 *culprits)


def test_calibrate_an_unconverted_net_says_so():
    net = small_net(3)
    expect_error(lambda: qat.calibrate(net, random_batches(0, size=8)), UserError,
                 'convert_model')


# ----- qat.load_parameters -------------------------------------------------------------------
def _saved(tmp_path):
    net = calibrated_net()
    path = tmp_path / 'net.params'
    qat.save_parameters(net, str(path))
    return path


def _truncated(tmp_path):
    path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    return path, UserError, [str(path), Any('damaged', 'truncated', 'not a readable')]


def _text_file(tmp_path):
    path = tmp_path / 'notes.params'
    path.write_text('these are not parameters\n')
    return path, UserError, [str(path)]


def _missing(tmp_path):
    return tmp_path / 'absent.params', MissingFileError, [str(tmp_path / 'absent.params')]


def _other_net(tmp_path):
    from tests.helpers import tiny_net
    net = tiny_net(classes=3)
    net.initialize()
    net(mx.nd.zeros((1, 3, 8, 8)))
    path = tmp_path / 'other.params'
    net.save_parameters(str(path))
    return path, UserError, [str(path)]


@pytest.mark.parametrize('make', [_truncated, _text_file, _missing, _other_net],
                         ids=['truncated', 'not-a-parameter-file', 'missing', 'another-net'])
def test_load_parameters_of_a_bad_file_names_it(make, tmp_path):
    path, kind, culprits = make(tmp_path)
    net = small_net(4)
    qat.convert_model(net)
    expect_error(lambda: qat.load_parameters(net, str(path)), kind, *culprits)


# ----- QuantConfig / QuantScheme -------------------------------------------------------------
@pytest.mark.parametrize('kwargs, culprits', [
    ({'weight_bits': 9}, ['weight_bits', '9']),
    ({'input_bits': 1}, ['input_bits', '1']),
    ({'weight_bits': 8.0}, ['weight_bits']),
    ({'weight_granularity': 'layer'}, ['weight_granularity', "'layer'"]),
    ({'range_tracker': 'bogus'}, ['range_tracker', "'bogus'"]),
    ({'range_momentum': 1.0}, ['range_momentum']),
    ({'input_signed': 'yes'}, ['input_signed']),
], ids=['weight-bits-9', 'input-bits-1', 'weight-bits-float', 'granularity-layer',
        'range-tracker-bogus', 'momentum-1', 'input-signed-string'])
def test_quant_config_rejects_a_bad_field(kwargs, culprits):
    expect_error(lambda: qat.QuantConfig(**kwargs), UserError, *culprits)


def test_quant_config_update_of_an_unknown_field():
    expect_error(lambda: qat.QuantConfig().updated(bogus=1), UserError, 'bogus')


@pytest.mark.parametrize('values, culprits', [
    ({'layers': {'*': {'weight_bits': 12}}}, ['layers', 'weight_bits', '12']),
    ({'layers': {'*conv*': {'bogus': 1}}}, ['layers', 'bogus']),
    ({'layers': {'*': 'float'}}, ['layers', "'float'"]),
    ({'bogus': 1}, ['bogus']),
    ({'first_layer_bits': 1}, ['first_layer_bits']),
    ({'weight_bits': 0}, ['weight_bits']),
], ids=['layer-bits-12', 'layer-unknown-field', 'layer-not-a-mapping', 'unknown-key',
        'first-layer-bits-1', 'weight-bits-0'])
def test_quant_scheme_from_dict_names_the_key(values, culprits):
    expect_error(lambda: qat.QuantScheme.from_dict(values), UserError, *culprits)


@pytest.mark.parametrize('kwargs, culprits', [
    ({'config': 'int8'}, ['QuantConfig', 'str']),
    ({'layer_configs': {'*dense*': 8}}, ['QuantConfig', 'int']),
], ids=['config-a-string', 'layer-config-an-int'])
def test_convert_model_rejects_a_config_of_the_wrong_type(kwargs, culprits):
    net = small_net(5)
    expect_error(lambda: qat.convert_model(net, **kwargs), TypeError, *culprits)


# ----- qat.verify ----------------------------------------------------------------------------
def test_verify_rejects_an_unknown_threshold(exported):
    net, folder = exported
    expect_error(lambda: qat.verify(net, str(folder), random_batches(0, size=8), bogus=0.5),
                 UserError, "'bogus'", 'min_top1_agreement')


def test_verify_of_a_missing_export_names_the_manifest(tmp_path):
    net = calibrated_net()
    expect_error(lambda: qat.verify(net, str(tmp_path / 'nowhere'), random_batches(0, size=8)),
                 MissingFileError, str(tmp_path / 'nowhere' / 'model.json'))
    assert tree(tmp_path) == {}


def test_verify_of_an_unconverted_net_says_so(exported):
    _, folder = exported
    expect_error(lambda: qat.verify(small_net(6), str(folder), random_batches(0, size=8)),
                 UserError, 'convert')


def test_verify_with_no_data_says_so(exported):
    net, folder = exported
    expect_error(lambda: qat.verify(net, str(folder), []), UserError,
                 Any('no data', 'empty', 'no batches'))


# ----- qat.app.recipe.load -------------------------------------------------------------------
def _write(tmp_path, text, name='r.yaml'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize('text, overrides, culprits', [
    ('run: {bogus: 1}\n', [], ['r.yaml: run.bogus: unknown key']),
    ('float: {epochs: two}\n', [], ['r.yaml: float.epochs:']),
    ('preprocess: {mean: [.nan, 1, 1]}\n', [], ['r.yaml: preprocess.mean:']),
    ('run: {name: ../x}\n', [], ['r.yaml: run.name:']),
    ('export: {winograd: off}\n', [], ['r.yaml: export.winograd:', 'quote']),
    ('quantize: {layers: {"*": {weight_bits: 12}}}\n', [], ['quantize.layers', 'weight_bits']),
    ('model: {source: factory, name: a:b:c}\n', [], ['model.name']),
    ('qat: {epochs: 1, freeze_ranges_epoch: 5}\n', [], ['qat.freeze_ranges_epoch']),
    ('', ['qat.epochs=-1'], ['--set: qat.epochs:']),
    ('', [('qat.lr', 'fast')], ['--set: qat.lr:']),
    ('', ['nosuchsection.key=1'], ['--set: nosuchsection']),
    ('qat: [1, 2]\n', [], ['r.yaml: qat:', 'mapping']),
], ids=['unknown-key', 'wrong-type', 'nan-mean', 'run-name-dotdot', 'yaml-off',
        'layer-bits-12', 'factory-name-malformed', 'schedule-beyond-epochs', 'set-negative',
        'typed-override-wrong-type', 'set-unknown-section', 'section-not-a-mapping'])
def test_recipe_load_names_file_and_key(text, overrides, culprits, tmp_path):
    path = _write(tmp_path, text)
    expect_error(lambda: app_recipe.load(path, overrides), app_recipe.RecipeError, *culprits)


def test_recipe_load_lists_every_problem_one_per_line(tmp_path):
    path = _write(tmp_path, 'run: {bogus: 1}\nfloat: {epochs: x}\nqat: {lr: -1}\n')
    err = expect_error(lambda: app_recipe.load(path), app_recipe.RecipeError)
    lines = str(err).splitlines()[1:]
    assert len(lines) == 3, str(err)
    for line, key in zip(sorted(lines), ['float.epochs', 'qat.lr', 'run.bogus']):
        assert PROBLEM_LINE.match(line) and f"{path}: {key}: " in line, line


@pytest.mark.parametrize('make, culprits', [
    (lambda tmp: str(tmp / 'absent.yaml'), ['absent.yaml', 'not found']),
    (lambda tmp: _write(tmp, 'run: {name: [oops\n'), ['r.yaml', 'YAML']),
    (lambda tmp: _write(tmp, '- a\n- b\n'), ['r.yaml', 'mapping']),
], ids=['missing-file', 'not-yaml', 'not-a-mapping'])
def test_recipe_load_of_a_bad_file(make, culprits, tmp_path):
    path = make(tmp_path)
    expect_error(lambda: app_recipe.load(path), app_recipe.RecipeError, *culprits)


# ----- qat.app.data.open_split ---------------------------------------------------------------
def _section(**values):
    return dict(app_recipe.defaults()['data'], **values)


def _open_empty_folder(root):
    (root / 'train').mkdir(parents=True)
    (root / 'val').mkdir()
    return _section(source='folder', root=str(root)), 'train', DataError, ['data.train']


def _open_class_without_images(root):
    class_folders(root, {'train': {'a': 1, 'b': 0}, 'val': {'a': 1}})
    return _section(source='folder', root=str(root)), 'train', DataError, ["'b'"]


def _open_val_extra_class(root):
    class_folders(root, {'train': {'a': 1}, 'val': {'a': 1, 'z': 1}})
    return _section(source='folder', root=str(root)), 'val', DataError, ['data.val', "'z'"]


def _open_missing_root(root):
    return _section(source='folder', root=str(root / 'nowhere')), 'train', MissingFileError, \
        ['data.train', 'nowhere']


def _list_section(root):
    return _section(source='list', root=str(root), train='train.txt', val='val.txt')


def _open_list_malformed(root):
    list_files(root, [0])
    (root / 'train.txt').write_text('train0.png\n')
    return _list_section(root), 'train', DataError, \
        ['train.txt:1']


def _open_list_missing_image(root):
    list_files(root, [0])
    (root / 'train.txt').write_text('train0.png 0\nabsent.png 1\n')
    return _list_section(root), 'train', DataError, \
        ['train.txt:2', 'absent.png']


def _open_list_empty(root):
    list_files(root, [0])
    (root / 'train.txt').write_text('\n')
    return _list_section(root), 'train', DataError, \
        ['train.txt']


def _open_unknown_source(root):
    return _section(source='imagenet'), 'train', DataError, ["'imagenet'"]


def _open_recordio_missing(root):
    root.mkdir()
    return _section(source='recordio', root=str(root), train='train.rec'), 'train', \
        MissingFileError, ['train.rec']


@pytest.mark.parametrize('make', [
    _open_empty_folder, _open_class_without_images, _open_val_extra_class, _open_missing_root,
    _open_list_malformed, _open_list_missing_image, _open_list_empty, _open_unknown_source,
    _open_recordio_missing,
], ids=['folder-empty', 'class-without-images', 'val-class-not-in-train', 'root-missing',
        'list-malformed-line', 'list-missing-image', 'list-empty', 'unknown-source',
        'recordio-missing'])
def test_open_split_names_the_problem(make, tmp_path):
    section, split, kind, culprits = make(tmp_path / 'data')
    expect_error(lambda: app_data.open_split(section, split), kind, *culprits)


# ----- qat.app.models.build ------------------------------------------------------------------
def _build_unknown(tmp_path, monkeypatch):
    return ('resnet18_v9', {}, None), ['resnet18_v9', 'resnet18_v1']


def _build_bad_kwargs(tmp_path, monkeypatch):
    return ('cifar_resnet20_v1', {'classes': 10, 'bogus': 1}, None), ['bogus']


def _build_factory_none(tmp_path, monkeypatch):
    factory_module(tmp_path, monkeypatch, 'badfactory_build',
                   'def none_net(**kwargs):\n    return None\n')
    return ('badfactory_build:none_net', {}, None), ['badfactory_build:none_net', 'None']


def _build_factory_missing_function(tmp_path, monkeypatch):
    return ('tests.helpers:no_such_net', {}, None), ['no_such_net']


def _build_factory_module_missing(tmp_path, monkeypatch):
    return ('no_such_module_xyz:net', {}, None), ['no_such_module_xyz']


def _build_params_missing(tmp_path, monkeypatch):
    return (FACTORY, {}, str(tmp_path / 'absent.params')), ['absent.params']


def _build_params_truncated(tmp_path, monkeypatch):
    net = app_models.build(FACTORY, {}, input_shape=(3, 8, 8))
    path = tmp_path / 'float.params'
    net.save_parameters(str(path))
    path.write_bytes(path.read_bytes()[:200])
    return (FACTORY, {}, str(path)), [str(path), Any('damaged', 'truncated', 'unreadable')]


def _build_params_of_another_net(tmp_path, monkeypatch):
    net = app_models.build(FACTORY, {'classes': 3}, input_shape=(3, 8, 8))
    path = tmp_path / 'three.params'
    net.save_parameters(str(path))
    return (FACTORY, {'classes': 10}, str(path)), [str(path)]


@pytest.mark.parametrize('make', [
    _build_unknown, _build_bad_kwargs, _build_factory_none,
    _build_factory_missing_function, _build_factory_module_missing, _build_params_missing,
    _build_params_truncated, _build_params_of_another_net,
], ids=['unknown-gluoncv-name', 'bad-kwargs', 'factory-returns-none',
        'factory-function-missing', 'factory-module-missing', 'params-missing',
        'params-truncated', 'params-of-another-net'])
def test_models_build_names_the_problem(make, tmp_path, monkeypatch):
    (name, kwargs, params), culprits = make(tmp_path, monkeypatch)
    err = expect_error(lambda: app_models.build(name, kwargs, params=params,
                                                input_shape=(3, 8, 8)),
                       app_models.ModelError, *culprits)
    assert len(str(err)) < 400, f"{len(str(err))} characters: {err}"
