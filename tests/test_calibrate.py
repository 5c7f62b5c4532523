"""Calibration sets each layer's input range from float activations and restores the net."""
import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import qat
from qat.calibrate import _ema


def _net():
    mx.random.seed(3)
    net = nn.HybridSequential()
    net.add(nn.Conv2D(8, 3, padding=1), nn.BatchNorm(), nn.Activation('relu'),
            nn.Conv2D(8, 3, padding=1, groups=2), nn.GlobalAvgPool2D(), nn.Dense(10))
    net.initialize(mx.init.Xavier())
    return net


def _batches(n=4, seed=0):
    rng = np.random.RandomState(seed)
    return [mx.nd.array(rng.normal(scale=1 + i, size=(2, 3, 8, 8))) for i in range(n)]


def _float_inputs(net, batches):
    """Per-batch max |input| of every Conv/Dense in the float net (the oracle)."""
    seen = {}
    hooks = [b.register_forward_pre_hook(
        lambda blk, inp: seen.setdefault(blk.name, []).append(np.abs(inp[0].asnumpy()).max()))
        for b in net._children.values() if isinstance(b, (nn.Conv2D, nn.Dense))]
    for batch in batches:
        net(batch)
    for h in hooks:
        h.detach()
    return seen


@pytest.mark.parametrize('method', ['max', 'ema'])
def test_ranges_equal_float_activation_statistics(method):
    net, batches = _net(), _batches()
    expected = _float_inputs(net, batches)
    qat.convert_model(net)
    net.hybridize()
    qat.quantize_input(net, online=True)
    thresholds = qat.calibrate(net, batches, method=method)
    momentum = qat.QuantConfig().range_momentum
    for name, ranges in expected.items():
        want = max(ranges) if method == 'max' else _ema(ranges, momentum)
        # float32 max of the same tensor: identical; the EMA is summed in float64.
        assert thresholds[name] == pytest.approx(want, rel=1e-6)
    for _, block in qat.quant_blocks(net):
        assert block.input_threshold() == pytest.approx(thresholds[block.name], rel=1e-6)
        assert block.mode['online'] and block.mode['quantize']  # modes restored
    assert net._active  # hybridization restored


def test_bias_corrected_ema_starts_at_first_value():
    assert _ema([5.0], 0.9) == pytest.approx(5.0)
    assert _ema([2.0, 4.0], 0.5) == pytest.approx((0.25 * 2 + 0.5 * 4) / 0.75)


def test_bad_calibration_input():
    net = qat.convert_model(_net())
    with pytest.raises(ValueError, match="unknown calibration method 'kl2'"):
        qat.calibrate(net, _batches(), method='kl2')
    with pytest.raises(ValueError, match='empty'):
        qat.calibrate(net, [])
    with pytest.raises(ValueError, match='no quantized blocks'):
        qat.calibrate(_net(), _batches())
