"""``qat calibrate`` (qat.ptq): bad inputs give one clear error line naming the option or
file; a folder of generated images gives a table and an ncnn int8 model that ncnn runs and
that agree with the simulation; the table is deterministic."""
import argparse
import os

import numpy as np
from mxnet.gluon import nn

from qat.app import ptq
from qat.deploy import ncnn as ncnn_files
from qat.deploy.table import read_table

FACTORY = 'tests.test_ptq_cli:tiny_net'


def tiny_net(classes=4):
    """The factory the command builds: conv(3->8)+BN+relu, depthwise conv+BN+relu, GAP,
    Dense."""
    net = nn.HybridSequential(prefix='tiny_')
    with net.name_scope():
        net.add(nn.Conv2D(8, 3, padding=1, in_channels=3), nn.BatchNorm(),
                nn.Activation('relu'), nn.Conv2D(8, 3, padding=1, groups=8, in_channels=8),
                nn.BatchNorm(), nn.Activation('relu'), nn.GlobalAvgPool2D(),
                nn.Dense(classes))
    return net


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of ``qat calibrate argv``."""
    args = ptq.add_arguments(argparse.ArgumentParser()).parse_args(argv)
    try:
        status = ptq.run(args)
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def base_args(images, out, *extra):
    """A valid command line reading ``images`` (None: no --images) into ``out``."""
    return ['--model', FACTORY] + (['--images', str(images)] if images else []) + [
            '--shape', '12,12,3',
            '--mean', '127.5,127.5,127.5', '--norm', '0.0078125,0.0078125,0.0078125',
            '--output', str(out), '--batch-size', '4'] + list(extra)


def _bad(tmp_path, images):
    empty = tmp_path / 'empty.txt'
    empty.write_text('\n# nothing\n')
    broken = tmp_path / 'broken.txt'
    (tmp_path / 'not-an-image.png').write_text('text')
    broken.write_text(str(tmp_path / 'not-an-image.png') + '\n')
    missing = tmp_path / 'missing.txt'
    missing.write_text(str(images / 'img0.jpg') + '\nnope.jpg\n')
    (tmp_path / 'no-images').mkdir()
    binary = tmp_path / 'binary.lst'
    binary.write_bytes(b'\xff\xfe\x00\x81')
    return {
        'empty list': (['--images', str(empty)], f"--images {empty}: the list names no images"),
        'unreadable image': (['--images', str(broken)], "cannot read image"),
        'missing image': (['--images', str(missing)], f"--images {missing}:2: image not "
                                                      f"found: nope.jpg"),
        'missing list': (['--images', str(tmp_path / 'nothing.txt')], "no such folder or "
                                                                      "list file"),
        'folder without images': (['--images', str(tmp_path / 'no-images')],
                                  "the folder has no image files"),
        'binary list': (['--images', str(binary)], "not a text list file"),
        'shape length': (['--shape', '12,12,3,1'], "--shape 12,12,3,1: expected W,H,C"),
        'shape vs pixel': (['--shape', '12,12,1'], "C=1 does not match --pixel RGB"),
        'shape vs model': (['--shape', '12,12,1', '--pixel', 'GRAY', '--mean', '0',
                            '--norm', '1'], "--shape 12,12,1: the model does not accept"),
        'zero size': (['--shape', '0,12,3'], "width and height must be positive"),
        'mean length': (['--mean', '1,2'], "--mean 1,2: 2 value(s), but the input has 3"),
        'norm length': (['--norm', '1,2,3,4'], "--norm 1,2,3,4: 4 value(s)"),
        'norm zero': (['--norm', '1,0,1'], "--norm 1,0,1: values must be non-zero"),
        'not numbers': (['--mean', 'a,b,c'], "--mean a,b,c: expected comma-separated numbers"),
        'several inputs': (['--mean', '[1,2,3],[4]'], "several inputs"),
        'several lists': (['--images', str(images / 'list.txt'), '--images', str(empty)],
                          "several inputs"),
        'unknown model': (['--model', 'no_such_net'], "--model no_such_net: not a GluonCV"),
        'bad factory': (['--model', 'tests.nope:net'], "--model tests.nope:net: cannot build"),
        'bad kwargs': (['--model-kwargs', '{"classes": '], "--model-kwargs"),
        'exclude nothing': (['--exclude', 'nope*'], "--exclude nope*: matches no layer"),
        'negative count': (['--verify', '-1'], "--verify -1: must be >= 0"),
        'bits': (['--bits', '9'], "--bits 9: bits must be in 2..8"),
        'first layer bits': (['--first-layer-bits', '1'], "--first-layer-bits 1: bits must"),
        'params missing': (['--params', str(tmp_path / 'x.params')], "--params"),
        'unknown method': (['--method', 'kl,nope'], "--method kl,nope: unknown method nope"),
        'threshold of a classifier': (['--confidence-threshold', '0.5'],
                                      f"--confidence-threshold: {FACTORY} is not a GluonCV"),
    }


def test_bad_inputs_give_one_clear_error_each(tmp_path, images, capsys):
    out = tmp_path / 'out'
    for label, (extra, message) in _bad(tmp_path, images).items():
        argv = base_args(None if extra[0] == '--images' else images, out) + extra
        status, stdout, stderr = run_cli(argv, capsys)
        assert status == 2, label
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('qat calibrate: error: '), (label, stderr)
        assert message in lines[0], (label, lines[0])
    assert not out.exists()  # nothing written by a failed command


def _table_bytes(folder):
    with open(os.path.join(folder, 'model.table'), 'rb') as handle:
        return handle.read()


def test_calibrate_writes_table_and_int8_model(tmp_path, images, capsys):
    out = tmp_path / 'kl'
    status, stdout, stderr = run_cli(base_args(images, out, '--verify', '6', '--threads', '2',
                                               '--compare', '4'), capsys)
    assert status == 0, stderr
    assert '[2/4] calibrating with kl on 10 images (3 batches of 4)' in stdout
    assert 'PASSED' in stdout
    with open(out / 'model-layers.md') as handle:  # the layer-by-layer comparison
        table = handle.read()
    assert all(name in table for name in ('tiny_conv0', 'tiny_conv1', 'tiny_dense0'))
    assert (out / 'model-layers.png').read_bytes()[:4] == b'\x89PNG'
    weights, inputs = read_table(str(out / 'model.table'))
    assert sorted(inputs) == ['tiny_conv0', 'tiny_conv1', 'tiny_dense0']
    assert len(weights['tiny_conv1']) == 8  # depthwise: one scale per group
    int8 = {name: params.get(8, 0) for _, name, _, _, params in
            ncnn_files.read_param(str(out / 'model-int8.param'))}
    assert int8['tiny_conv0'] and int8['tiny_conv1'] and int8['tiny_dense0']


def test_list_file_exclude_and_easyquant(tmp_path, images, capsys):
    first = tmp_path / 'eq1'
    extra = ['--method', 'easyquant', '--bits', '7', '--first-layer-bits', '8', '--exclude',
             'tiny_dense*', '--verify', '4']
    status, stdout, stderr = run_cli(base_args(images / 'list.txt', first, *extra), capsys)
    assert status == 0, stderr
    assert 'easyquant 2/2 tiny_conv1' in stdout
    weights, inputs = read_table(str(first / 'model.table'))
    assert sorted(weights) == sorted(inputs) == ['tiny_conv0', 'tiny_conv1']
    second = tmp_path / 'eq2'
    status, _, _ = run_cli(base_args(images / 'list.txt', second, *extra), capsys)
    assert status == 0
    assert _table_bytes(first) == _table_bytes(second)  # deterministic, byte for byte


def test_params_are_loaded_and_mismatched_params_are_refused(tmp_path, images, capsys):
    import mxnet as mx
    net = tiny_net()
    net.initialize(mx.init.Uniform(0.5))
    net(mx.nd.zeros((1, 3, 12, 12)))
    params = str(tmp_path / 'tiny.params')
    net.save_parameters(params)
    status, _, stderr = run_cli(base_args(images, tmp_path / 'p', '--params', params), capsys)
    assert status == 0, stderr
    weights, _ = read_table(str(tmp_path / 'p' / 'model.table'))
    w = net[0].weight.data().asnumpy().astype(np.float64)
    folded = np.abs(w).reshape(8, -1).max(1) / np.sqrt(1 + 1e-5)  # default BN: var 1, eps
    np.testing.assert_allclose(weights['tiny_conv0'], 127 / folded, rtol=1e-6)
    status, _, stderr = run_cli(base_args(images, tmp_path / 'q', '--params', params,
                                          '--model-kwargs', '{"classes": 3}'), capsys)
    assert status == 2 and f"--params {params}: does not match --model" in stderr


def test_a_detector_with_several_methods_keeps_the_best(tmp_path, images, capsys):
    """A GluonCV SSD: each method scored by its heads' agreement with float, the best one's
    table written (byte-identical to calibrating with it alone), ncnn's DetectionOutput at
    the given threshold, verified."""
    detector = ['--model', 'tests.test_detection:tiny_ssd', '--images', str(images),
                '--shape', '64,64,3', '--mean', '127.5,127.5,127.5',
                '--norm', '0.0078125,0.0078125,0.0078125', '--batch-size', '4',
                '--confidence-threshold', '0.2']
    out = tmp_path / 'both'
    status, stdout, stderr = run_cli(detector + ['--output', str(out), '--method',
                                                 'max,percentile', '--verify', '2'], capsys)
    assert status == 0, stderr
    assert 'PASSED' in stdout
    table = (out / 'model-methods.md').read_text()
    assert 'agreement with float' in table
    chosen = [line.split('|')[1].strip() for line in table.splitlines() if '<-' in line]
    assert len(chosen) == 1 and chosen[0] in ('max', 'percentile')
    scores = {line.split('|')[1].strip(): float(line.split('|')[2])
              for line in table.splitlines()[2:]}
    assert scores[chosen[0]] == max(scores.values())
    layers = {name: (kind, params) for kind, name, _, _, params in
              ncnn_files.read_param(str(out / 'model-int8.param'))}
    kind, params = layers['detection_out']
    assert kind == 'DetectionOutput' and np.float32(params[4]) == np.float32(0.2)  # threshold
    alone = tmp_path / 'alone'
    status, _, stderr = run_cli(detector + ['--output', str(alone), '--method', chosen[0]],
                                capsys)
    assert status == 0, stderr
    assert _table_bytes(out) == _table_bytes(alone)


def test_a_zoo_detector_builds_offline_with_random_weights():
    """GluonCV's zoo SSD without --pretrained: no backbone download (pretrained_base off),
    and its SymbolBlock backbone's BN vectors start as BN does (Xavier cannot start them)."""
    from qat.app import models
    net = models.build('ssd_512_mobilenet1.0_voc', input_shape=(3, 64, 64))
    params = net.collect_params()
    gammas = [p for name, p in params.items() if name.endswith('gamma')]
    assert gammas and all(np.all(p.data().asnumpy() == 1) for p in gammas)
    weights = [p for name, p in params.items() if name.endswith('weight')]
    assert all(np.isfinite(p.data().asnumpy()).all() for p in weights)
    assert any(p.data().asnumpy().std() > 0 for p in weights)
