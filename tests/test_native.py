"""The fused activation operators against the plain-MXNet path and the numpy oracle."""
import numpy as np
import pytest
from mxnet import autograd, nd

from qat import native, ops, reference

pytestmark = pytest.mark.skipif(not native.available(), reason='no C++ compiler here')

TIES = np.array([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, 127.4, -127.6, 200, -200,
                 np.nextafter(np.float32(0.5), np.float32(0)),
                 -np.nextafter(np.float32(0.5), np.float32(0)),
                 np.nextafter(np.float32(1.5), np.float32(0)), 0.0], np.float32)


def _codes_and_grad(x, scale, bits, use_native):
    saved = native._state['ok']
    native._state['ok'] = use_native
    try:
        x = nd.array(x)
        x.attach_grad()
        with autograd.record():
            codes = ops.quantize_activation(nd, x, nd.array([scale]), bits)
        codes.backward()
        return codes.asnumpy(), x.grad.asnumpy()
    finally:
        native._state['ok'] = saved


@pytest.mark.parametrize('bits', [2, 4, 7, 8])
def test_fused_equals_plain_mxnet_and_oracle(bits):
    rng = np.random.RandomState(bits)
    x = np.concatenate([TIES, rng.uniform(-3, 3, 100000).astype(np.float32),
                        (np.arange(-260, 261) / 2).astype(np.float32)])
    scale = np.float32(2 ** (bits - 1) - 1) / np.float32(2.0)
    fused, fused_grad = _codes_and_grad(x / scale, scale, bits, True)
    plain, plain_grad = _codes_and_grad(x / scale, scale, bits, False)
    expected = reference.quantize(x / scale, scale, bits)
    assert np.array_equal(fused, expected)  # bit-exact integer codes
    assert np.array_equal(plain, expected)
    # Same straight-through gradient on both paths: scale inside the range, 0 outside.
    assert np.array_equal(fused_grad, plain_grad)
    inside = np.abs((x / scale).astype(np.float32) * scale) <= 2 ** (bits - 1) - 1
    assert np.array_equal(fused_grad, np.where(inside, scale, 0).astype(np.float32))


def test_ties_follow_ncnn_simd_rule():
    codes, _ = _codes_and_grad(TIES, 1.0, 8, True)
    assert codes.tolist() == [1, -1, 2, -2, 3, -3, 127, -127, 127, -127, 127, -127, 1, -1, 1, 0]


def test_absmax_matches_numpy_and_propagates_nan():
    x = np.random.RandomState(0).normal(size=(4, 8, 5, 5)).astype(np.float32)
    assert nd.qat_absmax(nd.array(x)).asscalar() == np.abs(x).max()
    x[1, 2, 3, 4] = np.nan
    assert np.isnan(nd.qat_absmax(nd.array(x)).asscalar())


def _same_floats(a, b):
    """Equal as float32 values, NaN where NaN, and the same sign of zero."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    numbers = ~np.isnan(a)
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True) \
        and np.array_equal(np.signbit(a[numbers]), np.signbit(b[numbers]))


def _special_weights(rng, shape):
    w = rng.normal(size=shape).astype(np.float32)
    w[0] = 0.0                                 # an all-zero channel: the range is clamped
    w[1, :1] = -0.0
    w[2] *= np.float32(1e-30)                  # tiny: scales near the MAX_THRESHOLD clamp
    w[3, 0] = np.inf
    w[4, -1] = np.nan
    ties = TIES[np.abs(TIES) < 127]
    w[5].flat[:ties.size] = ties               # with max |w| = 127 the scale is 1: exact ties
    w[5].flat[ties.size:] = 127.0
    return w


@pytest.mark.parametrize('bits', [4, 8])
def test_weight_quantizer_equals_its_mxnet_ops(bits):
    """qat_weight_scale + qat_quantize_weight: the codes, scales and gradient of
    ops.weight_threshold / scale_from_threshold / quantize, bit for bit."""
    rng = np.random.RandomState(bits)
    w = _special_weights(rng, (8, 3, 3, 3))
    factor = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    factor[6] = 0.0
    head = rng.normal(size=w.shape).astype(np.float32)
    results = []
    for fused in (True, False):
        weight = nd.array(w)
        weight.attach_grad()
        with autograd.record():
            if fused:
                codes, scale = ops.quantize_weight_per_channel(nd, weight, nd.array(factor), bits)
            else:
                threshold = ops.weight_threshold(nd, weight, 8, 1, 'channel') * nd.array(factor)
                scale = ops.scale_from_threshold(nd, threshold, bits)
                codes = ops.quantize(nd, weight, nd.reshape(scale, (-1, 1, 1, 1)), bits)
        codes.backward(nd.array(head))
        results.append((codes.asnumpy(), scale.asnumpy(), weight.grad.asnumpy()))
    for got, expected in zip(*results):
        assert _same_floats(got, expected)


def test_tracked_scale_equals_its_mxnet_ops():
    """qat_tracked_scale: ops.scale_from_threshold(ranges.ema_value(...)), bit for bit, for
    never-updated, NaN, infinite, tiny and huge ranges and fallbacks."""
    from qat.nn import ranges
    emas = [(0, 0), (0.7, 0.19), (3.0, 1.0), (np.nan, 1.0), (1.0, np.nan), (np.inf, 1.0),
            (1e-30, 1.0), (1e30, 1e-10), (0.0, 0.5), (-1.0, 0.5)]
    fallbacks = [None, 0.0, 2.5, np.nan, np.inf, 1e-20]
    for ema in emas:
        for fallback in fallbacks:
            for bits, signed in ((8, True), (8, False), (4, True)):
                got = []
                for use_native in (True, False):
                    saved = native._state['ok']
                    native._state['ok'] = use_native
                    try:
                        batch = None if fallback is None else nd.array([fallback])
                        got.append(ranges.tracked_scale(nd, nd.array(ema), batch, bits,
                                                        signed).asnumpy())
                    finally:
                        native._state['ok'] = saved
                assert _same_floats(*got), (ema, fallback, bits, signed, got)


def test_absmax_of_zeros_and_infinities():
    assert np.signbit(nd.qat_absmax(nd.array(np.full(7, -0.0, np.float32))).asscalar()) == 0
    x = np.array([1.0, -np.inf, 3.0], np.float32)
    assert nd.qat_absmax(nd.array(x)).asscalar() == np.inf
