"""convert_model and friends: structure, exactness while disabled, exclusion, registry, layer
configs, back to float, saved parameters with their modes, mode functions, range checks."""
import logging
import os

import mxnet as mx
import numpy as np
import pytest
from gluoncv.model_zoo import get_model
from mxnet import gluon
from mxnet.gluon import HybridBlock, nn

import qat
from qat import reference as ref
from qat.nn import (MODE_FLAGS, FoldedBatchNorm, QBatchNorm, QConv2D, QConv2DBatchNorm, QDense,
                    QuantBlock, walk)
from tests.helpers import params_by_name, params_numpy, randomize_bn, sgd_step, small_net

# (model, input size, conv+BN pairs), the pair counts derived from the architectures:
#  resnet18_v1: stem conv+bn (1) + 8 BasicBlockV1 x (conv-bn-relu-conv-bn) (16) + 1x1
#      conv+bn downsample in stages 2, 3, 4 (3) = 20, i.e. every Conv2D has its BN.
#  resnet18_v2 (pre-activation): stem conv -> bn (1) + in each of the 8 BasicBlockV2 only
#      conv1 -> bn2 (8); conv2 and the downsample conv feed the residual add, and the BNs
#      (bn1 of the next block, the final BN) consume the sum, not a conv = 9.
#  mobilenet1.0: stem conv+bn (1) + 13 depthwise-separable blocks x (dw+bn, pw+bn) (26) = 27.
#  mobilenetv2_1.0: stem (1) + the first LinearBottleneck (t=1: no expansion conv) dw+bn,
#      project+bn (2) + 16 bottlenecks x (expand, dw, project) (48) + last 1x1 conv 1280 (1)
#      = 52; the classifier is a Conv2D without BN.
#  cifar_resnet20_v1: stem (1) + 9 blocks x 2 (18) + downsample conv+bn in stages 2, 3 (2)
#      = 21.
#  vgg11_bn: 8 convs, each followed by its BN = 8 (the classifier is Dense).
# 64x64 inputs are enough for the ImageNet models (global pooling; vgg's Dense infers its
# input size on the first call), 32x32 for the CIFAR one.
MODELS = [('resnet18_v1', 64, 20), ('resnet18_v2', 64, 9), ('mobilenet1.0', 64, 27),
          ('mobilenetv2_1.0', 64, 52), ('cifar_resnet20_v1', 32, 21), ('vgg11_bn', 64, 8)]
MODEL_IDS = [m[0] for m in MODELS]


def build_model(name, size, seed=0):
    """A randomly initialized GluonCV model with random BN statistics, and an input batch."""
    mx.random.seed(seed)
    net = get_model(name, pretrained=False)
    net.initialize(mx.init.Xavier())
    rs = np.random.RandomState(seed)
    x = mx.nd.array(rs.uniform(-1, 1, (2, 3, size, size)))
    net(x)  # resolve deferred shapes
    randomize_bn(net, rs)
    return net, x


def count_types(net, *types):
    return sum(1 for *_, block in walk(net) if isinstance(block, types))


def structure(net):
    """{path: block object} of every descendant."""
    return {path: block for path, _, _, block in walk(net)}


# ----- structure and exactness on real architectures -----------------------------------
@pytest.mark.parametrize('name,size,pairs', MODELS, ids=MODEL_IDS)
def test_conv_bn_pairs_and_converted_structure(name, size, pairs):
    net, _ = build_model(name, size)
    found = qat.conv_bn_pairs(net)
    assert len(found) == pairs
    assert all(type(c) is nn.Conv2D and type(b) is nn.BatchNorm for c, b in found.items())
    assert len(set(found.values())) == pairs  # no BN is claimed twice
    convs = count_types(net, nn.Conv2D)
    dense = count_types(net, nn.Dense)
    bns = count_types(net, nn.BatchNorm)
    qat.convert_model(net)
    # every Conv2D / Dense is converted; each paired BN became a FoldedBatchNorm, every
    # other BN a QBatchNorm
    assert len(qat.quant_blocks(net)) == convs + dense
    assert count_types(net, QConv2DBatchNorm) == pairs
    assert count_types(net, FoldedBatchNorm) == pairs
    assert count_types(net, QBatchNorm) == bns - pairs
    assert count_types(net, nn.BatchNorm) == 0
    assert count_types(net, nn.Conv2D, nn.Dense) == 0
    for conv, bn in found.items():
        blocks = [b for *_, b in walk(net) if isinstance(b, QConv2DBatchNorm)
                  and b.to_float()[0] is conv]
        assert len(blocks) == 1 and blocks[0].to_float()[1] is bn


@pytest.mark.parametrize('hybridize', [False, True], ids=['imperative', 'hybridized'])
@pytest.mark.parametrize('name,size,pairs', MODELS, ids=MODEL_IDS)
def test_disabled_quantization_equals_float_exactly(name, size, pairs, hybridize):
    net, x = build_model(name, size)
    if hybridize:
        net.hybridize()
    expected = net(x).asnumpy()
    qat.convert_model(net)
    qat.disable_quantize(net)
    # the same MXNet ops on the same parameters: bit-identical
    np.testing.assert_array_equal(net(x).asnumpy(), expected)
    # and quantization does change the function
    qat.enable_quantize(net)
    quantized = net(x).asnumpy()
    assert np.all(np.isfinite(quantized)) and not np.array_equal(quantized, expected)
    qat.disable_quantize(net)
    np.testing.assert_array_equal(net(x).asnumpy(), expected)


def test_converted_then_hybridized_disabled_equals_float():
    net, x = build_model('resnet18_v1', 64)
    net.hybridize()
    expected = net(x).asnumpy()
    other, _ = build_model('resnet18_v1', 64)
    qat.convert_model(other)
    qat.disable_quantize(other)
    other.hybridize()
    np.testing.assert_array_equal(other(x).asnumpy(), expected)


def test_disabled_training_step_equals_float_exactly():
    """Disabled, the converted net also trains exactly like the float net: same outputs
    (batch statistics), same gradients, same BN running statistics."""
    float_net, x = build_model('cifar_resnet20_v1', 32)
    conv_net, _ = build_model('cifar_resnet20_v1', 32)
    qat.convert_model(conv_net)
    qat.disable_quantize(conv_net)
    labels = mx.nd.array([1, 7])
    trainer_f = gluon.Trainer(float_net.collect_params(), 'sgd', {'learning_rate': 0.1})
    trainer_c = gluon.Trainer(conv_net.collect_params(), 'sgd', {'learning_rate': 0.1})
    for _ in range(2):
        out_f = sgd_step(float_net, trainer_f, x, labels)
        out_c = sgd_step(conv_net, trainer_c, x, labels)
        np.testing.assert_array_equal(out_c, out_f)
    pf, pc = params_by_name(float_net), params_by_name(conv_net)
    assert set(pf) <= set(pc)
    for key in pf:
        np.testing.assert_array_equal(pc[key], pf[key], err_msg=key)


# ----- exclusion, registry, per-layer configs --------------------------------------------
def nested_net(seed=0):
    """conv0 -> bn0 -> relu -> body[conv, bn, conv] -> GAP -> dense0."""
    mx.random.seed(seed)
    net = nn.HybridSequential(prefix='n_')
    with net.name_scope():
        body = nn.HybridSequential(prefix='body_')
        with body.name_scope():
            body.add(nn.Conv2D(8, 3, padding=1, in_channels=8), nn.BatchNorm(in_channels=8),
                     nn.Conv2D(8, 1, in_channels=8, activation='relu'))
        net.add(nn.Conv2D(8, 3, padding=1, in_channels=3), nn.BatchNorm(in_channels=8),
                nn.Activation('relu'), body, nn.GlobalAvgPool2D(), nn.Dense(4, in_units=8))
    net.initialize(mx.init.Xavier())
    randomize_bn(net, np.random.RandomState(seed))
    return net


def types_by_path(net):
    return {path: type(block).__name__ for path, block in structure(net).items()}


def test_nested_net_names():
    net = nested_net()
    names = {path: block.name for path, block in structure(net).items()}
    assert names == {'0': 'n_conv0', '1': 'n_batchnorm0', '2': 'n_relu0', '3': 'n_body',
                     '3.0': 'n_body_conv0', '3.1': 'n_body_batchnorm0', '3.2': 'n_body_conv1',
                     '3.2.act': 'n_body_conv1_relu', '4': 'n_pool0', '5': 'n_dense0'}
    assert len(qat.conv_bn_pairs(net)) == 2


DEFAULT_TYPES = {'0': 'QConv2DBatchNorm', '1': 'FoldedBatchNorm', '3.0': 'QConv2DBatchNorm',
                 '3.1': 'FoldedBatchNorm', '3.2': 'QConv2D', '5': 'QDense'}


@pytest.mark.parametrize('exclude,expected', [
    ((), {}),
    ('by-block', {'0': 'Conv2D', '1': 'BatchNorm'}),
    ('n_dense*', {'5': 'Dense'}),                      # block name glob
    ('*conv1', {'3.2': 'Conv2D'}),                      # block name glob
    ('3.0', {'3.0': 'Conv2D', '3.1': 'BatchNorm'}),     # structural path
    ('3', {'3.0': 'Conv2D', '3.1': 'BatchNorm', '3.2': 'Conv2D'}),  # a container: all inside
    (['5', 'n_conv0'], {'5': 'Dense', '0': 'Conv2D', '1': 'BatchNorm'}),
    ('n_body_batchnorm0', {'3.0': 'QConv2D', '3.1': 'BatchNorm'}),  # BN by name: no folding
], ids=['none', 'block', 'name', 'name2', 'path', 'container', 'list', 'bn-name'])
def test_exclude(exclude, expected):
    net = nested_net()
    if exclude == 'by-block':
        exclude = net[0]
    before = structure(net)
    qat.convert_model(net, exclude=exclude)
    got = types_by_path(net)
    for path, type_name in {**DEFAULT_TYPES, **expected}.items():
        assert got[path] == type_name, path
    after = structure(net)
    for path, type_name in expected.items():  # float blocks are the very same objects
        if not type_name.startswith(('Q', 'Folded')):
            assert after[path] is before[path], path
    x = mx.nd.array(np.random.RandomState(0).uniform(-1, 1, (2, 3, 6, 6)))
    assert np.all(np.isfinite(net(x).asnumpy()))


def test_exclude_bn_by_path_prevents_folding():
    net = nested_net()
    qat.convert_model(net, exclude='3.1')
    got = types_by_path(net)
    assert got['3.1'] == 'BatchNorm'
    assert got['3.0'] == 'QConv2D'


class DoubledBlock(HybridBlock):
    """A stand-in 'quantized' block for the registry test: twice the float block."""

    def __init__(self, block, config):
        super().__init__(prefix=block.prefix, params=block.params)
        self.config = config
        self.inner = block

    def hybrid_forward(self, F, x):
        return self.inner(x) * 2


def test_convert_fn_adds_and_removes_converters():
    registry_before = dict(qat.CONVERTERS)
    mx.random.seed(0)
    net = nn.HybridSequential(prefix='r_')
    with net.name_scope():
        net.add(nn.Conv2DTranspose(4, 3, in_channels=3), nn.Conv2D(4, 3, in_channels=4),
                nn.GlobalAvgPool2D(), nn.Dense(2, in_units=4))
    net.initialize(mx.init.Xavier())
    x = mx.nd.array(np.random.RandomState(0).uniform(-1, 1, (1, 3, 5, 5)))
    transposed = net[0](x).asnumpy()
    original = net[0]
    config = qat.QuantConfig(weight_bits=6)
    qat.convert_model(net, convert_fn={nn.Conv2DTranspose: DoubledBlock, nn.Dense: None},
                      config=config)
    assert type(net[0]) is DoubledBlock and net[0].inner is original
    assert net[0].config is config
    assert type(net[1]) is QConv2D and net[1].config is config
    assert type(net[3]) is nn.Dense  # its converter removed for this call
    np.testing.assert_array_equal(net[0](x).asnumpy(), 2 * transposed)
    assert qat.CONVERTERS == registry_before  # the module registry is not modified


class ActWrapper(HybridBlock):
    def __init__(self, block, config):
        super().__init__(prefix=block.prefix, params=block.params)
        self.inner = block

    def hybrid_forward(self, F, x):
        return self.inner(x)


def test_convert_fn_for_weightless_block():
    net = nested_net()
    qat.convert_model(net, convert_fn={nn.Activation: ActWrapper})
    assert type(net[2]) is ActWrapper


def test_layer_configs():
    four_bit = qat.QuantConfig(weight_bits=4)
    no_fold_tensor = qat.QuantConfig(weight_granularity='tensor', fake_bn=False)
    shadowed = qat.QuantConfig(weight_bits=2)
    net = nested_net()
    qat.convert_model(net, layer_configs={'n_dense*': four_bit, '*dense*': shadowed,
                                          '3.*': no_fold_tensor})
    default = qat.QuantConfig()
    assert net[0].config == default and type(net[0]) is QConv2DBatchNorm
    assert net[5].config is four_bit  # the first matching pattern wins
    body = net[3]
    assert type(body[0]) is QConv2D and type(body[1]) is nn.BatchNorm  # fake_bn=False
    assert body[0].config is no_fold_tensor and body[2].config is no_fold_tensor
    # the 4-bit Dense computes with 4-bit weight codes (weights-only check)
    qat.quantize_input(net, False)
    dense = net[5]
    w = dense.weight.data().asnumpy()
    b = dense.bias.data().asnumpy()
    s_w = ref.scale_from_threshold(ref.weight_threshold(w), 4)
    codes = ref.quantize(w, s_w.reshape(-1, 1), bits=4)
    assert codes.min() == -7 and codes.max() == 7
    feats = np.random.RandomState(0).uniform(-1, 1, (3, 8)).astype(np.float32)
    expected = feats.astype(np.float64) @ (codes / s_w.reshape(-1, 1).astype(np.float64)).T + b
    got = dense(mx.nd.array(feats)).asnumpy()
    # float32 FullyConnected over 8 terms, then one multiply and one add: a few eps32 of the
    # sum of magnitudes
    magnitude = np.abs(feats) @ np.abs(codes / s_w.reshape(-1, 1)).T + np.abs(b)
    assert np.all(np.abs(got - expected) <= 8 * np.finfo(np.float32).eps * magnitude)


@pytest.mark.parametrize('make', [
    lambda: nn.Conv2DTranspose(4, 3, in_channels=3),
    lambda: nn.Conv1D(4, 3, in_channels=3),
    lambda: nn.Conv3D(4, 3, in_channels=3),
], ids=['Conv2DTranspose', 'Conv1D', 'Conv3D'])
def test_unsupported_blocks_stay_float(make):
    net = nn.HybridSequential(prefix='u_')
    with net.name_scope():
        net.add(make(), nn.Dense(2))
    net.initialize()
    original = net[0]
    qat.convert_model(net)
    assert net[0] is original and type(net[1]) is QDense


def test_nhwc_conv_stays_float():
    net = nn.HybridSequential(prefix='h_')
    with net.name_scope():
        net.add(nn.Conv2D(4, 3, layout='NHWC', in_channels=3), nn.Dense(2))
    net.initialize()
    original = net[0]
    qat.convert_model(net)  # (no forward: MXNet's CPU conv does not run NHWC)
    assert net[0] is original and type(net[1]) is QDense


@pytest.mark.parametrize('field,value', [
    ('weight_bits', 9), ('weight_bits', 1), ('weight_bits', True), ('weight_bits', 8.0),
    ('input_bits', 0), ('input_bits', '8'),
    ('weight_granularity', 'layer'), ('range_tracker', 'minmax'),
    ('range_momentum', 1.0), ('range_momentum', -0.1), ('range_momentum', float('nan')),
    ('input_signed', 1), ('fake_bn', 'yes'),
])
def test_bad_config_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        qat.QuantConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        qat.QuantConfig().updated(**{field: value})


def test_config_updated_unknown_field_and_type_checks():
    with pytest.raises(ValueError, match='weight_bitz'):
        qat.QuantConfig().updated(weight_bitz=4)
    assert qat.QuantConfig().updated(weight_bits=4).weight_bits == 4
    with pytest.raises(TypeError, match='QuantConfig'):
        qat.convert_model(nested_net(), config={'weight_bits': 4}, exclude=['0', '3.0'])


def test_config_of_wrong_type_raises_type_error_with_conv_bn_pair():
    with pytest.raises(TypeError, match='QuantConfig'):
        qat.convert_model(nested_net(), config={'weight_bits': 4})


# ----- back to float ---------------------------------------------------------------------
@pytest.mark.parametrize('hybridize', [False, True], ids=['imperative', 'hybridized'])
def test_to_float_restores_blocks_and_output(hybridize):
    net, x = build_model('cifar_resnet20_v1', 32)
    if hybridize:
        net.hybridize()
    before = structure(net)
    expected = net(x).asnumpy()
    qat.convert_model(net)
    assert callable(net.enable_quantize)
    quantized = net(x).asnumpy()
    assert not np.array_equal(quantized, expected)
    assert qat.to_float(net) is net
    after = structure(net)
    assert after.keys() == before.keys()
    assert all(after[path] is before[path] for path in before)
    np.testing.assert_array_equal(net(x).asnumpy(), expected)
    assert not hasattr(net, 'enable_quantize')
    assert count_types(net, QuantBlock, FoldedBatchNorm) == 0


def test_to_float_keeps_trained_parameters():
    net = small_net()
    conv, bn, dense = net[0], net[1], net[4]
    qat.convert_model(net)
    trainer = gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.5})
    x = mx.nd.array(np.random.RandomState(0).uniform(-1, 1, (4, 3, 6, 6)))
    sgd_step(net, trainer, x, mx.nd.array([0, 1, 2, 3]))
    trained = params_by_name(net)
    qat.to_float(net)
    assert net[0] is conv and net[1] is bn and net[4] is dense
    restored = params_by_name(net)
    assert set(restored) <= set(trained)
    for key, value in restored.items():
        np.testing.assert_array_equal(value, trained[key])
    initial = params_by_name(small_net())
    for key in ('conv0_weight', 'batchnorm0_gamma', 'dense0_weight'):
        assert not np.array_equal(restored[key], initial[key]), key


def test_block_level_to_float():
    net = small_net()
    conv, bn, dense = net[0], net[1], net[4]
    x = mx.nd.array(np.random.RandomState(0).uniform(-1, 1, (2, 3, 6, 6)))
    expected = bn(conv(x)).asnumpy()
    qat.convert_model(net)
    seq = net[0].to_float()
    assert isinstance(seq, nn.HybridSequential) and seq[0] is conv and seq[1] is bn
    np.testing.assert_array_equal(seq(x).asnumpy(), expected)
    assert net[4].to_float() is dense
    assert net[1]._originals.blocks == (bn,)


# ----- saved parameters and modes --------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    net, x = build_model('cifar_resnet20_v1', 32, seed=0)
    qat.convert_model(net)
    trainer = gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.05})
    labels = mx.nd.array([3, 5])
    for _ in range(2):
        sgd_step(net, trainer, x, labels)
    qat.freeze_bn(net)
    qat.quantize_input(net, online=True)
    qat.quant_blocks(net)[0][1].set_mode(ranges_frozen=True)  # one block with its own mode
    path = str(tmp_path / 'qat.params')
    qat.save_parameters(net, path)
    assert os.listdir(tmp_path) == ['qat.params']  # no temporary file left behind

    fresh, _ = build_model('cifar_resnet20_v1', 32, seed=1)
    qat.convert_model(fresh)
    assert not np.array_equal(fresh(x).asnumpy(), net(x).asnumpy())
    assert qat.load_parameters(fresh, path) is fresh
    modes = [(p, b.mode) for p, b in qat.quant_blocks(net)]
    assert [(p, b.mode) for p, b in qat.quant_blocks(fresh)] == modes
    assert all(m['bn_frozen'] and m['online'] for _, m in modes)
    assert sum(m['ranges_frozen'] for _, m in modes) == 1
    saved, loaded = params_numpy(net), params_numpy(fresh)
    assert saved.keys() == loaded.keys()
    for key in saved:
        np.testing.assert_array_equal(loaded[key], saved[key], err_msg=key)
    np.testing.assert_array_equal(fresh(x).asnumpy(), net(x).asnumpy())
    with mx.autograd.record():  # training mode too (BN frozen: running statistics)
        train_saved, train_loaded = net(x).asnumpy(), fresh(x).asnumpy()
    np.testing.assert_array_equal(train_loaded, train_saved)
    fresh.hybridize()
    np.testing.assert_array_equal(fresh(x).asnumpy(), net(x).asnumpy())


def test_load_parameters_missing_file(tmp_path):
    net = qat.convert_model(small_net())
    with pytest.raises(FileNotFoundError, match='missing.params'):
        qat.load_parameters(net, str(tmp_path / 'missing.params'))


# ----- modes -----------------------------------------------------------------------------
def test_mode_functions_apply_to_all_blocks_and_change_output():
    net, x = build_model('cifar_resnet20_v1', 32)
    qat.convert_model(net)
    blocks = [b for _, b in qat.quant_blocks(net)]
    assert len(blocks) == 22  # 21 convs + the Dense (the 22nd is the Dense head)

    def flags(name):
        return {b.mode[name] for b in blocks}

    def run():
        return net(x).asnumpy()

    default = run()
    assert flags('quantize') == flags('quantize_input') == {True}
    assert flags('online') == flags('bn_frozen') == flags('ranges_frozen') == {False}

    assert net.disable_quantize() is net and flags('quantize') == {False}
    floating = run()
    assert not np.array_equal(floating, default)
    qat.enable_quantize(net)
    assert flags('quantize') == {True}
    np.testing.assert_array_equal(run(), default)

    qat.quantize_input(net, False)
    assert flags('quantize_input') == {False}
    weights_only = run()
    assert not np.array_equal(weights_only, default)
    assert not np.array_equal(weights_only, floating)

    # a tracked range different from the batch's: offline and online differ
    qat.quantize_input(net, True)
    for b in blocks:
        b.set_input_threshold(5.0)
    offline = run()
    net.quantize_input(online=True)
    assert flags('online') == {True} and flags('quantize_input') == {True}
    assert not np.array_equal(run(), offline)
    qat.quantize_input(net)
    np.testing.assert_array_equal(run(), offline)

    # freeze_bn changes the training-mode function (running instead of batch statistics)
    with mx.autograd.record():
        batch_stats = run()
    qat.freeze_bn(net)
    assert flags('bn_frozen') == {True}
    with mx.autograd.record():
        frozen = run()
    assert not np.array_equal(frozen, batch_stats)
    qat.freeze_bn(net, False)
    assert flags('bn_frozen') == {False}

    qat.freeze_ranges(net)
    assert flags('ranges_frozen') == {True}
    qat.freeze_ranges(net, False)
    assert flags('ranges_frozen') == {False}
    # the qmode parameter mirrors the flags
    for b in blocks:
        np.testing.assert_array_equal(b.qmode.data().asnumpy(),
                                      [float(b.mode[f]) for f in MODE_FLAGS])


def test_modes_on_hybridized_net_rebuild_the_graph():
    net = small_net()
    x = mx.nd.array(np.random.RandomState(0).uniform(-1, 1, (2, 3, 6, 6)))
    expected = net(x).asnumpy()
    qat.convert_model(net)
    quantized = net(x).asnumpy()
    net.hybridize()
    np.testing.assert_array_equal(net(x).asnumpy(), quantized)
    qat.disable_quantize(net)
    np.testing.assert_array_equal(net(x).asnumpy(), expected)
    qat.enable_quantize(net)
    np.testing.assert_array_equal(net(x).asnumpy(), quantized)


@pytest.mark.xfail(strict=True, reason='BUG: QuantBlock.set_mode on a block inside a '
                   'hybridized net clears only that block\'s cached graph; the parent keeps '
                   'running the stale graph with the old mode')
def test_block_set_mode_inside_hybridized_net():
    x = mx.nd.array(np.random.RandomState(0).uniform(-1, 1, (2, 3, 6, 6)))
    reference_net = qat.convert_model(small_net())
    reference_net[0].set_mode(quantize=False)
    expected = reference_net(x).asnumpy()
    net = qat.convert_model(small_net())
    net.hybridize()
    before = net(x).asnumpy()
    net[0].set_mode(quantize=False)
    after = net(x).asnumpy()
    assert not np.array_equal(after, before)
    np.testing.assert_array_equal(after, expected)


def test_mode_errors():
    net = small_net()
    with pytest.raises(ValueError, match='no quantized blocks'):
        qat.enable_quantize(net)
    qat.convert_model(net)
    with pytest.raises(ValueError, match='quantise'):
        net[0].set_mode(quantise=True)


def test_check_ranges_names_unset_and_bad_layers(caplog):
    net = nested_net()
    qat.convert_model(net)
    names = [b.name for _, b in qat.quant_blocks(net)]
    assert names == ['n_conv0', 'n_body_conv0', 'n_body_conv1', 'n_dense0']
    with caplog.at_level(logging.WARNING, logger='qat'):
        assert qat.check_ranges(net) == names
    for name in names:
        assert any(name in r.getMessage() and r.levelno == logging.WARNING
                   for r in caplog.records), name
    caplog.clear()
    net[0].set_input_threshold(2.0)
    net[3][0].set_input_threshold(0.0)      # zero
    net[3][2].set_input_threshold(np.inf)   # not finite
    with caplog.at_level(logging.WARNING, logger='qat'):
        bad = qat.check_ranges(net)
    assert bad == ['n_body_conv0', 'n_body_conv1', 'n_dense0']
    messages = ' '.join(r.getMessage() for r in caplog.records)
    assert 'n_dense0' in messages and 'unset' in messages and 'n_conv0' not in messages
    net[3][0].set_input_threshold(np.nan)
    net[3][2].set_input_threshold(1.0)
    net[5].set_mode(quantize_input=False)   # no input quantization: no range needed
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='qat'):
        assert qat.check_ranges(net) == ['n_body_conv0']
    assert len(caplog.records) == 1 and 'n_body_conv0' in caplog.records[0].getMessage()
    # freeze_ranges checks too
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='qat'):
        qat.freeze_ranges(net)
    assert any('n_body_conv0' in r.getMessage() for r in caplog.records)


class TwoConsumers(HybridBlock):
    """conv -> BN, but the conv output also feeds a residual add: not foldable."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv = nn.Conv2D(3, 3, padding=1, in_channels=3)
            self.bn = nn.BatchNorm(in_channels=3)
            self.conv2 = nn.Conv2D(3, 1, in_channels=3)
            self.bn2 = nn.BatchNorm(in_channels=3)

    def hybrid_forward(self, F, x):
        y = self.conv(x)
        return self.bn(y) + y + self.bn2(self.conv2(x))


def test_conv_with_two_consumers_is_not_paired():
    net = TwoConsumers(prefix='two_')
    net.initialize()
    pairs = qat.conv_bn_pairs(net)
    assert pairs == {net.conv2: net.bn2}
    qat.convert_model(net)
    assert type(net.conv) is QConv2D and type(net.bn) is QBatchNorm
    assert type(net.conv2) is QConv2DBatchNorm and type(net.bn2) is FoldedBatchNorm


def test_convert_twice_is_a_no_op():
    net = nested_net()
    qat.convert_model(net)
    x = mx.nd.array(np.random.RandomState(0).uniform(-1, 1, (2, 3, 6, 6)))
    before, out = structure(net), net(x).asnumpy()
    qat.convert_model(net)
    after = structure(net)
    assert after.keys() == before.keys() and all(after[p] is before[p] for p in before)
    np.testing.assert_array_equal(net(x).asnumpy(), out)


@pytest.mark.xfail(strict=True, reason='KNOWN LIMITATION: a net converted before its deferred shapes (no in_channels / in_units) are known cannot infer the weight shape through the quantization ops; initialize and run one batch before convert_model')
@pytest.mark.parametrize('hybridize', [False, True], ids=['imperative', 'hybridized'])
def test_convert_before_deferred_initialization(hybridize):
    mx.random.seed(0)
    net = nn.HybridSequential(prefix='d_')
    with net.name_scope():
        net.add(nn.Conv2D(8, 3, padding=1), nn.BatchNorm(), nn.Activation('relu'),
                nn.GlobalAvgPool2D(), nn.Dense(5))
    qat.convert_model(net)
    net.initialize(mx.init.Xavier())
    if hybridize:
        net.hybridize()
    out = net(mx.nd.ones((2, 3, 6, 6)))
    assert out.shape == (2, 5) and np.all(np.isfinite(out.asnumpy()))
    assert net[0].weight.shape == (8, 3, 3, 3)
