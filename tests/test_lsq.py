"""Learned ranges (LSQ, ``range_tracker='lsq'``): the gradients towards the input and weight
thresholds against LSQ's formula and against finite differences, on the fused and the plain
MXNet paths; the forward pass is unchanged by it; a net trained with learned ranges exports
and verifies bit-exact; checkpoints without the learned ranges still load."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd
from mxnet.gluon import nn

import qat
from qat import native, reference
from qat.config import QuantConfig, QuantScheme
from qat.nn import quant_blocks
from qat.nn.learned import LearnedRangeOptimizer, with_learned_ranges
from tests.helpers import sgd_step

UNITS, FEATURES, BATCH = 5, 12, 6


def _lsq_dense(bits, seed=0):
    """A converted Dense with learned ranges, started from max calibration, then moved so
    that some inputs and some weights are clipped (both branches of the gradient)."""
    rng = np.random.RandomState(seed)
    mx.random.seed(seed)
    dense = nn.Dense(UNITS, in_units=FEATURES)
    dense.initialize(mx.init.Xavier())
    net = nn.HybridSequential()
    net.add(dense)
    x = mx.nd.array(rng.normal(0, 1, (BATCH, FEATURES)))
    qat.convert_model(net, config=QuantScheme(QuantConfig(weight_bits=bits, input_bits=bits,
                                                          range_tracker='lsq')))
    qat.calibrate(net, [x], method='max')
    block = quant_blocks(net)[0][1]
    block.learned_threshold.set_data(block.learned_threshold.data() * 0.7)
    block.weight_learned_threshold.set_data(block.weight_learned_threshold.data() * 0.8)
    return net, block, x, rng.normal(0, 1, (BATCH, UNITS))


def _autograd(net, block, x, r, use_native):
    saved = native._state['ok']
    native._state['ok'] = use_native
    try:
        qat.modes.clear_cached_graphs(net)
        with autograd.record():
            loss = (net(x) * mx.nd.array(r)).sum()
        loss.backward()
        return (block.learned_threshold.grad().asnumpy().astype(np.float64),
                block.weight_learned_threshold.grad().asnumpy().astype(np.float64))
    finally:
        native._state['ok'] = saved
        qat.modes.clear_cached_graphs(net)


def _lsq_reference(block, x, r, bits):
    """LSQ's gradients (Esser et al. 2020, eq. 3 and the gradient scale g) in float64, for the
    thresholds T = qmax * step: dL/dT = qmax^2 g * sum(dL/dv * dv/dstep) / qmax."""
    qmax = 2 ** (bits - 1) - 1
    x = x.asnumpy().astype(np.float64)
    w = block.weight.data().asnumpy().astype(np.float64)
    t_x = float(block.learned_threshold.data().asnumpy()[0])
    t_w = block.weight_learned_threshold.data().asnumpy().astype(np.float64)[:, None]

    def quantized(v, step):
        q = np.clip(np.trunc(v / step + 0.5 * np.sign(v / step)), -qmax, qmax)
        inside = np.abs(v / step) <= qmax
        return q * step, np.where(inside, q - v / step, q)  # value, d value / d step
    x_hat, dx_dstep = quantized(x, t_x / qmax)
    w_hat, dw_dstep = quantized(w, t_w / qmax)
    grad_x_hat, grad_w_hat = r @ w_hat, r.T @ x_hat  # L = sum(r * (x_hat @ w_hat.T + b))
    g_x = 1 / np.sqrt(FEATURES * qmax)
    g_w = 1 / np.sqrt(FEATURES * qmax)  # per output channel: its FEATURES weights
    grad_t_x = qmax ** 2 * g_x * (grad_x_hat * dx_dstep).sum() / qmax
    grad_t_w = qmax ** 2 * g_w * (grad_w_hat * dw_dstep).sum(axis=1) / qmax
    return np.array([grad_t_x]), grad_t_w


def _surrogate_loss(block, x, r, bits, t_x, t_w, offsets):
    """The loss with each code's rounding offset ``round(v/step) - v/step`` held at its value
    at the start (the straight-through estimator) and clipped codes at their bound: smooth in
    the thresholds, so its finite differences are LSQ's gradient without the scale g."""
    qmax = 2 ** (bits - 1) - 1
    x = x.asnumpy().astype(np.float64)
    w = block.weight.data().asnumpy().astype(np.float64)

    def value(v, threshold, offset):
        step = threshold / qmax
        inside = np.abs(v / step) <= qmax
        return np.where(inside, v + step * offset, np.sign(v) * threshold)
    x_hat = value(x, t_x, offsets[0])
    w_hat = value(w, t_w[:, None], offsets[1])
    return (r * (x_hat @ w_hat.T)).sum()


@pytest.mark.parametrize('use_native', [True, False])
@pytest.mark.parametrize('bits', [2, 4, 8])
def test_gradients_equal_lsqs_formula(bits, use_native):
    if use_native and not native.available():
        pytest.skip('no C++ compiler here')
    net, block, x, r = _lsq_dense(bits)
    grad_x, grad_w = _autograd(net, block, x, r, use_native)
    ref_x, ref_w = _lsq_reference(block, x, r, bits)
    np.testing.assert_allclose(grad_x, ref_x, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(grad_w, ref_w, rtol=2e-4, atol=1e-6)
    assert np.abs(grad_w).min() > 0  # every channel's threshold learns


@pytest.mark.parametrize('bits', [2, 4])
def test_gradients_equal_finite_differences(bits):
    net, block, x, r = _lsq_dense(bits, seed=1)
    grad_x, grad_w = _autograd(net, block, x, r, native.available())
    qmax = 2 ** (bits - 1) - 1
    t_x = float(block.learned_threshold.data().asnumpy()[0])
    t_w = block.weight_learned_threshold.data().asnumpy().astype(np.float64)
    xs, w = x.asnumpy().astype(np.float64), block.weight.data().asnumpy().astype(np.float64)

    def offset(v, step):
        return np.trunc(v / step + 0.5 * np.sign(v / step)) - v / step
    offsets = (offset(xs, t_x / qmax), offset(w, t_w[:, None] / qmax))
    g = qmax ** 2 / np.sqrt(FEATURES * qmax)  # the gradient scale of both thresholds

    def loss(tx, tw):
        return _surrogate_loss(block, x, r, bits, tx, tw, offsets)
    eps = 1e-4
    fd_x = (loss(t_x + eps, t_w) - loss(t_x - eps, t_w)) / (2 * eps)
    np.testing.assert_allclose(grad_x[0], g * fd_x, rtol=1e-3, atol=1e-6)
    for c in range(UNITS):
        step = np.zeros(UNITS)
        step[c] = eps
        fd_w = (loss(t_x, t_w + step) - loss(t_x, t_w - step)) / (2 * eps)
        np.testing.assert_allclose(grad_w[c], g * fd_w, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_forward_is_ncnns_int8_dense_with_the_learned_scales(bits):
    """The learned thresholds enter the forward pass exactly: the output is ncnn's int8
    InnerProduct (numpy oracle) with ``s = qmax / T`` of the learned T, bit for bit."""
    net, block, x, _ = _lsq_dense(bits)
    qmax = 2 ** (bits - 1) - 1
    s_in = reference.scale_from_threshold(block.learned_threshold.data().asnumpy(), bits)[0]
    s_w = reference.scale_from_threshold(block.weight_learned_threshold.data().asnumpy(), bits)
    expected = reference.int8_dense(x.asnumpy(), block.weight.data().asnumpy(),
                                    block.bias.data().asnumpy(), s_in, s_w, bits)
    assert np.array_equal(net(x).asnumpy(), expected)
    codes, scales = block.weight_codes()
    assert np.array_equal(scales.asnumpy(), s_w)
    assert np.abs(codes.asnumpy()).max() == qmax  # some weights are clipped at the bound
    assert block.input_scale() == s_in


def test_frozen_ranges_get_no_gradient():
    net, block, x, r = _lsq_dense(4)
    qat.freeze_ranges(net)
    grad_x, grad_w = _autograd(net, block, x, r, native.available())
    assert not grad_x.any() and not grad_w.any()


def _conv_net():
    net = nn.HybridSequential()
    net.add(nn.Conv2D(8, 3, padding=1, in_channels=3), nn.BatchNorm(), nn.Activation('relu'),
            nn.Conv2D(8, 3, padding=1, groups=8), nn.BatchNorm(), nn.Activation('relu'),
            nn.Conv2D(12, 1), nn.GlobalAvgPool2D(), nn.Dense(4))
    return net


def test_trained_learned_ranges_export_and_verify_bit_exact(tmp_path):
    shape = (3, 10, 10)
    mx.random.seed(0)
    rng = np.random.RandomState(0)
    net = _conv_net()
    net.initialize(mx.init.Xavier())
    x = mx.nd.array(rng.normal(0, 1, (8,) + shape))
    net(x)
    qat.convert_model(net, config=QuantScheme(QuantConfig(weight_bits=4, input_bits=4,
                                                          range_tracker='lsq'),
                                              first_layer_bits=8))
    qat.calibrate(net, [x], method='max')
    start = {b.name: (b.input_threshold(), b.weight_learned_threshold.data().asnumpy().copy())
             for _, b in quant_blocks(net)}
    net.hybridize()
    trainer = mx.gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.05,
                                                             'momentum': 0.9})
    labels = mx.nd.array(rng.randint(0, 4, 8))
    for _ in range(5):
        sgd_step(net, trainer, x, labels)
    for _, block in quant_blocks(net):  # the ranges did learn
        before_x, before_w = start[block.name]
        assert block.input_threshold() != before_x
        assert not np.array_equal(block.weight_learned_threshold.data().asnumpy(), before_w)
    qat.freeze_bn(net)
    qat.freeze_ranges(net)
    qat.export(net, str(tmp_path), shape)
    report = qat.verify(net, str(tmp_path), [x], packing=False)
    assert report['passed']
    assert report['int8']['max_lsb'] == 0


def test_checkpoint_without_learned_ranges_loads_with_them_unset(tmp_path):
    mx.random.seed(0)
    net = _conv_net()
    net.initialize()
    net(mx.nd.zeros((1, 3, 8, 8)))
    qat.convert_model(net)
    path = str(tmp_path / 'old.params')
    params = {k: v.data() for k, v in net._collect_params_with_prefix().items()
              if not k.endswith('learned_threshold')}
    mx.nd.save(path, params)
    qat.load_parameters(net, path)
    for _, block in quant_blocks(net):
        assert not block.learned_threshold.data().asnumpy().any()


def _qat_history(tmp_path, name, quantize):
    """(QAT top-1, the QAT epochs' mean losses) of the tiny recipe at W2A2 with ``quantize``
    on top of the recipe defaults."""
    from qat.app.stages import run_recipe
    from tests.helpers import tiny_recipe
    recipe = tiny_recipe(tmp_path, name, quantize=dict(
        {'weight_bits': 2, 'input_bits': 2, 'first_layer_bits': 8}, **quantize),
        qat={'epochs': 4, 'lr': 0.02, 'input_quant_epoch': 0, 'freeze_bn_epoch': None,
             'freeze_ranges_epoch': None},
        calibrate={'batches': 2, 'report_bits': []}, float={'epochs': 4})
    result = run_recipe(recipe, [], out=lambda *a: None)
    import json
    import os
    with open(os.path.join(result['folder'], 'metrics.json')) as handle:
        history = json.load(handle)['history']
    return result, [r['loss'] for r in history if r['stage'] == 'qat']


def test_recipe_defaults_train_at_w2a2_without_diverging(tmp_path):
    """The default recipe path (LSQ ranges started from MSE calibration) at W2A2: finite,
    falling losses and an accuracy far above chance (10 classes)."""
    result, losses = _qat_history(tmp_path, 'w2', {})
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert result['qat'] > 60


@pytest.mark.parametrize('weight_bits, input_bits, tracker', [
    (8, 8, 'ema'), (5, 8, 'ema'), (4, 4, 'lsq'), (8, 4, 'lsq'), (2, 8, 'lsq')])
def test_auto_learns_the_ranges_of_the_narrow_layers_only(weight_bits, input_bits, tracker):
    config = QuantConfig(weight_bits=weight_bits, input_bits=input_bits, range_tracker='auto')
    assert config.resolved().range_tracker == tracker
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3, in_channels=3), nn.Dense(2, in_units=4))
    net.initialize()
    qat.convert_model(net, config=QuantScheme(config, first_layer_bits=8))
    first, second = [block for _, block in quant_blocks(net)]
    assert first.config.range_tracker == 'ema'  # the 8-bit first layer
    assert second.config.range_tracker == tracker
    assert second.learned_threshold.grad_req == ('write' if tracker == 'lsq' else 'null')


def test_two_devices_keep_one_learned_range_and_match_one_device():
    """A batch split over cpu(0) and cpu(1), the gradients summed by the kvstore: every copy of
    a learned threshold is the same after the step, and equal to the one-device step up to
    float summation order (BN frozen; one step: later ones amplify a last-bit difference)."""
    def trained(contexts):
        mx.random.seed(0)
        net = _conv_net()
        net.initialize(mx.init.Xavier(), ctx=contexts)
        x = mx.nd.array(np.random.RandomState(0).normal(0, 1, (8, 3, 10, 10)))
        labels = mx.nd.array(np.random.RandomState(1).randint(0, 4, 8))
        net(x.as_in_context(contexts[0]))
        qat.convert_model(net, config=QuantScheme(QuantConfig(weight_bits=4, input_bits=4,
                                                              range_tracker='lsq')))
        qat.calibrate(net, [x.as_in_context(contexts[0])], method='max')
        qat.freeze_bn(net)  # batch statistics would depend on how the batch is split
        blocks = [block for _, block in quant_blocks(net)]
        start = [block.weight_learned_threshold.data().asnumpy() for block in blocks]
        trainer = mx.gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.05},
                                   kvstore='device')
        xs = mx.gluon.utils.split_and_load(x, contexts)
        ys = mx.gluon.utils.split_and_load(labels, contexts)
        loss_fn = mx.gluon.loss.SoftmaxCrossEntropyLoss()
        with autograd.record():
            losses = [loss_fn(net(a), b) for a, b in zip(xs, ys)]
        autograd.backward(losses)
        trainer.step(8)
        copies = [[(b.learned_threshold.data(c).asnumpy(),
                    b.weight_learned_threshold.data(c).asnumpy()) for c in contexts]
                  for b in blocks]
        return copies, start
    two, start = trained([mx.cpu(0), mx.cpu(1)])
    one, _ = trained([mx.cpu(0)])
    for index, ((first, second), (alone,)) in enumerate(zip(two, one)):
        for ours, theirs in zip(first, second):
            assert np.array_equal(ours, theirs), index  # one value on every device
        np.testing.assert_allclose(first[0], alone[0], rtol=1e-5, err_msg=str(index))
        np.testing.assert_allclose(first[1], alone[1], rtol=1e-5, atol=1e-7,
                                   err_msg=str(index))
        assert not np.array_equal(first[1], start[index])  # the step did move them


# ----- what the narrow widths train with: range equalization and distillation ---------------
def _mobile_block(seed=0):
    """conv-BN-relu -> depthwise conv-BN-relu -> pointwise conv, one input channel ten times
    wider than the others (MobileNet's pointwise -> depthwise transition)."""
    net = nn.HybridSequential()
    net.add(nn.Conv2D(6, 1, in_channels=3, use_bias=False), nn.BatchNorm(in_channels=6),
            nn.Activation('relu'),
            nn.Conv2D(6, 3, padding=1, groups=6, in_channels=6, use_bias=False),
            nn.BatchNorm(in_channels=6), nn.Activation('relu'),
            nn.Conv2D(4, 1, in_channels=6))
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    rs = np.random.RandomState(seed)
    bn = net[1]
    bn.gamma.set_data(mx.nd.array(rs.uniform(0.5, 1.5, 6) * [1, 1, 10, 1, 1, 1]))
    bn.beta.set_data(mx.nd.array(rs.uniform(0, 0.5, 6)))
    bn.running_var.set_data(mx.nd.array(rs.uniform(0.5, 2, 6)))
    return net


def test_equalized_depthwise_inputs_compute_the_same_function_with_equal_ranges():
    from qat.equalize import channel_ranges, depthwise_chains, equalize_depthwise_inputs
    net = _mobile_block()
    data = [mx.nd.array(np.random.RandomState(i).randn(4, 3, 6, 6)) for i in range(3)]
    before = [net(x).asnumpy() for x in data]
    assert [c[2].name for c in depthwise_chains(net)] == [net[3].name]  # not the pointwise
    spread = channel_ranges(net, data, [net[2]])[net[2]]
    assert spread.max() / np.median(spread) > 5
    report = equalize_depthwise_inputs(net, data)
    assert report[0]['conv'] == net[3].name and report[0]['spread'] > 5
    for x, y in zip(data, before):
        np.testing.assert_allclose(net(x).asnumpy(), y, rtol=1e-5, atol=1e-5)
    after = channel_ranges(net, data, [net[2]])[net[2]]
    np.testing.assert_allclose(after, np.median(spread), rtol=1e-5)
    # the depthwise conv's per-channel weight codes are unchanged (only scaled)
    config = QuantConfig(weight_bits=3, input_bits=3)
    codes = []
    for weights in (net[3].weight.data().asnumpy() / (after / spread).reshape(-1, 1, 1, 1),
                    net[3].weight.data().asnumpy()):
        qmax = 2 ** (config.weight_bits - 1) - 1
        t = np.abs(weights).reshape(6, -1).max(1).reshape(-1, 1, 1, 1)
        codes.append(np.round(weights / t * qmax))
    np.testing.assert_array_equal(codes[0], codes[1])


def test_equalization_needs_an_imperative_net():
    from qat.equalize import equalize_depthwise_inputs
    net = _mobile_block()
    net.hybridize()
    with pytest.raises(qat.errors.UserError, match='imperatively'):
        equalize_depthwise_inputs(net, [mx.nd.ones((2, 3, 6, 6))])


def test_distillation_trains_from_the_float_net(tmp_path):
    """``qat.distill``: the QAT loss is T^2 times the cross-entropy to the float net's softened
    outputs (no label term): at the first step (before any update) it is that value, computed
    here from the run's own float.params; training still lowers it and the net learns."""
    import json
    import os
    from mxnet import gluon
    from qat.app.stages import Run, run_recipe
    from qat.app.recipe import load as load_recipe
    from tests.helpers import tiny_recipe
    recipe = tiny_recipe(tmp_path, 'kd', quantize={'weight_bits': 4, 'input_bits': 4},
                         qat={'epochs': 3, 'distill': 4.0, 'input_quant_epoch': 0,
                              'freeze_bn_epoch': 0},
                         calibrate={'batches': 2, 'report_bits': []}, float={'epochs': 3})
    seen = {}

    class Probe(Run):
        def distill_losses(self, net, xs, targets, temperature):
            losses = super().distill_losses(net, xs, targets, temperature)
            if 'first' not in seen:
                seen['first'] = (xs[0].asnumpy(), targets[0].asnumpy(),
                                 losses[0].asnumpy(), temperature)
            return losses
    with pytest.raises(Exception):  # a detection recipe cannot distill
        load_recipe(recipe, ['model.task=detection', 'data.source=digits_detection'])
    run = Probe(load_recipe(recipe), out=lambda *a: None)
    result = run.run()
    x, targets, losses, temperature = seen['first']
    assert temperature == 4.0
    teacher = run.teacher()
    expected = mx.nd.softmax(teacher(mx.nd.array(x)) / 4.0).asnumpy()
    np.testing.assert_allclose(targets, expected, rtol=1e-5, atol=1e-7)
    # the loss of the first step, from the PTQ net the QAT stage started with
    student = run._quantized_net(params=run.folder.path('ptq.params'))
    qat.freeze_bn(student)
    with autograd.train_mode():
        log_p = mx.nd.log_softmax(student(mx.nd.array(x)) / 4.0).asnumpy()
    np.testing.assert_allclose(losses, -(expected * log_p).sum(1) * 16, rtol=1e-4, atol=1e-5)
    with open(os.path.join(result['folder'], 'metrics.json')) as handle:
        qat_losses = [r['loss'] for r in json.load(handle)['history'] if r['stage'] == 'qat']
    assert qat_losses[-1] < qat_losses[0]
    assert result['qat'] > 60
    assert gluon  # the labels are not used: see distill_losses


# ----- the update of learned ranges: Adam on log T ------------------------------------------
def _lsq_conv_net(seed=0):
    mx.random.seed(seed)
    rng = np.random.RandomState(seed)
    net = _conv_net()
    net.initialize(mx.init.Xavier())
    x = mx.nd.array(rng.normal(0, 1, (8, 3, 10, 10)))
    net(x)
    qat.convert_model(net, config=QuantScheme(QuantConfig(weight_bits=4, input_bits=4,
                                                          range_tracker='lsq')))
    qat.calibrate(net, [x], method='max')
    return net, x, mx.nd.array(rng.randint(0, 4, 8))


def _thresholds(net):
    return {p.name: p.data().asnumpy().copy() for p in net.collect_params().values()
            if 'learned_threshold' in p.name}


def test_learned_ranges_get_adam_on_log_t_and_the_rest_the_base_optimizer():
    """One step: every threshold moves as Adam on log T (numpy reference), by at most
    ``range_lr`` relatively; every other parameter exactly as the plain optimizer moves it."""
    lr, range_lr = 0.05, 0.01
    plain_net, x, labels = _lsq_conv_net()
    ours_net, _, _ = _lsq_conv_net()
    plain = mx.gluon.Trainer(plain_net.collect_params(), 'sgd',
                             {'learning_rate': lr, 'momentum': 0.9, 'wd': 1e-4})
    optimizer = with_learned_ranges(
        mx.optimizer.create('sgd', learning_rate=lr, momentum=0.9, wd=1e-4), ours_net,
        range_lr)
    assert isinstance(optimizer, LearnedRangeOptimizer)
    assert optimizer.ranges == set(_thresholds(ours_net))
    ours = mx.gluon.Trainer(ours_net.collect_params(), optimizer)
    start = _thresholds(ours_net)
    sgd_step(plain_net, plain, x, labels)
    sgd_step(ours_net, ours, x, labels)
    grads = {p.name: p.grad().asnumpy() for p in ours_net.collect_params().values()
             if p.name in start}
    for a, b in zip(plain_net.collect_params().values(), ours_net.collect_params().values()):
        if b.name not in start and b.grad_req != 'null':
            assert np.array_equal(a.data().asnumpy(), b.data().asnumpy()), b.name
    moved = 0
    for name, before in start.items():
        after = ours_net.collect_params()[name].data().asnumpy()
        g = np.float32(grads[name] / 8) * before  # dL/dlog T, the batch mean
        m, v = 0.1 * g, 0.001 * g * g
        expected = before * np.exp(-range_lr * (m / 0.1) / (np.sqrt(v / 0.001) + 1e-8))
        np.testing.assert_allclose(after, expected, rtol=2e-6, err_msg=name)
        assert (after > 0).all() and (np.abs(np.log(after / before)) <= range_lr * 1.0001).all()
        moved += int((after != before).any())
    assert moved == len(start)


def test_learned_ranges_stay_positive_under_huge_gradients_and_unset_ones_stay_unset():
    net, x, labels = _lsq_conv_net()
    block = quant_blocks(net)[1][1]
    block.learned_threshold.set_data(mx.nd.zeros((1,)))  # not started
    optimizer = with_learned_ranges(mx.optimizer.create('sgd', learning_rate=10.0), net, 0.01)
    trainer = mx.gluon.Trainer(net.collect_params(), optimizer)
    start = _thresholds(net)
    for _ in range(20):
        sgd_step(net, trainer, x * 100, labels)  # loss and gradients far out of scale
    for name, after in _thresholds(net).items():
        before = start[name]
        assert np.isfinite(after).all(), name
        assert np.array_equal(after == 0, before == 0), name
        ratio = after[before > 0] / before[before > 0]
        assert (ratio > 0).all() and (np.abs(np.log(ratio)) <= 20 * 0.01 * 1.0001).all(), name


def test_learned_range_optimizer_resumes_from_saved_states(tmp_path):
    """Saved and loaded (as a checkpoint does), the trainer continues exactly."""
    def run(steps, resume_at=None):
        net, x, labels = _lsq_conv_net()
        make = lambda: mx.gluon.Trainer(net.collect_params(), with_learned_ranges(
            mx.optimizer.create('sgd', learning_rate=0.05, momentum=0.9), net))
        trainer = make()
        for step in range(steps):
            if step == resume_at:
                trainer.save_states(str(tmp_path / 'states'))
                trainer = make()
                trainer.load_states(str(tmp_path / 'states'))
            sgd_step(net, trainer, x, labels)
        return _thresholds(net)
    straight, resumed = run(4), run(4, resume_at=2)  # (names differ: two nets)
    assert len(straight) == len(resumed)
    for (name, ours), theirs in zip(straight.items(), resumed.values()):
        assert np.array_equal(ours, theirs), name


def test_a_net_without_learned_ranges_keeps_its_optimizer():
    net, _, _ = _lsq_conv_net()
    plain = mx.optimizer.create('sgd', learning_rate=0.1)
    ema_net = _conv_net()
    ema_net.initialize()
    ema_net(mx.nd.zeros((1, 3, 10, 10)))
    qat.convert_model(ema_net, config=QuantConfig(range_tracker='ema'))
    assert with_learned_ranges(plain, ema_net) is plain
    with pytest.raises(ValueError, match='range_lr'):
        with_learned_ranges(plain, net, 0)
