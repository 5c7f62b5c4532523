"""Sensitivity analysis, automatic mixed precision and the float-vs-int8 layer comparison.

Independent side: numpy cosines / SQNR / accuracies computed in the tests from the net's
outputs with modes set by hand. Tolerances: METRIC_ATOL (float64 sums of the same float32
tensors in another order).
"""
import os

import functools

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import qat
from qat import metrics
from qat.analysis import (comparison, mixed_precision as mp, selection, sensitivity as sens,
                          tasks)
from qat.modes import temporary_mode
from qat.report import write_report
from qat.deploy import export, verify
from qat.deploy.table import read_table

from .helpers import random_batches, randomize_bn

METRIC_ATOL = 1e-9
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def chain_net(seed=0):
    """Four quantizable layers: conv -> BN -> relu, x3 (the middle one will be fragile),
    Dense(6) on the flattened features (so the predicted class varies with the input)."""
    mx.random.seed(seed)
    with mx.name.NameManager():
        net = nn.HybridSequential(prefix='chain_')
        with net.name_scope():
            for channels, inputs in ((8, 3), (8, 8), (8, 8)):
                net.add(nn.Conv2D(channels, 3, padding=1, in_channels=inputs),
                        nn.BatchNorm(in_channels=channels), nn.Activation('relu'))
            net.add(nn.Dense(6, in_units=8 * 8 * 8))
    net.initialize(mx.init.Xavier())
    randomize_bn(net, np.random.RandomState(seed))
    return net


inputs = functools.partial(random_batches, seed=3, batches=3, samples=16)


def self_labeled(net, batches):
    """(x, y) batches labeled with the float net's own predictions: float accuracy 100%."""
    return [(x, net(x).argmax(1).asnumpy().astype(np.int64)) for x in batches]


def fragile_net(fragile_bits=2):
    net = chain_net()
    data = inputs()
    labeled = self_labeled(net, data)
    layer_configs = {'chain_conv1': qat.QuantConfig(weight_bits=fragile_bits,
                                                    input_bits=fragile_bits)}
    qat.convert_model(net, layer_configs=layer_configs)
    qat.calibrate(net, data, method='max')
    return net, data, labeled


# ----- formulas ----------------------------------------------------------------------------
def test_metric_formulas():
    np.testing.assert_allclose(metrics.cosine_from_sums([1.0, 0.0, 0.0, -2.0], [1.0, 0.0, 4.0, 1.0],
                                                     [1.0, 0.0, 0.0, 4.0]),
                               [1.0, 1.0, 0.0, -1.0])
    a = np.random.RandomState(0).normal(size=(3, 2, 5))
    b = a * np.array([1.0, -1.0, 2.0])[:, None, None]
    np.testing.assert_allclose(metrics.cosine_similarity(a, b), [1.0, -1.0, 1.0])
    assert metrics.sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert metrics.sqnr_db(1.0, 0.0) == float('inf')
    stats = metrics.ErrorStats().add(np.ones((2, 4)), np.ones((2, 4)) * 0.9)
    assert stats.sqnr == pytest.approx(20.0) and stats.max_error == pytest.approx(0.1)


# ----- sensitivity -------------------------------------------------------------------------
def test_sensitivity_ranks_the_fragile_layer_first_and_matches_numpy():
    net, data, labeled = fragile_net()
    rows = sens.sensitivity(net, labeled)
    assert [r['layer'] for r in rows] == ['chain_conv0', 'chain_conv1', 'chain_conv2',
                                          'chain_dense0']
    assert sens.ranked_layers(rows)[0] == 'chain_conv1'
    assert rows[1]['bits'] == 'W2A2' and rows[1]['rank'] == 1
    # independent: quantize chain_conv1 alone by hand, compare outputs with numpy
    blocks = dict((b.name, b) for _, b in qat.quant_blocks(net))
    x = mx.nd.concat(*data, dim=0)
    labels = np.concatenate([y for _, y in labeled])
    with temporary_mode(net, quantize=False):
        reference = net(x).asnumpy().astype(np.float64)
    with temporary_mode(net, quantize=False, bn_frozen=True):
        blocks['chain_conv1'].set_mode(quantize=True)
        quantized = net(x).asnumpy().astype(np.float64)
    cos = ((reference * quantized).sum(1) / np.sqrt((reference ** 2).sum(1)
                                                      * (quantized ** 2).sum(1))).mean()
    sqnr = 10 * np.log10((reference ** 2).sum() / ((reference - quantized) ** 2).sum())
    assert abs(rows[1]['output_cosine'] - cos) <= METRIC_ATOL
    assert abs(rows[1]['output_sqnr'] - sqnr) <= 1e-6
    accuracy = 100.0 * np.mean(quantized.argmax(1) == labels)
    assert rows[1]['accuracy'] == pytest.approx(accuracy)
    assert rows[1]['accuracy_drop'] == pytest.approx(100.0 - accuracy)
    for row in rows:
        assert row['layer_sqnr'] > 0 and -1 <= row['layer_cosine'] <= 1
    assert rows[1]['layer_sqnr'] < min(r['layer_sqnr'] for r in rows if r is not rows[1])


def test_sensitivity_needs_ranges_and_leaves_modes(tmp_path):
    net = chain_net()
    qat.convert_model(net)
    with pytest.raises(ValueError, match='chain_conv0: input range is unset'):
        sens.sensitivity(net, inputs())
    qat.calibrate(net, inputs(), method='max')
    modes = [b.mode for _, b in qat.quant_blocks(net)]
    rows = sens.sensitivity(net, inputs(), max_samples=20)
    assert 'accuracy' not in rows[0]
    assert [b.mode for _, b in qat.quant_blocks(net)] == modes
    paths = write_report(sens.format_sensitivity(rows),
                              lambda p: sens.plot_sensitivity(rows, p), str(tmp_path), 'sens')
    with open(paths['table']) as handle:
        text = handle.read()
    assert text.count('\n| ') == len(rows) and 'chain_dense0' in text
    with open(paths['plot'], 'rb') as handle:
        assert handle.read(8) == PNG_SIGNATURE
    assert sorted(os.listdir(tmp_path)) == ['sens.md', 'sens.png']  # no temporary files


# ----- mixed precision ---------------------------------------------------------------------
def _accuracy(net, labeled):
    with temporary_mode(net, bn_frozen=True):
        correct = sum(int((net(x).argmax(1).asnumpy() == y).sum()) for x, y in labeled)
    return 100.0 * correct / sum(len(y) for _, y in labeled)


def test_mixed_precision_meets_the_budget_with_the_layers_it_reports(tmp_path):
    net, data, labeled = fragile_net()
    all_quantized = _accuracy(net, labeled)
    assert all_quantized < 90  # the 2-bit layer hurts
    result = mp.mixed_precision(net, labeled, budget=3.0)
    assert result['met'] and result['float_accuracy'] == 100.0
    assert result['layers'][0] == 'chain_conv1'
    float_layers = [b.name for _, b in qat.quant_blocks(net) if not b.mode['quantize']]
    assert sorted(float_layers) == sorted(result['layers'])
    assert 100.0 - _accuracy(net, labeled) <= 3.0
    steps = result['steps']
    assert steps[0]['accuracy'] == pytest.approx(all_quantized)
    assert all(step['drop'] > 3.0 for step in steps[:-1])  # fewest layers first
    assert [len(step['layers']) for step in steps] == list(range(len(steps)))
    paths = mp.write_mixed_precision_report(result, str(tmp_path))
    with open(paths['plot'], 'rb') as handle:
        assert handle.read(8) == PNG_SIGNATURE
    with open(paths['table']) as handle:
        assert 'met with' in handle.read()


def test_mixed_precision_export_has_no_table_lines_for_float_layers(tmp_path):
    net, data, labeled = fragile_net()
    result = mp.mixed_precision(net, labeled, budget=3.0)
    qat.freeze_bn(net)
    folder = str(tmp_path / 'export')
    paths = export(net, folder, (3, 8, 8), name='model')
    weights, scales = read_table(paths['table'])
    quantized = {b.name for _, b in qat.quant_blocks(net)} - set(result['layers'])
    assert set(weights) == quantized and set(scales) == quantized
    report = verify(net, folder, data[:1])
    assert report['passed'], report['failures']
    # float vs int8 layer by layer: ncnn agrees with the simulation
    rows = comparison.layer_comparison(net, data[:1], folder, max_samples=8)
    assert {r['layer'] for r in rows if r['int8']} == quantized
    for row in rows:
        assert abs(row['ncnn_cosine'] - row['sim_cosine']) < 1e-3
        assert row['sim_cosine'] > 0.9
    out = write_report(comparison.format_comparison(rows),
                            lambda p: comparison.plot_comparison(rows, p), str(tmp_path), 'layers')
    with open(out['plot'], 'rb') as handle:
        assert handle.read(8) == PNG_SIGNATURE


def test_mixed_precision_bits_action_and_unmet_budget():
    net, _, labeled = fragile_net()
    result = mp.mixed_precision(net, labeled, budget=0.0, max_layers=1, action='bits',
                                ranking=['chain_conv1', 'chain_conv0', 'chain_conv2',
                                         'chain_dense0'])
    blocks = dict((b.name, b) for _, b in qat.quant_blocks(net))
    chosen = result['steps'][result['chosen']]
    assert len(result['steps']) == 2
    assert result['layers'] == list(chosen['layers'])
    assert all(b.mode['quantize'] for b in blocks.values())
    expected = 8 if result['layers'] else 2
    assert blocks['chain_conv1'].config.weight_bits == expected
    with pytest.raises(ValueError, match="valid: \\['bits', 'float'\\]"):
        mp.mixed_precision(net, labeled, budget=1.0, action='int16')
    with pytest.raises(ValueError, match='unknown layers'):
        mp.mixed_precision(net, labeled, budget=1.0, ranking=['nope'])


def _output_cosine(net, batches, quantized):
    """Mean per-sample cosine (numpy, float64) of the net's output with the current modes
    against its float output, as deployed."""
    cosines = []
    for x in batches:
        with temporary_mode(net, bn_frozen=True, quantize=False):
            ref = net(x).asnumpy().astype(np.float64).reshape(len(x), -1)
        with temporary_mode(net, bn_frozen=True, quantize=quantized):
            out = net(x).asnumpy().astype(np.float64).reshape(len(x), -1)
        cosines.append((ref * out).sum(1) / np.sqrt((ref * ref).sum(1) * (out * out).sum(1)))
    return 100.0 * np.concatenate(cosines).mean()


def test_mixed_precision_without_labels_scores_the_agreement_with_float():
    net, data, labeled = fragile_net()
    batches = [x for x, _ in labeled]
    everything = _output_cosine(net, batches, True)
    assert everything < 99.0  # the 2-bit layer hurts
    result = mp.mixed_precision(net, batches, budget=0.5)
    assert result['metric'] == tasks.AGREEMENT and result['float_accuracy'] == \
        pytest.approx(100.0, abs=METRIC_ATOL)
    assert result['steps'][0]['accuracy'] == pytest.approx(everything, abs=1e-6)
    assert result['met'] and result['layers'][0] == 'chain_conv1'
    still_quantized = lambda block: block.name not in result['layers']
    assert 100.0 - _output_cosine(net, batches, still_quantized) <= 0.5
    assert 'agreement with float' in mp.format_mixed_precision(result)


# ----- the choice of a calibration method ------------------------------------------------
def _thresholds(net):
    return {b.name: b.input_threshold() for _, b in qat.quant_blocks(net)}


@pytest.mark.parametrize('labeled_scores', [False, True], ids=['agreement', 'top1'])
def test_choose_method_keeps_the_best_calibration(labeled_scores):
    """Each candidate scored as the test scores it after calibrating a fresh copy; the net
    ends calibrated exactly as a fresh calibration with the winner."""
    methods = ['max', 'percentile', 'mse']
    net, data, labeled = fragile_net(fragile_bits=3)
    result = selection.choose_method(net, data, methods, scored=labeled if labeled_scores
                                     else None)
    expected = {}
    for method in methods:
        fresh, _, _ = fragile_net(fragile_bits=3)
        qat.calibrate(fresh, data, method=method)
        expected[method] = _accuracy(fresh, labeled) if labeled_scores else \
            _output_cosine(fresh, data, True)
    scores = {row['method']: row['score'] for row in result['rows']}
    assert [row['method'] for row in result['rows']] == methods
    for method in methods:
        assert scores[method] == pytest.approx(expected[method], abs=1e-6), method
    best = max(methods, key=lambda m: (expected[m], -methods.index(m)))
    assert result['chosen'] == best
    assert result['metric'] == ('top-1 accuracy' if labeled_scores else tasks.AGREEMENT)
    fresh, _, _ = fragile_net(fragile_bits=3)
    qat.calibrate(fresh, data, method=best)
    assert _thresholds(net) == _thresholds(fresh)
    assert '<-' in selection.format_choice(result)
    assert len(set(expected.values())) > 1  # the candidates differ: the choice means something
