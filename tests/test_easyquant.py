"""EasyQuant scale search and the weight-threshold factor it sets.

Judged against independent numpy: weight scales ``qmax / (max|w| * factor)`` per channel or
per group, the table the export writes, cosines recomputed from the captured tensors.
Tolerances: COSINE_ATOL, the reported cosine vs a float64 recomputation from the same
float32 tensors (summation order only).
"""
import os

import functools

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import qat
from qat.calibration import easyquant
from qat.errors import UserError
from qat.deploy import export, verify
from qat.deploy.table import read_table
from qat.modes import deployed, quantized_only
from qat.probes import capture

from .helpers import random_batches, randomize_bn

COSINE_ATOL = 1e-9
FAST_GRID = 24  # grid steps in tests: the search logic does not depend on the count


def outlier_net(seed=0, prefix='eq_'):
    """conv(4->8) -> relu -> conv(8->6): every output channel has one weight 8x the
    standard deviation, so max|w| is a poor 4-bit range and the search has room."""
    rs = np.random.RandomState(seed)
    net = nn.HybridSequential(prefix=prefix)
    with net.name_scope():
        net.add(nn.Conv2D(8, 3, padding=1, in_channels=4), nn.Activation('relu'),
                nn.Conv2D(6, 3, padding=1, in_channels=8))
    net.initialize()
    for conv in (net[0], net[2]):
        w = rs.normal(0, 1, conv.weight.shape)
        flat = w.reshape(len(w), -1)
        flat[np.arange(len(w)), rs.randint(0, flat.shape[1], len(w))] = 8.0
        conv.weight.set_data(mx.nd.array(w))
    return net


def laplace_data(seed=1, batches=2, shape=(8, 4, 8, 8)):
    rs = np.random.RandomState(seed)
    return [mx.nd.array(rs.laplace(0, 1, shape)) for _ in range(batches)]


def mixed_net(seed=0):
    """conv -> BN -> relu -> grouped conv (2 groups) -> BN -> relu -> GAP -> Dense."""
    mx.random.seed(seed)
    with mx.name.NameManager():
        net = nn.HybridSequential(prefix='mix_')
        with net.name_scope():
            net.add(nn.Conv2D(8, 3, padding=1, in_channels=3), nn.BatchNorm(in_channels=8),
                    nn.Activation('relu'),
                    nn.Conv2D(8, 3, padding=1, groups=2, in_channels=8),
                    nn.BatchNorm(in_channels=8), nn.Activation('relu'),
                    nn.GlobalAvgPool2D(), nn.Dense(5, in_units=8))
    net.initialize(mx.init.Xavier())
    randomize_bn(net, np.random.RandomState(seed))
    return net


image_data = functools.partial(random_batches, seed=2, batches=2, samples=8)


# ----- the weight-threshold factor -----------------------------------------------------------
def test_scale_grid_starts_with_the_current_value():
    grid = easyquant.scale_grid(100)
    assert grid[0] == 1.0 and len(grid) == 101
    np.testing.assert_allclose(grid[1:], np.linspace(0.5, 2.0, 100))
    with pytest.raises(ValueError, match='steps'):
        easyquant.scale_grid(0)
    with pytest.raises(ValueError, match='low <= high'):
        easyquant.scale_grid(10, 2.0, 1.0)


@pytest.mark.parametrize('groups,granularity', [(1, 'channel'), (4, 'channel'),
                                                (1, 'tensor')])
def test_weight_scales_follow_the_factor(groups, granularity):
    """s_w = qmax / (max|w| over the scale's channels * the factor of its first channel)."""
    net = nn.HybridSequential()
    net.add(nn.Conv2D(8, 3, groups=groups, in_channels=8))
    net.initialize(mx.init.Xavier())
    qat.convert_model(net, config=qat.QuantConfig(weight_bits=7,
                                                  weight_granularity=granularity))
    block = qat.quant_blocks(net)[0][1]
    factor = np.linspace(0.6, 1.7, 8).astype(np.float32)
    block.weight_threshold_factor.set_data(mx.nd.array(factor))
    codes, s_w = block._quantized_weight(mx.nd, block.weight.data(), 8, groups)
    w = block.weight.data().asnumpy().astype(np.float64)
    per = 8 if granularity == 'tensor' else (8 // groups if groups > 1 else 1)
    magnitude = np.abs(w).reshape(8 // per, -1).max(1).repeat(per)
    expected = 63.0 / (magnitude * factor[::per].repeat(per))
    np.testing.assert_allclose(s_w.asnumpy(), expected, rtol=1e-6)
    assert np.abs(codes.asnumpy()).max() <= 63


def test_factor_is_saved_and_old_checkpoints_load_with_ones(tmp_path):
    net = mixed_net()
    qat.convert_model(net)
    block = qat.quant_blocks(net)[0][1]
    block.weight_threshold_factor.set_data(mx.nd.full((8,), 0.75))
    path = str(tmp_path / 'net.params')
    qat.save_parameters(net, path)
    fresh = mixed_net(seed=5)
    qat.convert_model(fresh)
    qat.load_parameters(fresh, path)
    np.testing.assert_array_equal(
        qat.quant_blocks(fresh)[0][1].weight_threshold_factor.data().asnumpy(), 0.75)
    # a checkpoint written before the factor existed
    old = {k: v for k, v in mx.nd.load(path).items() if 'weight_threshold_factor' not in k}
    mx.nd.save(path, old)
    qat.load_parameters(fresh, path)
    for _, b in qat.quant_blocks(fresh):
        np.testing.assert_array_equal(b.weight_threshold_factor.data().asnumpy(), 1.0)
    # anything else missing is still an error (a UserError naming the file and the parameter)
    mx.nd.save(path, {k: v for k, v in old.items() if not k.endswith('qmode')})
    with pytest.raises(UserError, match=r"net.params: does not fit .*'0.qmode' is missing"):
        qat.load_parameters(fresh, path)


# ----- the search --------------------------------------------------------------------------
def _layer_cosine(net, block, samples):
    """Independent recomputation: float-net output of ``block`` vs the block quantized on
    its input from the quantized upstream net, per-sample cosine in float64, averaged."""
    with deployed(net):
        x = capture(net, samples, block)
        with quantized_only(net, ()):
            ref = capture(net, samples, block, output=True).asnumpy()
        out = block(x).asnumpy()
    ref = ref.reshape(len(ref), -1).astype(np.float64)
    out = out.reshape(len(out), -1).astype(np.float64)
    cos = (ref * out).sum(1) / np.sqrt((ref ** 2).sum(1) * (out ** 2).sum(1))
    return float(cos.mean())


def test_search_improves_a_constructed_case_and_never_lowers():
    net = outlier_net()
    data = laplace_data()
    qat.convert_model(net, config=qat.QuantConfig(weight_bits=4, input_bits=4))
    results = easyquant.search(net, data, steps=FAST_GRID)
    assert [r['layer'] for r in results] == ['eq_conv0', 'eq_conv1']
    for r in results:
        assert r['cosine'] >= r['cosine_start']
        assert r['cosine'] > r['cosine_start'] + 2e-3  # outliers: clipping them pays
        assert r['weight_factor_min'] < 1.0  # some weight ranges were clipped
    samples = mx.nd.concat(*data, dim=0)
    for (_, block), r in zip(qat.quant_blocks(net), results):
        assert abs(_layer_cosine(net, block, samples) - r['cosine']) <= COSINE_ATOL
    table = easyquant.format_search(results)
    assert f"| eq_conv1 | W4A4 | {results[1]['cosine_start']:.6f} |" in table


@pytest.mark.parametrize('bits,signed', [(8, True), (7, True), (3, True), (2, True),
                                         (4, False)])
def test_search_never_lowers_any_layer(bits, signed):
    net = mixed_net()
    qat.convert_model(net, config=qat.QuantConfig(weight_bits=bits, input_bits=bits,
                                                  input_signed=signed))
    results = easyquant.search(net, image_data(), steps=FAST_GRID, rounds=2)
    assert len(results) == 3
    for r in results:
        assert r['cosine'] >= r['cosine_start'], r


def test_grouped_conv_keeps_one_factor_per_group():
    net = mixed_net()
    qat.convert_model(net, config=qat.QuantConfig(weight_bits=3, input_bits=3))
    easyquant.search(net, image_data(), steps=FAST_GRID)
    grouped = qat.quant_blocks(net)[1][1]
    factor = grouped.weight_threshold_factor.data().asnumpy().reshape(2, 4)
    assert np.all(factor == factor[:, :1])


def test_search_skips_float_layers_and_starts_from_set_ranges():
    net = mixed_net()
    qat.convert_model(net)
    data = image_data()
    qat.calibrate(net, data, method='max')
    blocks = [b for _, b in qat.quant_blocks(net)]
    blocks[1].set_mode(quantize=False)
    before = blocks[1].weight_threshold_factor.data().asnumpy()
    results = easyquant.search(net, data, calibration=None, steps=FAST_GRID)
    assert [r['layer'] for r in results] == [blocks[0].name, blocks[2].name]
    np.testing.assert_array_equal(blocks[1].weight_threshold_factor.data().asnumpy(), before)
    assert not blocks[1].mode['quantize'] and blocks[0].mode['quantize']
    assert not blocks[0].mode['bn_frozen']  # the deployed modes are restored


def _folded_weight(block):
    """The weight ncnn gets, folded with the BN in float64 (independent of qat.ops)."""
    w = block.weight.data().asnumpy().astype(np.float64)
    if not isinstance(block, qat.QConv2DBatchNorm):
        return w
    gamma, var = (getattr(block, a).data().asnumpy().astype(np.float64)
                  for a in ('gamma', 'running_var'))
    return w * (gamma / np.sqrt(var + block._bn_kwargs['eps'])).reshape(-1, 1, 1, 1)


def _eq_export(folder, bits):
    net = mixed_net()
    qat.convert_model(net, config=qat.QuantConfig(weight_bits=bits, input_bits=bits))
    data = image_data()
    easyquant.search(net, data, steps=FAST_GRID)
    qat.freeze_bn(net)
    paths = export(net, folder, (3, 8, 8), name='model')
    return net, data, paths


@pytest.mark.parametrize('bits', [8, 7])
def test_export_carries_the_searched_scales_and_is_deterministic(tmp_path, bits):
    net, data, paths = _eq_export(str(tmp_path / 'a'), bits)
    _, _, again = _eq_export(str(tmp_path / 'b'), bits)
    with open(paths['table'], 'rb') as first, open(again['table'], 'rb') as second:
        assert first.read() == second.read()
    weights, inputs = read_table(paths['table'])
    qmax = 2 ** (bits - 1) - 1
    for _, block in qat.quant_blocks(net):
        w = _folded_weight(block)
        groups = block.groups
        magnitude = np.abs(w).reshape(groups if groups > 1 else len(w), -1).max(1)
        factor = block.weight_threshold_factor.data().asnumpy().reshape(len(magnitude), -1)[:, 0]
        np.testing.assert_allclose(weights[block.name], qmax / (magnitude * factor), rtol=1e-6)
        np.testing.assert_allclose(inputs[block.name], qmax / block.input_threshold(),
                                   rtol=1e-6)
    report = verify(net, os.path.dirname(paths['table']), data)
    assert report['passed'], report['failures']
    assert report['int8']['top1_agreement'] == 1.0


def test_search_without_calibration_needs_ranges():
    net = mixed_net()
    qat.convert_model(net)
    with pytest.raises(ValueError, match='mix_conv0: input range is unset'):
        easyquant.search(net, image_data(), calibration=None)
    with pytest.raises(ValueError, match='rounds'):
        easyquant.search(net, image_data(), rounds=0)
