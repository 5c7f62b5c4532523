"""The formulas of ``qat.ops`` (mx.nd and mx.sym) against the numpy oracle ``qat.reference``,
and the oracle itself against independent float64 arithmetic."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

from qat import native, ops
from qat import reference as ref
from tests.helpers import F32_EPS, naive_conv2d_f64

# The float32 just below 0.5 (0.49999997): ncnn's trunc(v + copysign(0.5, v)) sends it to 1
# (v + 0.5 = 1 - 2^-25 rounds to 1.0 in float32), MXNet's round() to 0.
HALF_MINUS = np.nextafter(np.float32(0.5), np.float32(0))
# Integer codes are compared exactly: any difference is at least one whole code.
CODE_TOL = 0


def nd(a, dtype=np.float32):
    return mx.nd.array(np.asarray(a), dtype=dtype)


def q_nd(x, scale, bits=8, signed=True):
    return ops.quantize(mx.nd, nd(x), nd(scale), bits, signed).asnumpy()


def qa_nd(x, scale, bits=8, signed=True):
    return ops.quantize_activation(mx.nd, nd(x), nd(np.reshape(scale, (1,))), bits,
                                   signed).asnumpy()


# ----- rounding and codes ----------------------------------------------------------------
TIE_CASES = [  # (value, ncnn's code at scale 1, 8 bits signed)
    (0.5, 1), (-0.5, -1), (1.5, 2), (-1.5, -2), (2.5, 3), (-2.5, -3),
    (126.5, 127), (-126.5, -127),
    (200.0, 127), (-200.0, -127), (127.4, 127), (-127.4, -127), (127.5, 127), (-127.6, -127),
    (float(HALF_MINUS), 1), (-float(HALF_MINUS), -1),
    (0.0, 0), (0.3, 0), (-0.3, 0),
]


def test_reference_float2int_known_values():
    values = np.array([v for v, _ in TIE_CASES], np.float32)
    expected = np.array([c for _, c in TIE_CASES], np.int32)
    np.testing.assert_array_equal(ref.float2int(values), expected)


def test_round_half_away_matches_reference_on_ties():
    # round_half_away has no saturation: compare on values inside the 8-bit range, and
    # against the plain definition everywhere.
    values = np.array([v for v, _ in TIE_CASES if abs(v) <= 127.4], np.float32)
    got = ops.round_half_away(mx.nd, nd(values)).asnumpy()
    np.testing.assert_array_equal(got, ref.float2int(values).astype(np.float32))
    wide = np.array([200.0, -200.0, 1000.5, -1000.5, 4095.5], np.float32)
    got = ops.round_half_away(mx.nd, nd(wide)).asnumpy()
    np.testing.assert_array_equal(got, [200, -200, 1001, -1001, 4096])


def test_quantize_matches_reference_on_ties_and_saturation():
    values = np.array([v for v, _ in TIE_CASES], np.float32)
    expected = np.array([c for _, c in TIE_CASES], np.float32)
    got = q_nd(values, [1.0])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, ref.quantize(values, 1.0))


def test_quantize_forward_is_exact_code_for_large_products():
    # y + (q - y) is exact while |y| < 2^24 (q - y is then representable in float32).
    values = np.array([1e4 + 0.3, -1e4 - 0.3, 1e6 + 0.25, -1e6, 2.0 ** 24 - 1], np.float32)
    np.testing.assert_array_equal(q_nd(values, [1.0]), ref.quantize(values, 1.0))


def test_quantize_forward_is_exact_code_for_huge_products():
    values = np.array([1e9, -1e9, 2.0 ** 30], np.float32)
    np.testing.assert_array_equal(q_nd(values, [1.0]), ref.quantize(values, 1.0))


@pytest.mark.parametrize('bits', range(2, 9))
@pytest.mark.parametrize('signed', [True, False])
def test_quantize_bit_widths(bits, signed, activation_path):
    low, high = ops.qrange(bits, signed)
    if signed:
        assert (low, high) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    else:
        assert (low, high) == (0, 2 ** bits - 1)
    # every tie k + 0.5 across and beyond the range, plus random values
    ties = np.arange(low - 3, high + 3) + np.float32(0.5)
    rs = np.random.RandomState(bits)
    values = np.concatenate([ties, rs.uniform(low - 5, high + 5, 5000)]).astype(np.float32)
    want = ref.quantize(values, 1.0, bits, signed)
    assert want.min() == low and want.max() == high
    np.testing.assert_array_equal(q_nd(values, [1.0], bits, signed), want)
    np.testing.assert_array_equal(qa_nd(values, 1.0, bits, signed), want)


def test_quantize_per_channel_scales_random():
    rs = np.random.RandomState(0)
    x = rs.normal(0, 1, (16, 8, 3, 3)).astype(np.float32)
    scale = rs.uniform(10, 200, (16, 1, 1, 1)).astype(np.float32)
    got = q_nd(x, scale)
    want = ref.quantize(x, scale)
    assert np.abs(got - want).max() <= CODE_TOL
    assert got.min() == -127 and got.max() == 127  # the data saturates on both sides
    # the 2-D (Dense) layout
    w = rs.normal(0, 1, (10, 32)).astype(np.float32)
    s = rs.uniform(10, 200, (10, 1)).astype(np.float32)
    np.testing.assert_array_equal(q_nd(w, s), ref.quantize(w, s))


@pytest.fixture(params=['plain', 'native'])
def activation_path(request, monkeypatch):
    """Run quantize_activation on the pure-MXNet path or on the fused operator."""
    if request.param == 'native':
        if not native.available():
            pytest.skip('fused operators unavailable (no C++ compiler)')
    else:
        native.available()  # settle the state first, then force the plain path
        monkeypatch.setitem(native._state, 'ok', False)
    return request.param


def test_quantize_activation_equals_reference_everywhere(activation_path):
    """quantize_activation gives ncnn's codes on a dense sample, every tie k + 1/2, both
    neighbours of every tie, and +-0.49999997 (the float where MXNet's own round() differs
    from ncnn's float2int8: round gives 0, ncnn +-1)."""
    rs = np.random.RandomState(0)
    ties = (np.arange(-131, 131) + 0.5).astype(np.float32)
    near_ties = np.concatenate([np.nextafter(ties, np.float32(np.inf)),
                                np.nextafter(ties, np.float32(-np.inf))])
    values = np.concatenate([rs.uniform(-130, 130, 200_000).astype(np.float32), ties,
                             near_ties, [HALF_MINUS, -HALF_MINUS, 0.0]]).astype(np.float32)
    got = qa_nd(values, 1.0)
    want = ref.quantize(values, 1.0)
    assert np.abs(got - want).max() <= CODE_TOL
    np.testing.assert_array_equal(got[-3:], [1, -1, 0])  # +-0.49999997 and 0
    # MXNet's round() is the reason the plain path cannot use it: it differs exactly there
    plain_round = mx.nd.round(nd([HALF_MINUS, -HALF_MINUS])).asnumpy()
    np.testing.assert_array_equal(plain_round, [0, 0])
    # the shape of an activation is kept
    x = rs.uniform(-3, 3, (2, 3, 4, 5)).astype(np.float32)
    out = qa_nd(x, 40.0)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, ref.quantize(x, np.float32(40.0)))


def test_quantize_activation_non_unit_scale(activation_path):
    # the product x * s is formed in float32 as in the reference
    rs = np.random.RandomState(1)
    scale = np.float32(0.731)
    x = rs.uniform(-180, 180, 100_000).astype(np.float32)
    x[:4] = [HALF_MINUS / scale, -HALF_MINUS / scale, 0.5 / scale, 126.5 / scale]
    np.testing.assert_array_equal(qa_nd(x, scale), ref.quantize(x, scale))
    for bits in (2, 5, 8):
        for signed in (True, False):
            np.testing.assert_array_equal(qa_nd(x, scale, bits, signed),
                                          ref.quantize(x, scale, bits, signed))


# ----- gradients -----------------------------------------------------------------------
def test_quantize_gradient_is_identity_ste_times_scale():
    rs = np.random.RandomState(0)
    x = nd(np.concatenate([rs.uniform(-3, 3, (4, 6)),
                           [[200, -200, 0.5, -0.5, 1.27, -1.9]]]).reshape(5, 6))
    scale = nd(rs.uniform(20, 100, (5, 1)))
    head = rs.normal(0, 1, (5, 6)).astype(np.float32)
    x.attach_grad()
    with autograd.record():
        y = ops.quantize(mx.nd, x, scale, 8)
    y.backward(nd(head))
    # grad = head * scale, one float32 multiply as in MXNet's backward: exact
    expected = (head * scale.asnumpy()).astype(np.float32)
    np.testing.assert_array_equal(x.grad.asnumpy(), expected)
    assert np.abs(y.asnumpy()).max() == 127  # saturated entries still pass the gradient


def test_quantize_activation_gradient_masked_outside_range(activation_path):
    """Straight-through inside the range: d codes / dx = scale where lo <= x*s <= hi (the
    product before rounding), 0 elsewhere (a clipped input cannot move its code)."""
    scale = np.float32(2.0)
    # x * 2 = 126.4, 127 (edge: kept), 127.4, 127.5, 200, -127 (edge: kept), -127.6, -400,
    # 0.6, -3
    x_np = np.array([63.2, 63.5, 63.7, 63.75, 100, -63.5, -63.8, -200, 0.3, -1.5], np.float32)
    inside = [True, True, False, False, False, True, False, False, True, True]
    head = np.arange(1, 11).astype(np.float32)
    x = nd(x_np)
    x.attach_grad()
    with autograd.record():
        y = ops.quantize_activation(mx.nd, x, nd([scale]), 8)
    y.backward(nd(head))
    np.testing.assert_array_equal(x.grad.asnumpy(), np.where(inside, head * scale, 0))

    rs = np.random.RandomState(0)
    x_np = rs.uniform(-5, 5, 10_000).astype(np.float32)
    x = nd(x_np)
    x.attach_grad()
    with autograd.record():
        y = ops.quantize_activation(mx.nd, x, nd([40.0]), 8)
    y.backward()
    product = (x_np * np.float32(40.0)).astype(np.float32)
    expected = np.where(np.abs(product) <= 127, np.float32(40.0), np.float32(0))
    np.testing.assert_array_equal(x.grad.asnumpy(), expected)
    assert (expected == 0).sum() > 1000 and (expected == 40.0).sum() > 1000
    # unsigned: the lower edge is 0
    x = nd([-0.1, 0.0, 0.1, 6.3, 6.4])
    x.attach_grad()
    with autograd.record():
        y = ops.quantize_activation(mx.nd, x, nd([40.0]), 8, signed=False)
    y.backward()
    np.testing.assert_array_equal(y.asnumpy(), [0, 0, 4, 252, 255])
    np.testing.assert_array_equal(x.grad.asnumpy(), [0, 40, 40, 40, 0])


def _fold_bn_f64(w, b, gamma, beta, mean, var, eps, fix_gamma):
    """Independent float64 fold of BN(conv(x, w) + b)."""
    f = (1.0 if fix_gamma else gamma) / np.sqrt(var + eps)
    b = 0.0 if b is None else b
    return w * f.reshape(-1, 1, 1, 1), beta + (b - mean) * f


def test_fold_bn_gradients_match_finite_differences():
    rs = np.random.RandomState(0)
    o, eps = 6, 1e-5
    arrays = dict(w=rs.normal(0, 1, (o, 3, 3, 3)), b=rs.normal(0, 1, o),
                  gamma=rs.uniform(0.5, 1.5, o), beta=rs.normal(0, 1, o),
                  mean=rs.normal(0, 1, o), var=rs.uniform(0.5, 2, o))
    arrays = {k: v.astype(np.float32).astype(np.float64) for k, v in arrays.items()}
    cw = rs.normal(0, 1, (o, 3, 3, 3))
    cb = rs.normal(0, 1, o)

    def loss64(a):
        wf, bf = _fold_bn_f64(a['w'], a['b'], a['gamma'], a['beta'], a['mean'], a['var'],
                              eps, False)
        return (cw * wf).sum() + (cb * bf).sum()

    trained = ('w', 'b', 'gamma', 'beta')
    mx_arrays = {k: nd(v) for k, v in arrays.items()}
    for k in trained:
        mx_arrays[k].attach_grad()
    with autograd.record():
        wf, bf = ops.fold_bn(mx.nd, mx_arrays['w'], mx_arrays['b'], mx_arrays['gamma'],
                             mx_arrays['beta'], mx_arrays['mean'], mx_arrays['var'], eps)
        loss = (wf * nd(cw)).sum() + (bf * nd(cb)).sum()
    loss.backward()
    # float32 autograd vs float64 central differences (h = 1e-6, truncation ~h^2, the loss is
    # at most quadratic in each variable): the difference is float32 rounding of sums of a
    # few dozen O(1) terms, relative 1e-5 of the largest gradient is ample and still tight.
    h, grad_rtol = 1e-6, 1e-5
    for k in trained:
        numeric = np.zeros_like(arrays[k])
        for idx in np.ndindex(*arrays[k].shape):
            plus = {**arrays, k: arrays[k].copy()}
            minus = {**arrays, k: arrays[k].copy()}
            plus[k][idx] += h
            minus[k][idx] -= h
            numeric[idx] = (loss64(plus) - loss64(minus)) / (2 * h)
        got = mx_arrays[k].grad.asnumpy()
        scale = np.abs(numeric).max()
        assert scale > 0.1
        assert np.abs(got - numeric).max() <= grad_rtol * scale, k


# ----- ranges and scales ---------------------------------------------------------------
@pytest.mark.parametrize('threshold', [0.0, -1.0, np.nan, np.inf, -np.inf, 1e-30, 1e30, 2.5])
@pytest.mark.parametrize('bits', [8, 4])
def test_scale_from_threshold_guard(threshold, bits):
    got = ops.scale_from_threshold(mx.nd, nd([threshold]), bits).asnumpy()
    assert np.all(np.isfinite(got)) and np.all(got > 0)
    high = ops.qrange(bits)[1]
    expected = (np.float32(high) / ref.safe_threshold([threshold])).astype(np.float32)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, ref.scale_from_threshold([threshold], bits))
    # product of two extreme scales (input x weight) stays finite
    assert np.isfinite(np.float32(got[0]) * np.float32(got[0]))


def test_safe_threshold_clamps():
    t = ref.safe_threshold([0.0, -1.0, np.nan, np.inf, 1e-30, 1e30, 3.0])
    np.testing.assert_array_equal(
        t, np.array([ops.MIN_THRESHOLD, ops.MIN_THRESHOLD, ops.MIN_THRESHOLD,
                     ops.MAX_THRESHOLD, ops.MIN_THRESHOLD, ops.MAX_THRESHOLD, 3.0], np.float32))


def _explicit_weight_threshold(w, groups, granularity):
    """max |w| by an explicit loop over output channels / groups."""
    w = np.abs(w)
    o = w.shape[0]
    if granularity == 'tensor':
        return np.full(o, w.max(), np.float32)
    per = o // groups
    return np.array([w[(c // per) * per:(c // per + 1) * per].max() if groups > 1
                     else w[c].max() for c in range(o)], np.float32)


@pytest.mark.parametrize('shape,groups', [
    ((16, 8, 3, 3), 1),          # plain conv: per output channel
    ((8, 1, 3, 3), 8),           # depthwise, groups == C: per channel == per group
    ((8, 4, 3, 3), 2),           # grouped 1 < g < C_out: one value per group of 4
    ((12, 2, 1, 1), 3),          # grouped, 1x1
    ((10, 32), 1),               # Dense
])
@pytest.mark.parametrize('granularity', ['channel', 'tensor'])
def test_weight_threshold(shape, groups, granularity):
    rs = np.random.RandomState(0)
    w = rs.normal(0, 1, shape).astype(np.float32)
    w[0] *= 10  # makes channel 0 / group 0 distinct from the rest
    got = ops.weight_threshold(mx.nd, nd(w), shape[0], groups, granularity).asnumpy()
    assert got.shape == (shape[0],)
    np.testing.assert_array_equal(got, ref.weight_threshold(w, groups, granularity))
    np.testing.assert_array_equal(got, _explicit_weight_threshold(w, groups, granularity))
    if granularity == 'channel' and groups > 1 and shape[0] != groups:
        per = shape[0] // groups
        assert np.all(got[:per] == got[0]) and got[per] < got[0]


def test_weight_threshold_has_no_gradient():
    w = nd(np.random.RandomState(0).normal(0, 1, (4, 2, 3, 3)))
    w.attach_grad()
    with autograd.record():
        t = ops.weight_threshold(mx.nd, w, 4, 1, 'channel')
        s = ops.scale_from_threshold(mx.nd, t, 8)
        loss = (t + s).sum()
    loss.backward()
    np.testing.assert_array_equal(w.grad.asnumpy(), 0)


# ----- batchnorm folding ---------------------------------------------------------------
@pytest.mark.parametrize('with_bias', [True, False])
@pytest.mark.parametrize('fix_gamma', [False, True])
def test_fold_bn_matches_reference(with_bias, fix_gamma):
    rs = np.random.RandomState(0)
    o, eps = 8, 1e-3
    w = rs.normal(0, 1, (o, 4, 3, 3)).astype(np.float32)
    b = rs.normal(0, 1, o).astype(np.float32) if with_bias else None
    gamma = rs.uniform(-1.5, 1.5, o).astype(np.float32)
    beta, mean = rs.normal(0, 1, (2, o)).astype(np.float32)
    var = rs.uniform(0.01, 3, o).astype(np.float32)
    wf, bf = ops.fold_bn(mx.nd, nd(w), None if b is None else nd(b), nd(gamma), nd(beta),
                         nd(mean), nd(var), eps, fix_gamma)
    rw, rb = ref.fold_bn(w, b, gamma, beta, mean, var, eps, fix_gamma)
    # MXNet's rsqrt may differ from numpy's 1/sqrt by an ulp; after one more multiply the
    # folded values agree within a few float32 roundings (relative).
    fold_rtol = 4 * F32_EPS
    np.testing.assert_allclose(wf.asnumpy(), rw, rtol=fold_rtol, atol=0)
    np.testing.assert_allclose(bf.asnumpy(), rb, rtol=fold_rtol,
                               atol=fold_rtol * np.abs(rb).max())
    # and the oracle agrees with the float64 definition
    ew, eb = _fold_bn_f64(w.astype(np.float64), None if b is None else b.astype(np.float64),
                          gamma.astype(np.float64), beta, mean, var, eps, fix_gamma)
    np.testing.assert_allclose(rw, ew, rtol=fold_rtol)
    np.testing.assert_allclose(rb, eb, rtol=fold_rtol, atol=fold_rtol * np.abs(eb).max())


def test_fold_bn_bn_of_conv_identity():
    """conv(x, w') + b' == BN_running(conv(x, w) + b), checked numerically in float64."""
    rs = np.random.RandomState(3)
    o, eps = 4, 1e-5
    x = rs.normal(0, 1, (2, 3, 6, 6))
    w, (b, gamma, beta, mean) = rs.normal(0, 1, (o, 3, 3, 3)), rs.normal(0, 1, (4, o))
    var = rs.uniform(0.5, 2, o)
    wf, bf = ref.fold_bn(w, b, gamma, beta, mean, var, eps)
    folded = naive_conv2d_f64(x, wf, bf, pad=(1, 1))
    r = lambda a: a.reshape(1, -1, 1, 1)
    bn = r(gamma) * (naive_conv2d_f64(x, w, b, pad=(1, 1)) - r(mean)) / np.sqrt(r(var) + eps) \
        + r(beta)
    # float32 folded parameters: error ~ a few eps32 of sum |x * w| (27 terms of O(1))
    tol = 16 * F32_EPS * np.abs(naive_conv2d_f64(np.abs(x), np.abs(wf), pad=(1, 1))).max()
    assert np.abs(folded - bn).max() <= tol


# ----- the same formulas in a symbolic graph ---------------------------------------------
def test_ops_symbolic_equal_imperative():
    rs = np.random.RandomState(0)
    x = rs.uniform(-2, 2, (8, 4, 3, 3)).astype(np.float32)
    s = rs.uniform(20, 90, (8, 1, 1, 1)).astype(np.float32)
    sx, ss = mx.sym.var('x'), mx.sym.var('s')
    sym_q = ops.quantize(mx.sym, sx, ss, 8).eval(ctx=mx.cpu(), x=nd(x), s=nd(s))[0]
    np.testing.assert_array_equal(sym_q.asnumpy(), q_nd(x, s))
    sym_a = ops.quantize_activation(mx.sym, sx, ss, 8).eval(ctx=mx.cpu(), x=nd(x),
                                                            s=nd([50.0]))[0]
    np.testing.assert_array_equal(sym_a.asnumpy(), qa_nd(x, 50.0))
    sym_t = ops.weight_threshold(mx.sym, sx, 8, 2, 'channel').eval(ctx=mx.cpu(), x=nd(x))[0]
    np.testing.assert_array_equal(sym_t.asnumpy(), ref.weight_threshold(x, 2))
    sym_s = ops.scale_from_threshold(mx.sym, sx, 8).eval(
        ctx=mx.cpu(), x=nd([0.0, np.nan, np.inf, 3.0]))[0]
    np.testing.assert_array_equal(sym_s.asnumpy(),
                                  ref.scale_from_threshold([0.0, np.nan, np.inf, 3.0], 8))


def _codes_f64(product, saturate=True):
    """Codes of a float32 product by the rounding rule written on the exact value (float64):
    |v| + 1/2 floored, sign restored (half away from zero). Equal to ncnn's float32 rule for
    every value except +-0.49999997, which the data here avoids."""
    v = np.asarray(product, np.float32).astype(np.float64)
    assert not np.any(np.abs(v) == HALF_MINUS)
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)
    return np.clip(q, -127, 127) if saturate else q


# ----- the oracle's integer convolution ----------------------------------------------------
@pytest.mark.parametrize('cfg', [
    dict(cin=4, cout=6, k=3, stride=(1, 1), pad=(1, 1), dilate=(1, 1), groups=1),
    dict(cin=4, cout=6, k=3, stride=(2, 1), pad=(1, 2), dilate=(2, 1), groups=2),
    dict(cin=6, cout=6, k=3, stride=(2, 2), pad=(1, 1), dilate=(1, 1), groups=6),
    dict(cin=6, cout=12, k=1, stride=(1, 1), pad=(0, 0), dilate=(1, 1), groups=3),
    dict(cin=3, cout=5, k=5, stride=(3, 2), pad=(2, 0), dilate=(1, 2), groups=1),
], ids=['plain', 'grouped-strided-dilated', 'depthwise-s2', 'grouped-1x1', 'k5'])
def test_reference_int8_conv2d_vs_float64(cfg):
    rs = np.random.RandomState(0)
    k, groups = cfg['k'], cfg['groups']
    x = rs.uniform(-2, 2, (2, cfg['cin'], 9, 10)).astype(np.float32)
    w = rs.normal(0, 0.5, (cfg['cout'], cfg['cin'] // groups, k, k)).astype(np.float32)
    bias = rs.normal(0, 1, cfg['cout']).astype(np.float32)
    s_in = np.float32(127) / np.float32(1.7)  # threshold below max|x|: some codes saturate
    s_w = ref.scale_from_threshold(ref.weight_threshold(w, groups), 8)
    out = ref.int8_conv2d(x, w, bias, s_in, s_w, cfg['stride'], cfg['pad'], cfg['dilate'],
                          groups)
    # independent: codes by the plain rule in float64, direct convolution, float64 dequantize
    x_q = _codes_f64((x * s_in).astype(np.float32))
    w_q = _codes_f64((w * s_w.reshape(-1, 1, 1, 1)).astype(np.float32))
    assert np.abs(x_q).max() == 127 and np.abs(w_q).max() == 127
    acc = naive_conv2d_f64(x_q, w_q, None, cfg['stride'], cfg['pad'], cfg['dilate'], groups)
    mult = 1.0 / (np.float64(s_in) * s_w.astype(np.float64))
    expected = acc * mult.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)
    assert out.shape == expected.shape and out.dtype == np.float32
    # ncnn's float32 dequantize: multiplier rounded once, product once, sum once; 3 roundings
    # of values bounded by |acc * mult| + |bias|.
    magnitude = np.abs(acc * mult.reshape(1, -1, 1, 1)) + np.abs(bias).reshape(1, -1, 1, 1)
    assert np.all(np.abs(out - expected) <= 3 * F32_EPS * magnitude)


def test_reference_int8_dense_vs_float64():
    rs = np.random.RandomState(0)
    x = rs.uniform(-2, 2, (4, 2, 3, 3)).astype(np.float32)  # flattened c-major to 18
    w = rs.normal(0, 0.5, (7, 18)).astype(np.float32)
    bias = rs.normal(0, 1, 7).astype(np.float32)
    s_in = np.float32(127 / 1.5)
    s_w = ref.scale_from_threshold(ref.weight_threshold(w), 8)
    out = ref.int8_dense(x, w, bias, s_in, s_w)
    x_q = _codes_f64((x.reshape(4, -1) * s_in).astype(np.float32))
    w_q = _codes_f64((w * s_w.reshape(-1, 1)).astype(np.float32))
    acc = np.einsum('ni,oi->no', x_q, w_q)
    mult = 1.0 / (float(s_in) * s_w.astype(np.float64))
    expected = acc * mult + bias
    magnitude = np.abs(acc * mult) + np.abs(bias)
    assert np.all(np.abs(out - expected) <= 3 * F32_EPS * magnitude)


def test_reference_conv2d_int_overflow_guard():
    x = np.full((1, 1, 1, 1), 2 ** 20, np.int64)
    w = np.full((1, 1, 1, 1), 2 ** 12, np.int64)
    with pytest.raises(AssertionError, match='overflow'):
        ref.conv2d_int(x, w)
