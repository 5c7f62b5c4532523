"""The fake-quantized blocks against the numpy oracle: int8 conv / dense, fake batchnorm,
hybridized vs imperative, and the input range tracker."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon
from mxnet.gluon import nn

import qat
from qat import ops
from qat import reference as ref
from qat.nn import QConv2D, QConv2DBatchNorm, QDense
from tests.helpers import (F32_EPS, naive_conv2d_f64, params_by_name, params_numpy,
                           randomize_bn, sgd_step, small_net)

# MXNet dequantizes with a 1x1 depthwise convolution, which may compute acc * m + b with one
# fused multiply-add where ncnn's reference rounds the product and then the sum: the results
# differ by at most one float32 rounding of the larger of |acc * m| and |out| (observed: 0 or
# exactly 1 ulp). The integer codes and accumulators themselves are exact.
DEQUANT_ULPS = 1
# QDense dequantizes with broadcast multiply then broadcast add: the same two float32
# roundings as the reference, so the outputs are bit-identical.
DENSE_TOL = 0
# Float32 convolution sums (<= 72 terms here) and BatchNorm normalisation against float64
# recomputations: ~100 eps32 relative to the output's scale.
FP32_RTOL = 1e-5
# The imperative and the hybridized graph run the same MXNet operators in the same order
# (Gluon's CachedOp applies no graph fusion on CPU by default): bit-identical results.
HYBRID_TOL = 0


def rand(shape, seed=0, low=-2.0, high=2.0):
    return np.random.RandomState(seed).uniform(low, high, shape).astype(np.float32)


def wrap(*blocks, prefix='w_'):
    net = nn.HybridSequential(prefix=prefix)
    net.add(*blocks)
    return net


def dequant_bound(x, w, s_in, s_w, bias, **conv):
    """Per-element bound DEQUANT_ULPS * ulp(max(|acc * m|, |out|)) for the int8 conv."""
    x_q = ref.quantize(x, s_in)
    w_q = ref.quantize(w, np.asarray(s_w, np.float32).reshape(-1, 1, 1, 1))
    acc = ref.conv2d_int(x_q, w_q, **conv).astype(np.float64)
    mult = 1.0 / (np.float64(s_in) * s_w.astype(np.float64))
    product = np.abs(acc * mult.reshape(1, -1, 1, 1))
    out = product + (0 if bias is None else np.abs(bias).reshape(1, -1, 1, 1))
    return DEQUANT_ULPS * np.spacing(np.maximum(product, out).astype(np.float32))


# ----- int8 conv and dense against ncnn's arithmetic -------------------------------------
CONV_CASES = {
    'plain-8to16': dict(cin=8, cout=16, k=3, groups=1, stride=1, pad=1, dilate=1, bias=True),
    'depthwise': dict(cin=8, cout=8, k=3, groups=8, stride=1, pad=1, dilate=1, bias=True),
    'grouped-2': dict(cin=8, cout=8, k=3, groups=2, stride=1, pad=1, dilate=1, bias=True),
    'strided-dilated-nobias': dict(cin=4, cout=6, k=3, groups=1, stride=2, pad=2, dilate=2,
                                   bias=False),
    'grouped-1x1-relu': dict(cin=6, cout=9, k=1, groups=3, stride=1, pad=0, dilate=1,
                             bias=True, act='relu'),
}


@pytest.mark.parametrize('granularity', ['channel', 'tensor'])
@pytest.mark.parametrize('case', list(CONV_CASES), ids=list(CONV_CASES))
def test_qconv2d_equals_int8_reference(case, granularity):
    c = CONV_CASES[case]
    mx.random.seed(1)
    conv = nn.Conv2D(c['cout'], c['k'], strides=c['stride'], padding=c['pad'],
                     dilation=c['dilate'], groups=c['groups'], in_channels=c['cin'],
                     use_bias=c['bias'], activation=c.get('act'))
    conv.initialize(mx.init.Xavier())
    w = conv.weight.data().asnumpy()
    w[0] *= 3  # channel / group 0 gets a distinct range
    conv.weight.set_data(mx.nd.array(w))
    bias = None
    if c['bias']:
        bias = rand(c['cout'], seed=2, low=-1, high=1)
        conv.bias.set_data(mx.nd.array(bias))
    net = wrap(conv)
    qat.convert_model(net, config=qat.QuantConfig(weight_granularity=granularity))
    block = net[0]
    assert type(block) is QConv2D and block.mode['quantize_input']
    threshold = 1.7  # below max|x| = 2: the largest inputs saturate at +-127
    block.set_input_threshold(threshold)
    x = rand((2, c['cin'], 9, 9), seed=3)
    out = net(mx.nd.array(x)).asnumpy()

    s_in = np.float32(127) / np.float32(threshold)
    groups = c['groups']
    if granularity == 'tensor':
        s_w = np.full(c['cout'], np.float32(127) / np.abs(w).max(), np.float32)
    elif groups == 1:
        s_w = (np.float32(127) / np.abs(w).reshape(c['cout'], -1).max(axis=1)).astype(np.float32)
    else:  # one scale per group, repeated over the group's output channels
        per_group = np.abs(w).reshape(groups, -1).max(axis=1)
        s_w = np.repeat(np.float32(127) / per_group, c['cout'] // groups).astype(np.float32)
    conv_args = dict(stride=(c['stride'],) * 2, pad=(c['pad'],) * 2,
                     dilate=(c['dilate'],) * 2, groups=groups)
    expected = ref.int8_conv2d(x, w, bias, s_in, s_w, **conv_args)
    assert np.abs(ref.quantize(x, s_in)).max() == 127
    if c.get('act') == 'relu':
        expected = np.maximum(expected, 0)
    assert out.shape == expected.shape
    bound = dequant_bound(x, w, s_in, s_w, bias, **conv_args)
    assert np.all(np.abs(out - expected) <= bound)


@pytest.mark.parametrize('flatten', [True, False])
@pytest.mark.parametrize('with_bias', [True, False])
def test_qdense_equals_int8_reference(flatten, with_bias):
    mx.random.seed(1)
    dense = nn.Dense(7, in_units=18, flatten=flatten, use_bias=with_bias)
    dense.initialize(mx.init.Xavier())
    bias = None
    if with_bias:
        bias = rand(7, seed=2, low=-1, high=1)
        dense.bias.set_data(mx.nd.array(bias))
    net = wrap(dense)
    qat.convert_model(net)
    assert type(net[0]) is QDense
    net[0].set_input_threshold(1.5)
    shape = (4, 2, 3, 3) if flatten else (2, 3, 18)
    x = rand(shape, seed=3)
    out = net(mx.nd.array(x)).asnumpy()
    w = dense.weight.data().asnumpy()
    s_w = ref.scale_from_threshold(ref.weight_threshold(w), 8)
    s_in = np.float32(127) / np.float32(1.5)
    rows = x.reshape(-1, 18)
    expected = ref.int8_dense(rows, w, bias, s_in, s_w)
    expected = expected if flatten else expected.reshape(2, 3, 7)
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= DENSE_TOL


def test_qconv2d_weights_only():
    """Input quantization off: conv(x, Q(w)) with Q(w) = codes / s_w, float input."""
    mx.random.seed(0)
    conv = nn.Conv2D(6, 3, padding=1, in_channels=4, groups=2)
    conv.initialize(mx.init.Xavier())
    net = wrap(conv)
    qat.convert_model(net)
    qat.quantize_input(net, False)
    x = rand((2, 4, 7, 7))
    out = net(mx.nd.array(x)).asnumpy()
    w, b = conv.weight.data().asnumpy(), conv.bias.data().asnumpy()
    s_w = ref.scale_from_threshold(ref.weight_threshold(w, 2), 8)
    dequantized = ref.quantize(w, s_w.reshape(-1, 1, 1, 1)) / s_w.reshape(-1, 1, 1, 1)
    expected = naive_conv2d_f64(x, dequantized, b, pad=(1, 1), groups=2)
    magnitude = naive_conv2d_f64(np.abs(x), np.abs(dequantized), np.abs(b), pad=(1, 1),
                                 groups=2)
    assert np.all(np.abs(out - expected) <= FP32_RTOL * magnitude.max())
    assert not np.allclose(out, naive_conv2d_f64(x, w, b, pad=(1, 1), groups=2), atol=1e-4)


# ----- fake batchnorm --------------------------------------------------------------------
def _train_pair(net_a, net_b, steps, seed=0):
    rs = np.random.RandomState(seed)
    trainers = [gluon.Trainer(n.collect_params(), 'sgd', {'learning_rate': 0.1})
                for n in (net_a, net_b)]
    outputs = []
    for _ in range(steps):
        x = mx.nd.array(rs.uniform(-1, 1, (4, 3, 6, 6)))
        labels = mx.nd.array(rs.randint(0, 5, 4))
        outputs.append([sgd_step(n, t, x, labels) for n, t in zip((net_a, net_b), trainers)])
    return outputs


def test_fake_bn_disabled_trains_like_separate_conv_and_bn():
    folded = small_net(seed=0)
    separate = small_net(seed=0)
    qat.convert_model(folded, config=qat.QuantConfig(fake_bn=True))
    qat.convert_model(separate, config=qat.QuantConfig(fake_bn=False))
    assert type(folded[0]) is QConv2DBatchNorm
    assert type(separate[0]) is QConv2D and type(separate[1]) is nn.BatchNorm
    qat.disable_quantize(folded)
    qat.disable_quantize(separate)
    before = params_by_name(folded)
    # Disabled, both run Convolution then BatchNorm on the same parameters and batches:
    # bit-identical outputs, parameters and running statistics (tolerance 0).
    for out_a, out_b in _train_pair(folded, separate, steps=5):
        np.testing.assert_array_equal(out_a, out_b)
    pa, pb = params_by_name(folded), params_by_name(separate)
    assert pa.keys() == pb.keys()
    # the saved configs are the two given ones (they differ in fake_bn by construction)
    assert qat.QuantConfig.from_vector(pa['conv0_qconfig']) == folded[0].config
    assert qat.QuantConfig.from_vector(pb['conv0_qconfig']) == separate[0].config
    for key in pa:
        if not key.endswith('qconfig'):
            np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)
    for key in ('batchnorm0_gamma', 'batchnorm0_beta', 'batchnorm0_running_mean',
                'batchnorm0_running_var', 'conv0_weight'):
        assert not np.array_equal(pa[key], before[key]), key  # they did train


def _conv_bn(momentum=0.8, conv_bias=True, seed=0):
    mx.random.seed(seed)
    net = nn.HybridSequential(prefix='cb_')
    with net.name_scope():
        net.add(nn.Conv2D(8, 3, padding=1, in_channels=3, use_bias=conv_bias),
                nn.BatchNorm(in_channels=8, momentum=momentum))
    net.initialize(mx.init.Xavier())
    rs = np.random.RandomState(seed)
    randomize_bn(net, rs)
    if conv_bias:
        net[0].bias.set_data(mx.nd.array(rs.uniform(-0.5, 0.5, 8)))
    return net


def _folded(block):
    """(w', b') of a QConv2DBatchNorm from its current parameters, with ops.fold_bn (the same
    float32 operations as the block, so the weight codes below are identical)."""
    bias = block.bias.data() if getattr(block, 'bias', None) is not None else None
    eps = block._bn_kwargs['eps']
    w, b = ops.fold_bn(mx.nd, block.weight.data(), bias, block.gamma.data(),
                       block.beta.data(), block.running_mean.data(),
                       block.running_var.data(), eps, block._bn_kwargs['fix_gamma'])
    return w.asnumpy(), b.asnumpy()


@pytest.mark.parametrize('conv_bias', [True, False])
def test_fake_bn_training_math_weights_only(conv_bias):
    """Docstring of QConv2DBatchNorm: z = conv(x, Q(w')) / f + b with w' = w * f,
    f = gamma / sqrt(var_running + eps); y = BN_batch(z); running statistics updated with the
    batch statistics of z (biased variance, MXNet's convention)."""
    momentum = 0.8
    net = _conv_bn(momentum, conv_bias)
    qat.convert_model(net)
    qat.quantize_input(net, False)
    block = net[0]
    assert type(block) is QConv2DBatchNorm
    eps = block._bn_kwargs['eps']
    gamma = block.gamma.data().asnumpy()
    beta = block.beta.data().asnumpy()
    rm0 = block.running_mean.data().asnumpy().copy()
    rv0 = block.running_var.data().asnumpy().copy()
    b = block.bias.data().asnumpy() if conv_bias else np.zeros(8, np.float32)
    w_fold, _ = _folded(block)
    factor = gamma.astype(np.float64) / np.sqrt(rv0.astype(np.float64) + eps)
    s_w = ref.scale_from_threshold(ref.weight_threshold(w_fold), 8)
    codes = ref.quantize(w_fold, s_w.reshape(-1, 1, 1, 1))

    x = rand((4, 3, 6, 6), seed=5, low=-1, high=1)
    with autograd.record():
        out = net(mx.nd.array(x))
    # MXNet 1.9's BatchNorm updates its running statistics in the backward pass
    out.backward(mx.nd.array(rand(out.shape, seed=6)))
    out = out.asnumpy()

    r = lambda a: np.asarray(a, np.float64).reshape(1, -1, 1, 1)
    z = naive_conv2d_f64(x, codes, pad=(1, 1)) / r(s_w * factor) + r(b)
    mean, var = z.mean(axis=(0, 2, 3)), z.var(axis=(0, 2, 3))
    expected = r(gamma) * (z - r(mean)) / np.sqrt(r(var) + eps) + r(beta)
    assert np.abs(out - expected).max() <= FP32_RTOL * np.abs(expected).max()
    # the weights really are quantized: not the float BN(conv) output
    float_z = naive_conv2d_f64(x, block.weight.data().asnumpy(), pad=(1, 1)) + r(b)
    float_y = r(gamma) * (float_z - float_z.mean(axis=(0, 2, 3), keepdims=True)) \
        / np.sqrt(float_z.var(axis=(0, 2, 3), keepdims=True) + eps) + r(beta)
    assert np.abs(out - float_y).max() > 100 * FP32_RTOL * np.abs(expected).max()
    # running statistics: EMA of the batch statistics of z
    rm = block.running_mean.data().asnumpy()
    rv = block.running_var.data().asnumpy()
    np.testing.assert_allclose(rm, momentum * rm0 + (1 - momentum) * mean, rtol=0,
                               atol=FP32_RTOL * np.abs(rm).max())
    np.testing.assert_allclose(rv, momentum * rv0 + (1 - momentum) * var, rtol=FP32_RTOL)


def test_fake_bn_frozen_is_the_deployed_fused_conv():
    net = _conv_bn()
    qat.convert_model(net)
    qat.quantize_input(net, False)
    qat.freeze_bn(net)
    block = net[0]
    assert block.mode['bn_frozen']
    w_fold, b_fold = _folded(block)
    s_w = ref.scale_from_threshold(ref.weight_threshold(w_fold), 8)
    dequantized = ref.quantize(w_fold, s_w.reshape(-1, 1, 1, 1)) / s_w.reshape(-1, 1, 1, 1)
    running = [block.running_mean.data().asnumpy().copy(),
               block.running_var.data().asnumpy().copy()]
    trainer = gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.1})
    x = rand((4, 3, 6, 6), seed=5, low=-1, high=1)
    xs = mx.nd.array(x)
    with autograd.record():  # training mode
        out = net(xs)
        loss = (out * mx.nd.array(rand(out.shape, seed=6))).sum()
    loss.backward()
    trainer.step(1)
    out = out.asnumpy()
    expected = naive_conv2d_f64(x, dequantized, b_fold, pad=(1, 1))
    magnitude = naive_conv2d_f64(np.abs(x), np.abs(dequantized), np.abs(b_fold), pad=(1, 1))
    assert np.all(np.abs(out - expected) <= FP32_RTOL * magnitude.max())
    # running statistics no longer change (forward, backward and update done)
    np.testing.assert_array_equal(block.running_mean.data().asnumpy(), running[0])
    np.testing.assert_array_equal(block.running_var.data().asnumpy(), running[1])
    # while gamma and beta still train (through the fold)
    assert block.gamma.grad().abs().sum().asscalar() > 0
    assert block.beta.grad().abs().sum().asscalar() > 0


def test_fake_bn_frozen_with_input_quantization_equals_int8_reference():
    net = _conv_bn()
    qat.convert_model(net)
    qat.freeze_bn(net)
    block = net[0]
    block.set_input_threshold(0.9)
    x = rand((2, 3, 7, 7), seed=5, low=-1, high=1)
    out = net(mx.nd.array(x)).asnumpy()
    w_fold, b_fold = _folded(block)
    s_in = np.float32(127) / np.float32(0.9)
    s_w = ref.scale_from_threshold(ref.weight_threshold(w_fold), 8)
    expected = ref.int8_conv2d(x, w_fold, b_fold, s_in, s_w, pad=(1, 1))
    bound = dequant_bound(x, w_fold, s_in, s_w, b_fold, pad=(1, 1))
    assert np.all(np.abs(out - expected) <= bound)


def test_fake_bn_zero_gamma_channel():
    """A zero gamma folds to zero weights; training mode gives exactly beta there, no NaN."""
    net = _conv_bn()
    gamma = net[1].gamma.data().asnumpy()
    gamma[[2, 5]] = 0
    net[1].gamma.set_data(mx.nd.array(gamma))
    qat.convert_model(net)
    x = mx.nd.array(rand((2, 3, 6, 6), seed=5))
    beta = net[0].beta.data().asnumpy()
    for frozen in (False, True):
        qat.freeze_bn(net, frozen)
        with autograd.record():
            out = net(x)
        out = out.asnumpy()
        assert np.all(np.isfinite(out))
        for c in (2, 5):
            np.testing.assert_array_equal(out[:, c], np.full_like(out[:, c], beta[c]))


# ----- hybridized == imperative ----------------------------------------------------------
def _two_conv_net(seed=0):
    mx.random.seed(seed)
    net = nn.HybridSequential(prefix='hy_')
    with net.name_scope():
        net.add(nn.Conv2D(8, 3, padding=1, in_channels=3), nn.BatchNorm(in_channels=8),
                nn.Activation('relu'),
                nn.Conv2D(8, 3, padding=1, groups=2, in_channels=8, activation='relu'),
                nn.GlobalAvgPool2D(), nn.Dense(5, in_units=8))
    net.initialize(mx.init.Xavier())
    randomize_bn(net, np.random.RandomState(seed))
    return net


def test_hybridized_equals_imperative_forward_and_training():
    imperative, hybrid = _two_conv_net(), _two_conv_net()
    qat.convert_model(imperative)
    qat.convert_model(hybrid)
    hybrid.hybridize()
    x = mx.nd.array(rand((4, 3, 8, 8), seed=7, low=-1, high=1))
    for mode in ('default', 'online', 'weights-only', 'set-range'):
        for net in (imperative, hybrid):
            if mode == 'online':
                qat.quantize_input(net, online=True)
            elif mode == 'weights-only':
                qat.quantize_input(net, False)
            elif mode == 'set-range':
                qat.quantize_input(net, True)
                for _, block in qat.quant_blocks(net):
                    block.set_input_threshold(0.75)
        a, b = imperative(x).asnumpy(), hybrid(x).asnumpy()
        assert np.abs(a - b).max() <= HYBRID_TOL, mode
    # training with input quantization on, ranges tracked (offline mode, unset ranges)
    imperative, hybrid = _two_conv_net(), _two_conv_net()
    qat.convert_model(imperative)
    qat.convert_model(hybrid)
    hybrid.hybridize()
    for out_i, out_h in _train_pair(imperative, hybrid, steps=3, seed=1):
        assert np.abs(out_i - out_h).max() <= HYBRID_TOL
    pi, ph = params_numpy(imperative), params_numpy(hybrid)
    assert pi.keys() == ph.keys() and any(k.endswith('range_ema') for k in pi)
    for key in pi:  # weights, BN statistics, range trackers, modes
        assert np.abs(pi[key] - ph[key]).max() <= HYBRID_TOL, key
    assert not np.array_equal(pi['0.weight'], params_numpy(_two_conv_net())['0.weight'])


# ----- the input range tracker -----------------------------------------------------------
def _single_conv(momentum=0.8, tracker='ema'):
    mx.random.seed(0)
    conv = nn.Conv2D(4, 3, in_channels=2)
    conv.initialize(mx.init.Xavier())
    net = wrap(conv, prefix='t_')
    qat.convert_model(net, config=qat.QuantConfig(range_momentum=momentum,
                                                  range_tracker=tracker))
    return net


def _batch_with_max(peak, seed):
    x = rand((2, 2, 5, 5), seed=seed, low=-0.5, high=0.5)
    x[1, 1, 2, 3] = -peak if seed % 2 else peak  # max |x| = peak, sign varies
    return x


def _expected_conv(net, x, threshold):
    block = net[0]
    w, b = block.weight.data().asnumpy(), block.bias.data().asnumpy()
    s_in = ref.scale_from_threshold(np.float32(threshold), 8)
    s_w = ref.scale_from_threshold(ref.weight_threshold(w), 8)
    return ref.int8_conv2d(x, w, b, s_in, s_w), dequant_bound(x, w, s_in, s_w, b)


@pytest.mark.parametrize('hybridize', [False, True], ids=['imperative', 'hybridized'])
def test_ema_tracker_follows_bias_corrected_ema(hybridize):
    momentum = 0.8
    net = _single_conv(momentum)
    if hybridize:
        net.hybridize()
    peaks = [1.0, 3.0, 2.0, 5.0]
    m_x = m_1 = 0.0
    for i, peak in enumerate(peaks):
        x = mx.nd.array(_batch_with_max(peak, seed=i))
        with autograd.record():  # a full training step's forward and backward
            out = net(x)
        out.backward()
        m_x = momentum * m_x + (1 - momentum) * peak
        m_1 = momentum * m_1 + (1 - momentum)
        got = net[0].input_threshold()
        # float32 EMA arithmetic over a few updates: a few eps32 relative
        assert got is not None and got == pytest.approx(m_x / m_1, rel=8 * F32_EPS), i


@pytest.mark.parametrize('hybridize', [False, True], ids=['imperative', 'hybridized'])
def test_tracker_unchanged_in_inference_and_used(hybridize):
    net = _single_conv()
    if hybridize:
        net.hybridize()
    net[0].set_input_threshold(0.4)
    state = net[0].range_ema.data().asnumpy().copy()
    for seed, peak in enumerate([1.0, 3.0]):
        x = _batch_with_max(peak, seed)
        out = net(mx.nd.array(x)).asnumpy()
        expected, bound = _expected_conv(net, x, 0.4)  # the tracked range, not the batch's
        assert np.all(np.abs(out - expected) <= bound)
        np.testing.assert_array_equal(net[0].range_ema.data().asnumpy(), state)
    assert net[0].input_threshold() == pytest.approx(0.4, rel=F32_EPS)


@pytest.mark.parametrize('training', [False, True], ids=['inference', 'training'])
def test_unset_tracker_falls_back_to_batch_range(training):
    net = _single_conv()
    assert net[0].input_threshold() is None
    x = _batch_with_max(2.5, seed=1)
    with autograd.record(train_mode=training):
        out = net(mx.nd.array(x))
    out = out.asnumpy()
    assert np.all(np.isfinite(out))
    expected, bound = _expected_conv(net, x, 2.5)
    assert np.all(np.abs(out - expected) <= bound)
    if not training:
        assert net[0].input_threshold() is None


def test_online_mode_uses_batch_range():
    net = _single_conv()
    net[0].set_input_threshold(0.4)
    qat.quantize_input(net, online=True)
    x = _batch_with_max(2.5, seed=1)
    out = net(mx.nd.array(x)).asnumpy()
    expected, bound = _expected_conv(net, x, 2.5)
    assert np.all(np.abs(out - expected) <= bound)


def test_frozen_unset_range_is_finite():
    """An unset range after freeze_ranges: the guard keeps the scale finite (no NaN); every
    nonzero input saturates. check_ranges reports it."""
    net = _single_conv()
    assert qat.check_ranges(net) == [net[0].name]
    qat.freeze_ranges(net)
    x = _batch_with_max(2.5, seed=1)
    out = net(mx.nd.array(x)).asnumpy()
    assert np.all(np.isfinite(out))
    expected, bound = _expected_conv(net, x, ops.MIN_THRESHOLD)
    assert np.all(np.abs(out - expected) <= bound)


def test_nan_input_range_is_guarded():
    net = _single_conv()
    net[0].set_input_threshold(np.nan)
    qat.freeze_ranges(net)
    x = _batch_with_max(2.5, seed=1)
    out = net(mx.nd.array(x)).asnumpy()
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize('bits', [4, 2])
def test_qconv2d_low_bits_equals_reference(bits):
    """w{bits}a{bits}: codes in [-(2^(b-1)-1), 2^(b-1)-1] for weights and inputs."""
    mx.random.seed(1)
    conv = nn.Conv2D(6, 3, padding=1, in_channels=4)
    conv.initialize(mx.init.Xavier())
    net = wrap(conv)
    qat.convert_model(net, config=qat.QuantConfig(weight_bits=bits, input_bits=bits))
    net[0].set_input_threshold(1.3)
    x = rand((2, 4, 6, 6), seed=3)
    out = net(mx.nd.array(x)).asnumpy()
    w, b = conv.weight.data().asnumpy(), conv.bias.data().asnumpy()
    high = 2 ** (bits - 1) - 1
    s_in = np.float32(high) / np.float32(1.3)
    s_w = ref.scale_from_threshold(ref.weight_threshold(w), bits)
    np.testing.assert_array_equal(s_w, (np.float32(high) / np.abs(w).reshape(6, -1).max(1)))
    expected = ref.int8_conv2d(x, w, b, s_in, s_w, pad=(1, 1), bits=bits)
    x_q = ref.quantize(x, s_in, bits)
    w_q = ref.quantize(w, s_w.reshape(-1, 1, 1, 1), bits)
    assert np.abs(x_q).max() == high and np.abs(w_q).max() == high
    acc = ref.conv2d_int(x_q, w_q, pad=(1, 1)).astype(np.float64)
    product = np.abs(acc / (np.float64(s_in) * s_w.reshape(1, -1, 1, 1)))
    bound = DEQUANT_ULPS * np.spacing(
        np.maximum(product, product + np.abs(b).reshape(1, -1, 1, 1)).astype(np.float32))
    assert np.all(np.abs(out - expected) <= bound)


def test_qconv2d_unsigned_input():
    """input_signed=False (simulation only): codes of x in [0, 255] with s_in = 255 / T."""
    mx.random.seed(1)
    conv = nn.Conv2D(4, 3, in_channels=3)
    conv.initialize(mx.init.Xavier())
    net = wrap(conv)
    qat.convert_model(net, config=qat.QuantConfig(input_signed=False))
    x = np.maximum(rand((2, 3, 6, 6), seed=3, low=-1, high=2), 0)  # post-ReLU-like
    peak = float(x.max())
    out = net(mx.nd.array(x)).asnumpy()  # unset range: the batch range (max x)
    w, b = conv.weight.data().asnumpy(), conv.bias.data().asnumpy()
    s_in = np.float32(255) / np.float32(peak)
    s_w = ref.scale_from_threshold(ref.weight_threshold(w), 8)
    x_q = ref.quantize(x, s_in, 8, signed=False)
    assert x_q.min() == 0 and x_q.max() == 255
    w_q = ref.quantize(w, s_w.reshape(-1, 1, 1, 1))
    expected = ref.dequantize(ref.conv2d_int(x_q, w_q), s_in, s_w, b)
    acc = ref.conv2d_int(x_q, w_q).astype(np.float64)
    product = np.abs(acc / (np.float64(s_in) * s_w.reshape(1, -1, 1, 1)))
    bound = DEQUANT_ULPS * np.spacing(
        np.maximum(product, product + np.abs(b).reshape(1, -1, 1, 1)).astype(np.float32))
    assert np.all(np.abs(out - expected) <= bound)
