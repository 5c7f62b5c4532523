"""Stand-alone BatchNorm (pre-activation nets): simulated as ncnn computes it, bit for bit.

A BatchNorm not folded into a conv is an fp32 ncnn ``BatchNorm`` layer, computed as
``fma(x, b, a)`` with ncnn's own float32 ``a``, ``b`` (docs/ncnn-int8-contract.md §3.6).
MXNet's BatchNorm op rounds differently in the last bit, and the next int8 layer's codes
flipped. ``convert_model`` makes every such BN a ``QBatchNorm``: exactly ``nn.BatchNorm``
while BN is not frozen (training unchanged), ``ops.batchnorm_ncnn`` once it is frozen.
Judged here: the formula against its numpy oracle and ncnn's own layer (0 ULP, packing on
and off), the block's modes, and whole pre-activation nets exported and verified with
packing off (every layer bit-exact, 0 code mismatches).
"""
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon
from mxnet.gluon import nn

import qat
from qat import native, ops
from qat import reference as ref
from qat.app.models import calibrated_random
from qat.convert import CONV_BN
from qat.deploy import export, ncnn as ncnn_files, verify
from qat.deploy.ir import Graph, Layer
from qat.deploy.verify import EXACT_OPTIONS, NcnnModel
from qat.nn import QBatchNorm, mode_blocks, walk
from tests.helpers import params_by_name, randomize_bn, train_alike

FLOAT_ROUNDING_LSB = 1e-3  # as tests/test_deploy.py: fp32 summation order, far below a step


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.int32)


# ----- the formula -----------------------------------------------------------------------
@pytest.fixture(params=['plain', 'native'])
def dequantize_path(request, monkeypatch):
    """ops.dequantize's fused operator, or its float64 MXNet path."""
    if request.param == 'native':
        if not native.available():
            pytest.skip('fused operators unavailable (no C++ compiler)')
    else:
        native.available()
        monkeypatch.setitem(native._state, 'ok', False)
    return request.param


def _bn_case(rs, channels, eps):
    """Random BN parameters over many magnitudes, one channel with var + eps == 0 (ncnn
    replaces s = 0 by 0.0001), and an input of (C, H, W)."""
    gamma = rs.uniform(-2, 2, channels).astype(np.float32)
    beta = rs.normal(0, 1, channels).astype(np.float32)
    mean = (rs.normal(0, 1, channels) * 10 ** rs.uniform(-3, 3, channels)).astype(np.float32)
    var = (10 ** rs.uniform(-6, 4, channels)).astype(np.float32)
    var[0] = -np.float32(eps)
    x = (rs.normal(0, 1, (channels, 7, 9))
         * 10 ** rs.uniform(-3, 3, (channels, 1, 1))).astype(np.float32)
    return x, gamma, beta, mean, var


def _ncnn_batchnorm(tmp_path, x, gamma, beta, mean, var, eps, packing):
    """ncnn's own BatchNorm layer, alone in a model written by the exporter's writer."""
    graph = Graph([Layer('Input', 'data', [], {'shape': x.shape}),
                   Layer('BatchNorm', 'bn', ['data'], {'channels': len(var), 'eps': eps},
                         {'gamma': gamma, 'beta': beta, 'mean': mean, 'var': var})], ['bn'])
    param, binary = ncnn_files.render(graph)
    (tmp_path / 'bn.param').write_text(param)
    (tmp_path / 'bn.bin').write_bytes(binary)
    model = NcnnModel(str(tmp_path / 'bn.param'), str(tmp_path / 'bn.bin'),
                      use_packing_layout=packing, **EXACT_OPTIONS)
    return model.run(x, ['bn'])['bn'].reshape(x.shape)


@pytest.mark.parametrize('packing', [False, True], ids=['packing-off', 'packing-on'])
def test_formula_is_ncnn_batchnorm_bit_for_bit(tmp_path, packing, dequantize_path):
    """ops.batchnorm_ncnn (imperative and symbolic), its numpy oracle and ncnn's BatchNorm
    layer agree to 0 ULP; MXNet's BatchNorm op does not (the reason for all this)."""
    rs = np.random.RandomState(0)
    mxnet_differs = 0
    for channels in (16, 5):            # packed (pack4 / pack8) and unpacked channels
        for eps in (1e-5, 1e-3, 2e-5 / 3):
            for fix_gamma in (False, True):
                x, gamma, beta, mean, var = _bn_case(rs, channels, eps)
                stored_gamma = np.ones_like(gamma) if fix_gamma else gamma  # as exported
                theirs = _ncnn_batchnorm(tmp_path, x, stored_gamma, beta, mean, var, eps,
                                         packing)
                want = ref.batchnorm_ncnn(x[None], gamma, beta, mean, var, eps, fix_gamma)[0]
                params = [mx.nd.array(v) for v in (gamma, beta, mean, var)]
                got = ops.batchnorm_ncnn(mx.nd, mx.nd.array(x[None]), *params, eps,
                                         fix_gamma).asnumpy()[0]
                sym = ops.batchnorm_ncnn(mx.sym, *[mx.sym.var(n) for n in 'xgbmv'], eps,
                                         fix_gamma)
                inputs = dict(zip('xgbmv', [mx.nd.array(x[None])] + params))
                got_sym = sym.eval(ctx=mx.cpu(), **inputs)[0].asnumpy()[0]
                case = f"C={channels} eps={eps} fix_gamma={fix_gamma}"
                np.testing.assert_array_equal(bits(want), bits(theirs), err_msg=case)
                np.testing.assert_array_equal(bits(got), bits(theirs), err_msg=case)
                np.testing.assert_array_equal(bits(got_sym), bits(theirs), err_msg=case)
                mxnet_bn = mx.nd.BatchNorm(mx.nd.array(x[None]), *params, eps=eps,
                                           fix_gamma=fix_gamma).asnumpy()[0]
                mxnet_differs += int((bits(mxnet_bn) != bits(theirs)).sum())
    assert mxnet_differs > 0


def test_formula_gradients_reach_input_gamma_and_beta(dequantize_path):
    """Frozen-BN training passes gradients through the fused multiply-add: d/dx = b,
    d/dbeta = sum of the output gradient, d/dgamma = sum(g * (x - mean)) / s."""
    rs = np.random.RandomState(1)
    x = mx.nd.array(rs.normal(0, 1, (2, 3, 4, 4)))
    gamma, beta = mx.nd.array(rs.uniform(0.5, 1.5, 3)), mx.nd.array(rs.normal(0, 1, 3))
    mean, var = mx.nd.array(rs.normal(0, 0.2, 3)), mx.nd.array(rs.uniform(0.5, 1.5, 3))
    for v in (x, gamma, beta):
        v.attach_grad()
    with autograd.record():
        y = ops.batchnorm_ncnn(mx.nd, x, gamma, beta, mean, var, 1e-5)
    head = mx.nd.array(rs.normal(0, 1, y.shape))
    y.backward(head)
    s = np.sqrt(var.asnumpy().astype(np.float64) + 1e-5)
    g, xn = head.asnumpy().astype(np.float64), x.asnumpy().astype(np.float64)
    centered = xn - mean.asnumpy().reshape(1, -1, 1, 1)
    np.testing.assert_allclose(x.grad.asnumpy(), g * (gamma.asnumpy() / s).reshape(1, -1, 1, 1),
                               rtol=1e-6)
    np.testing.assert_allclose(beta.grad.asnumpy(), g.sum(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(gamma.grad.asnumpy(), (g * centered).sum(axis=(0, 2, 3)) / s,
                               rtol=1e-4)


# ----- the block -------------------------------------------------------------------------
class PreAct(gluon.HybridBlock):
    """A small pre-activation net: a fixed-gamma input BN (as resnet*_v2), BN -> relu ->
    conv, a residual add, a conv+BN pair (fake BN) among them, a BN after pooling, and a BN
    of a Dense output (2-D)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.bn_in = nn.BatchNorm(scale=False, center=False)
            self.conv0 = nn.Conv2D(8, 3, padding=1)
            self.bn1 = nn.BatchNorm()
            self.conv1 = nn.Conv2D(8, 3, padding=1, use_bias=False)
            self.bn2 = nn.BatchNorm()
            self.conv2 = nn.Conv2D(16, 3, strides=2, padding=1)
            self.bn_pair = nn.BatchNorm()
            self.bn3 = nn.BatchNorm(epsilon=1e-3)
            self.dense = nn.Dense(12)
            self.bn4 = nn.BatchNorm()
            self.out = nn.Dense(5)

    def hybrid_forward(self, F, x):
        x = self.conv0(self.bn_in(x))
        x = x + self.conv1(F.relu(self.bn1(x)))
        x = F.relu(self.bn_pair(self.conv2(F.relu(self.bn2(x)))))
        x = F.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type='max')
        x = F.relu(self.bn3(x))
        return self.out(F.relu(self.bn4(self.dense(x))))


def preact(seed=0, convert=True, **kwargs):
    mx.random.seed(seed)
    rs = np.random.RandomState(seed)
    net = PreAct(prefix='pre_')
    net.initialize(mx.init.Xavier())
    data = mx.nd.array(rs.normal(0, 1, (4, 3, 8, 8)))
    net(data)
    randomize_bn(net, rs)
    if convert:
        qat.convert_model(net, **kwargs)
    return net, data


STANDALONE = ('bn_in', 'bn1', 'bn2', 'bn3', 'bn4')


def test_every_bn_not_folded_becomes_a_qbatchnorm_sharing_its_parameters():
    net, _ = preact(convert=False)
    originals = {name: getattr(net, name) for name in STANDALONE}
    names = set(net.collect_params())
    qat.convert_model(net)
    for name, bn in originals.items():
        block = getattr(net, name)
        assert type(block) is QBatchNorm and block.to_float() is bn and block.prefix == bn.prefix
        for attr in ('gamma', 'beta', 'running_mean', 'running_var'):
            assert getattr(block, attr) is getattr(bn, attr)
    # same parameter names, plus one mode vector per BN; not quantized blocks
    added = set(net.collect_params()) - names
    assert {n for n in added if 'batchnorm' in n} == {
        bn.prefix + 'bn_qmode' for bn in originals.values()}
    assert all(not isinstance(b, QBatchNorm) for _, b in qat.quant_blocks(net))
    assert [b for _, b in mode_blocks(net) if isinstance(b, QBatchNorm)] == \
        [getattr(net, name) for name in STANDALONE]
    # a second conversion leaves everything as it is; to_float puts every BN back
    before = {path: block for path, _, _, block in walk(net)}
    qat.convert_model(net)
    assert {path: block for path, _, _, block in walk(net)} == before
    qat.to_float(net)
    assert all(getattr(net, name) is bn for name, bn in originals.items())


def test_a_bn_after_a_conv_is_not_a_qbatchnorm():
    """conv -> BN is folded (fake BN), or left float for the export to fold when the conv
    is excluded or fake BN is off: ncnn has no BatchNorm layer there."""
    for kwargs in ({}, {'config': qat.QuantConfig(fake_bn=False)}, {'exclude': ['*conv*']},
                   {'convert_fn': {CONV_BN: None}}):
        net = nn.HybridSequential(prefix='cb_')
        with net.name_scope():
            net.add(nn.Conv2D(4, 3, in_channels=3), nn.BatchNorm(in_channels=4),
                    nn.Activation('relu'), nn.BatchNorm(in_channels=4), nn.Dense(2))
        net.initialize()
        qat.convert_model(net, **kwargs)
        assert type(net[1]) is not QBatchNorm, kwargs
        assert type(net[3]) is QBatchNorm, kwargs


def test_first_layer_rule_skips_a_leading_bn():
    net, _ = preact(config=qat.QuantScheme(qat.QuantConfig(weight_bits=4, input_bits=4),
                                           first_layer_bits=8))
    assert net.conv0.config.weight_bits == 8 and net.conv1.config.weight_bits == 4


def test_modes_frozen_bn_computes_ncnn_formula_else_nn_batchnorm():
    net, data = preact()
    qat.calibrate(net, [data], method='max')
    twin, _ = preact(convert_fn={nn.BatchNorm: None})  # the BNs left float, same convs
    qat.calibrate(twin, [data], method='max')
    x = mx.nd.array(np.random.RandomState(5).normal(0, 1, (2, 3, 8, 8)))
    assert all(b.mode == {'quantize': True, 'bn_frozen': False}
               for b in (getattr(net, n) for n in STANDALONE))
    np.testing.assert_array_equal(net(x).asnumpy(), twin(x).asnumpy())
    qat.freeze_bn(net)
    qat.freeze_bn(twin)
    assert all(getattr(net, n).mode['bn_frozen'] for n in STANDALONE)
    frozen = net(x).asnumpy()
    # the block alone: exactly the numpy oracle, imperative and hybridized, and in training
    block = net.bn2
    inputs = mx.nd.array(np.random.RandomState(6).normal(0, 2, (2, 8, 8, 8)))
    kwargs = block._bn_kwargs
    want = ref.batchnorm_ncnn(inputs.asnumpy(), *(getattr(block, a).data().asnumpy() for a in
                              ('gamma', 'beta', 'running_mean', 'running_var')),
                              kwargs['eps'], kwargs['fix_gamma'])
    stats = [block.running_mean.data().asnumpy(), block.running_var.data().asnumpy()]
    np.testing.assert_array_equal(bits(block(inputs).asnumpy()), bits(want))
    assert (bits(block.to_float()(inputs).asnumpy()) != bits(want)).sum() > 0  # MXNet's op
    with autograd.record():  # training with BN frozen: running statistics, not updated
        np.testing.assert_array_equal(bits(block(inputs).asnumpy()), bits(want))
    np.testing.assert_array_equal(block.running_mean.data().asnumpy(), stats[0])
    np.testing.assert_array_equal(block.running_var.data().asnumpy(), stats[1])
    net.hybridize()
    np.testing.assert_array_equal(net(x).asnumpy(), frozen)
    # quantization disabled: exactly the float net; temporary modes give the flags back
    with qat.temporary_mode(net, quantize=False):
        assert not any(getattr(net, n).mode['quantize'] for n in STANDALONE)
        float_twin, _ = preact(convert=False)
        float_twin.hybridize()
        np.testing.assert_array_equal(net(x).asnumpy(), float_twin(x).asnumpy())
    assert all(getattr(net, n).mode == {'quantize': True, 'bn_frozen': True}
               for n in STANDALONE)
    np.testing.assert_array_equal(net(x).asnumpy(), frozen)
    qat.freeze_bn(net, False)
    with qat.deployed(net):
        np.testing.assert_array_equal(net(x).asnumpy(), frozen)
    assert not any(getattr(net, n).mode['bn_frozen'] for n in STANDALONE)
    with pytest.raises(ValueError, match='frozen_bn'):
        block.set_mode(frozen_bn=True)


def test_modes_are_saved_and_an_older_checkpoint_follows_the_quantized_blocks(tmp_path):
    net, data = preact()
    qat.calibrate(net, [data], method='max')
    qat.freeze_bn(net)
    net.bn3.set_mode(bn_frozen=False)  # one BN with its own mode
    path = str(tmp_path / 'net.params')
    qat.save_parameters(net, path)
    fresh, _ = preact(seed=1)
    qat.load_parameters(fresh, path)
    assert [getattr(fresh, n).mode for n in STANDALONE] == \
        [getattr(net, n).mode for n in STANDALONE]
    np.testing.assert_array_equal(fresh(data).asnumpy(), net(data).asnumpy())
    # a checkpoint from before stand-alone BNs had modes: they take the quantized blocks'
    saved = mx.nd.load(path)
    old = str(tmp_path / 'old.params')
    mx.nd.save(old, {k: v for k, v in saved.items() if not k.endswith('bn_qmode')})
    older, _ = preact(seed=2)
    qat.load_parameters(older, old)
    assert all(getattr(older, n).mode == {'quantize': True, 'bn_frozen': True}
               for n in STANDALONE)


@pytest.mark.parametrize('hybridize', [False, True], ids=['imperative', 'hybridized'])
@pytest.mark.parametrize('quantized', [False, True], ids=['bn-only', 'convs-quantized'])
def test_training_with_bn_not_frozen_is_exactly_nn_batchnorm(hybridize, quantized):
    """QAT with BN not frozen trains the stand-alone BNs exactly as nn.BatchNorm: the same
    outputs, gradients, parameters and running statistics, bit for bit, step after step.
    Twin: the net unconverted (only the BNs converted), or with the same convs quantized
    and the BNs left float."""
    if quantized:
        net, data = preact()
        twin, _ = preact(convert_fn={nn.BatchNorm: None})
        for n in (net, twin):
            qat.calibrate(n, [data], method='max')
    else:
        net, data = preact(exclude=['*conv*', '*dense*'])
        twin, _ = preact(convert=False)
    assert type(net.bn2) is QBatchNorm and type(twin.bn2) is nn.BatchNorm
    if hybridize:
        net.hybridize()
        twin.hybridize()
    before = params_by_name(twin)
    want = train_alike(net, twin, (3, 8, 8))
    for key in ('batchnorm1_gamma', 'batchnorm1_running_mean', 'batchnorm5_running_var'):
        assert not np.array_equal(want[key], before[key]), key  # they did train


# ----- exported nets, verified against the ncnn runtime -----------------------------------
def _assert_bit_exact(report, manifest_bns):
    assert report['int8']['top1_agreement'] == 1.0
    assert report['int8']['max_abs_error'] == 0.0
    assert report['int8']['within_1lsb'] == 1.0
    bns = [layer for layer in report['layers'] if layer['kind'] == 'BatchNorm']
    assert len(bns) == manifest_bns > 0
    for layer in report['layers']:
        exact = layer['int8'] or layer['kind'] == 'BatchNorm'
        assert layer['max_lsb'] <= (0.0 if exact else FLOAT_ROUNDING_LSB), layer
        assert layer.get('code_mismatches', 0) == 0, layer


def _exported(net, folder, shape):
    export(net, folder, shape, name='model')
    kinds = [kind for kind, *_ in ncnn_files.read_param(os.path.join(folder,
                                                                     'model-int8.param'))]
    qbns = sum(1 for _, b in mode_blocks(net) if isinstance(b, QBatchNorm))
    assert kinds.count('BatchNorm') == qbns
    return qbns


def test_small_preactivation_net_is_bit_exact(tmp_path):
    net, data = preact()
    qat.calibrate(net, [data], method='max')
    qat.freeze_bn(net)
    bns = _exported(net, str(tmp_path), (3, 8, 8))
    x = mx.nd.array(np.random.RandomState(7).normal(0, 1, (8, 3, 8, 8)))
    _assert_bit_exact(verify(net, str(tmp_path), [x], packing=False), bns)


def test_resnet18_v2_is_bit_exact_and_was_not_with_mxnets_batchnorm(tmp_path):
    """resnet18_v2 (random weights and BN statistics, calibrated, BN frozen), 16 images of
    64x64, packing off: every layer bit-exact. With MXNet's BatchNorm op in the simulation
    (the QBatchNorms' quantization off) the same export had thousands of flipped codes."""
    net = calibrated_random('resnet18_v2', 64)
    bns = _exported(net, str(tmp_path), (3, 64, 64))
    x = mx.nd.array(np.random.RandomState(1).normal(0, 1, (16, 3, 64, 64)))
    _assert_bit_exact(verify(net, str(tmp_path), [x], packing=False), bns)
    for _, block in mode_blocks(net):
        if isinstance(block, QBatchNorm):
            block.set_mode(quantize=False)
    old = verify(net, str(tmp_path), [x], packing=False)
    assert sum(layer.get('code_mismatches', 0) for layer in old['layers']) > 1000


def test_densenet121_is_bit_exact(tmp_path):
    """densenet121 (its fixed 7x7 final pooling needs 224x224), 2 images, packing off."""
    net = calibrated_random('densenet121', 224)
    bns = _exported(net, str(tmp_path), (3, 224, 224))
    x = mx.nd.array(np.random.RandomState(1).normal(0, 1, (2, 3, 224, 224)))
    _assert_bit_exact(verify(net, str(tmp_path), [x], packing=False), bns)
