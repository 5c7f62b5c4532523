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
