"""Export and verify, judged with the real ncnn runtime, a numpy oracle and protobuf.

GluonCV models (random init, BN statistics randomized so folding matters, calibrated on a few
batches) are exported; ncnn runs the fp32 and int8 models. Tolerances are named:
  FP32_RELATIVE  fp32 ncnn vs MXNet float, max|diff| / max|float| (issue target 1e-4)
  FLOAT_ROUNDING_LSB  fp32 layers of the int8 model vs the simulation
  every int8 layer of ncnn vs the simulation: 0 LSB with packing off (bit-exact), hence
  >= 99.9 % (WITHIN_1LSB) of output elements within 1 LSB; with the default packing the
  pack-8 depthwise kernel's approximate reciprocal (docs/ncnn-int8-contract.md §4.2) flips codes that spread
  through a random-init MobileNet (top-1 still agrees).
"""
import json
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import qat
from tests.helpers import randomize_bn
from qat import reference
from qat.deploy import caffe, export, ncnn as ncnn_files, trace, verify
from qat.app.data import batches, digits
from qat.app.models import calibrated_random as calibrated_random_model
from qat.app.trainer import fit
from qat.deploy import winograd
from qat.deploy.ir import Graph, Layer
from qat.deploy.graph import ExportError
from qat.deploy.table import read_table
from qat.deploy.verify import EXACT_OPTIONS, THRESHOLDS, NcnnModel, _failures

FP32_RELATIVE = 1e-4
FLOAT_ROUNDING_LSB = 1e-3  # a few float32 ulps of a value, in LSBs of its int8 step
WITHIN_1LSB = 0.999
MODELS = [('cifar_resnet20_v1', 32), ('resnet18_v1', 64), ('mobilenet1.0', 64),
          ('mobilenetv2_1.0', 64)]


def calibrated_model(name, size, seed=0):
    """A random-init GluonCV net, BN statistics randomized, calibrated, BN frozen; and two
    batches of random images."""
    net = calibrated_random_model(name, size, seed)
    rs = np.random.RandomState(seed + 1)
    return net, [mx.nd.array(rs.normal(0, 1, (4, 3, size, size))) for _ in range(2)]


@pytest.fixture(scope='module', params=MODELS, ids=[m for m, _ in MODELS])
def exported(request, tmp_path_factory):
    name, size = request.param
    net, data = calibrated_model(name, size)
    folder = str(tmp_path_factory.mktemp(name))
    paths = export(net, folder, (3, size, size), name='model')
    return net, data, folder, paths, size


def test_export_writes_every_file_and_nothing_else(exported):
    _, _, folder, paths, _ = exported
    assert sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p in paths.values())
    int8, fp32 = (os.path.getsize(paths['int8_bin']), os.path.getsize(paths['bin']))
    assert 0.24 < int8 / fp32 <= 0.27  # int8 weights + fp32 bias and scales


def test_fp32_ncnn_matches_float_and_int8_matches_simulation(exported):
    """ncnn's default (packed) kernels. Its pack-8 depthwise kernel uses an approximate
    reciprocal (docs/ncnn-int8-contract.md §4.2), so MobileNets are not bit-exact there: the 1-LSB criterion is
    judged on the exact path below; here the top-1 and the fp32 model."""
    net, data, folder, _, _ = exported
    report = verify(net, folder, [data[0]], packing=True, min_within_1lsb=0.0)
    assert report['fp32']['max_relative_error'] <= FP32_RELATIVE
    assert report['int8']['top1_agreement'] == 1.0
    assert report['passed']


def test_int8_bit_exact_with_packing_off(exported):
    net, data, folder, _, _ = exported
    report = verify(net, folder, [data[1]], packing=False)
    assert report['int8']['top1_agreement'] == 1.0
    assert report['int8']['within_1lsb'] >= WITHIN_1LSB
    assert report['int8']['max_abs_error'] == 0.0
    for layer in report['layers']:
        # fp32 layers (pooling sums in another order) differ by float rounding only, far
        # below the step of the quantizer that follows: no code differs anywhere.
        assert layer['max_lsb'] <= (0.0 if layer['int8'] else FLOAT_ROUNDING_LSB), layer
        assert layer.get('code_mismatches', 0) == 0, layer


def _sim_weight_codes(net):
    """{layer name: int8 codes} recomputed with the numpy oracle from the net's parameters."""
    codes = {}
    for _, block in qat.quant_blocks(net):
        weight = block.weight.data().asnumpy()
        bias = block.bias.data().asnumpy() if getattr(block, 'bias', None) is not None else None
        if isinstance(block, qat.QConv2DBatchNorm):
            bn = block._bn_kwargs
            weight, bias = reference.fold_bn(weight, bias, block.gamma.data().asnumpy(),
                                             block.beta.data().asnumpy(),
                                             block.running_mean.data().asnumpy(),
                                             block.running_var.data().asnumpy(), bn['eps'],
                                             bn['fix_gamma'])
        threshold = reference.weight_threshold(weight, block.groups)
        scale = reference.scale_from_threshold(threshold, block.config.weight_bits)
        shape = (-1,) + (1,) * (weight.ndim - 1)
        codes[block.name] = reference.quantize(weight, scale.reshape(shape))
    return codes


def test_every_int8_weight_code_identical(exported):
    net, _, _, paths, _ = exported
    written = ncnn_files.read_weights(paths['int8_param'], paths['int8_bin'])
    expected = _sim_weight_codes(net)
    int8_layers = {name: blobs for name, blobs in written.items() if 'input_scale' in blobs}
    assert set(int8_layers) == set(expected)
    for name, blobs in int8_layers.items():
        assert blobs['weight'].dtype == np.int8
        np.testing.assert_array_equal(blobs['weight'], expected[name].reshape(-1), err_msg=name)


def _reference_layer(layer, inputs, top_scale):
    """ncnn's int8 Convolution / InnerProduct in numpy integer arithmetic (docs/ncnn-int8-contract.md §3.2)."""
    quant, p = layer.quant, layer.params
    x = inputs[0]
    requantized_input = x.dtype == np.int32
    codes = x if requantized_input else reference.quantize(x, quant.input_scale)
    weight_codes = quant.weight_codes.astype(np.int32)
    if layer.kind == 'Convolution':
        codes = codes.reshape(len(codes), *codes.shape[1:], *(1,) * (3 - codes.ndim))
        acc = reference.conv2d_int(codes[None], weight_codes, p['stride'], p['pad'],
                                   p['dilate'], p['groups'])[0]
        y = reference.dequantize(acc, quant.input_scale, quant.weight_scales,
                                 layer.weights.get('bias'), channel_axis=0)
    else:
        acc = codes.reshape(1, -1).astype(np.int64) @ weight_codes.reshape(
            len(weight_codes), -1).T.astype(np.int64)
        y = reference.dequantize(acc, quant.input_scale, quant.weight_scales,
                                 layer.weights.get('bias'), fused=False)[0]
    act = p['activation']
    if act is not None and act[0] == 'relu':
        y = np.maximum(y, np.float32(0))
    elif act is not None and act[0] == 'clip':
        y = np.clip(y, np.float32(act[1]), np.float32(act[2]))
    if top_scale is not None:
        return reference.quantize(y, top_scale)
    return y


def test_ncnn_int8_layers_bit_exact_against_numpy_reference(exported):
    """Each int8 layer, fed ncnn's own input blob, gives ncnn's output blob bit for bit."""
    net, data, _, paths, size = exported
    graph = trace(net, (3, size, size))
    model = NcnnModel(paths['int8_param'], paths['int8_bin'], use_packing_layout=False,
                      **EXACT_OPTIONS)
    blobs = model.run(data[0][0].asnumpy(), [layer.name for layer in graph.layers[1:]])
    blobs['data'] = data[0][0].asnumpy()
    requantized = {layer.name: ncnn_files.requantized_scale(graph, layer)
                   for layer in graph.layers}
    checked = 0
    for layer in graph.layers:
        if layer.quant is None or not layer.quant.int8:
            continue
        source = layer.inputs[0]
        x = blobs[source]
        if requantized.get(source) is not None:
            x = np.rint(x).astype(np.int32)  # ncnn hands over int8 codes
        expected = _reference_layer(layer, [x], requantized[layer.name])
        np.testing.assert_array_equal(np.asarray(expected, np.float32).reshape(-1),
                                      blobs[layer.name].reshape(-1), err_msg=layer.name)
        checked += 1
    assert checked == sum(1 for _ in qat.quant_blocks(net))


def test_caffe_files_parse_back_into_the_same_graph(exported):
    net, _, _, paths, size = exported
    graph = trace(net, (3, size, size))
    layers = {layer.name: layer for layer in caffe.read_prototxt(paths['prototxt'])}
    blobs = caffe.read_caffemodel(paths['caffemodel'])
    for layer in graph.layers[1:]:
        assert layer.name in layers, layer.name
        assert list(layers[layer.name].bottoms) == layer.inputs
        if layer.kind in ('Convolution', 'InnerProduct'):
            weights = blobs[layer.name][1]
            np.testing.assert_array_equal(weights[0].reshape(layer.weights['weight'].shape),
                                          layer.weights['weight'])
            if layer.params['bias_term']:
                np.testing.assert_array_equal(weights[1], layer.weights['bias'])


def test_table_parses_into_the_same_scales(exported):
    net, _, _, paths, size = exported
    graph = trace(net, (3, size, size))
    weight_scales, input_scales = read_table(paths['table'])
    int8 = [layer for layer in graph.layers if layer.quant is not None and layer.quant.int8]
    assert set(weight_scales) == set(input_scales) == {layer.name for layer in int8}
    for layer in int8:
        np.testing.assert_array_equal(weight_scales[layer.name], layer.group_scales())
        assert input_scales[layer.name] == layer.quant.input_scale
    written = ncnn_files.read_weights(paths['int8_param'], paths['int8_bin'])
    for layer in int8:  # the int8 model carries the same scales
        np.testing.assert_array_equal(written[layer.name]['weight_scales'],
                                      weight_scales[layer.name])
        assert written[layer.name]['input_scale'][0] == input_scales[layer.name]


# ----- bad input: a clear error and no files -------------------------------------------------
def _small(act='relu'):
    net = nn.HybridSequential(prefix='small_')
    with net.name_scope():
        net.add(nn.Conv2D(4, 3, padding=1, in_channels=3), nn.Activation(act),
                nn.Dense(3, in_units=4 * 6 * 6))
    net.initialize()
    net(mx.nd.ones((1, 3, 6, 6)))
    qat.convert_model(net)
    return net


def test_unsupported_op_names_op_and_block_and_writes_nothing(tmp_path):
    net = _small('softsign')  # an activation ncnn has no layer for
    qat.calibrate(net, [mx.nd.ones((1, 3, 6, 6))])
    with pytest.raises(ExportError, match=r"'Activation' \(node 'small_softsign0_fwd' in block small_softsign0\)"):
        export(net, str(tmp_path / 'out'), (3, 6, 6))
    assert not (tmp_path / 'out').exists()


def test_uncalibrated_net_names_the_layer_and_writes_nothing(tmp_path):
    net = _small()
    with pytest.raises(ExportError, match=r"small_conv0: input range is unset"):
        export(net, str(tmp_path / 'out'), (3, 6, 6))
    assert not (tmp_path / 'out').exists()


def test_unwritable_folder_is_a_clear_error(tmp_path):
    net = _small()
    qat.calibrate(net, [mx.nd.ones((1, 3, 6, 6))])
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    with pytest.raises(ExportError, match=r"cannot write to output folder .*file/out"):
        export(net, str(blocker / 'out'), (3, 6, 6))
    assert os.listdir(tmp_path) == ['file']


def test_failed_write_leaves_no_partial_files(tmp_path, monkeypatch):
    net = _small()
    qat.calibrate(net, [mx.nd.ones((1, 3, 6, 6))])

    def broken(*args):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(caffe, 'write_caffe', broken)
    with pytest.raises(ExportError, match='No space left'):
        export(net, str(tmp_path), (3, 6, 6))
    assert os.listdir(tmp_path) == []


def test_narrow_inputs_get_a_clip_so_ncnn_saturates_like_the_simulation(tmp_path):
    """4-bit inputs saturate at +-7 in the simulation; ncnn saturates at +-127, so the export
    clips in front: the int8 output still equals the simulation exactly (packing off)."""
    net = _small()
    for _, block in qat.quant_blocks(net):
        block.config = qat.QuantConfig(weight_bits=4, input_bits=4)
    rs = np.random.RandomState(1)
    data = mx.nd.array(rs.normal(0, 1, (8, 3, 6, 6)))
    qat.calibrate(net, [data[:2] * 0.3])  # a small range: most inputs saturate
    export(net, str(tmp_path), (3, 6, 6))
    params = ncnn_files.read_param(str(tmp_path / 'model-int8.param'))
    assert [kind for kind, *_ in params].count('Clip') == 2
    fp32 = ncnn_files.read_param(str(tmp_path / 'model.param'))
    assert [kind for kind, *_ in fp32].count('Clip') == 0  # the float model stays float
    report = verify(net, str(tmp_path), [data], packing=False)
    assert report['int8']['max_abs_error'] == 0.0
    assert report['fp32']['max_relative_error'] <= FP32_RELATIVE



@pytest.mark.parametrize('bits', [2, 4, 7])
def test_unsigned_narrow_inputs_export_and_run_exactly_in_ncnn(tmp_path, bits):
    """Unsigned codes (0 .. 2^b - 1, b <= 7) fit ncnn's int8: the Clip in front saturates at 0
    and at the top code, and the int8 output equals the simulation exactly, negative inputs
    included (the first conv sees signed data)."""
    net = _small()
    for _, block in qat.quant_blocks(net):
        block.config = qat.QuantConfig(weight_bits=4, input_bits=bits, input_signed=False)
    data = mx.nd.array(np.random.RandomState(1).normal(0, 1, (8, 3, 6, 6)))
    qat.calibrate(net, [data[:2] * 0.3])  # a small range: most inputs saturate
    export(net, str(tmp_path), (3, 6, 6))
    clips = [layer for layer in ncnn_files.read_param(str(tmp_path / 'model-int8.param'))
             if layer[0] == 'Clip']
    assert len(clips) == 2
    report = verify(net, str(tmp_path), [data], packing=False)
    assert report['int8']['max_abs_error'] == 0.0


def test_unsigned_8_bit_inputs_do_not_fit_int8(tmp_path):
    net = _small()
    for _, block in qat.quant_blocks(net):
        block.config = qat.QuantConfig(input_signed=False)
    qat.calibrate(net, [mx.nd.ones((2, 3, 6, 6))])
    with pytest.raises(ExportError, match=r"small_conv0: unsigned 8-bit input codes \(0...255\) "
                                          r"do not fit ncnn's int8"):
        export(net, str(tmp_path), (3, 6, 6))
    assert os.listdir(tmp_path) == []

def _digits_net():
    net = nn.HybridSequential(prefix='digits_')
    with net.name_scope():
        net.add(nn.Conv2D(16, 3, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation('relu'),
                nn.Conv2D(32, 3, strides=2, padding=1, use_bias=False), nn.BatchNorm(),
                nn.Activation('relu'),
                nn.Conv2D(32, 3, padding=1, groups=32, use_bias=False), nn.BatchNorm(),
                nn.Activation('relu'),
                nn.Conv2D(32, 1), nn.Activation('relu'),
                nn.MaxPool2D(2), nn.GlobalAvgPool2D(), nn.Dense(10))
    return net


def test_digits_trained_model_agrees_with_ncnn_on_every_test_image(tmp_path):
    """A model trained on the bundled digits (float, then one epoch of QAT, BN frozen) runs in
    ncnn int8 with the simulation's exact top-1 on all 359 test images."""
    (x, y), (x_test, y_test) = digits(size=16)
    mx.random.seed(0)
    net = _digits_net()
    net.initialize(mx.init.Xavier())
    net.hybridize()
    fit(net, x, y, epochs=6, seed=0, progress=lambda line: None)
    qat.convert_model(net)
    qat.calibrate(net, batches(x, y, 64), num_batches=5)
    fit(net, x, y, epochs=1, seed=1, progress=lambda line: None,
        optimizer_params={'learning_rate': 0.01, 'momentum': 0.9})
    qat.freeze_bn(net)
    qat.freeze_ranges(net)
    export(net, str(tmp_path), (3, 16, 16))
    report = verify(net, str(tmp_path), batches(x_test, y_test, 128))
    assert report['samples'] == len(y_test) == 359
    assert report['int8']['top1_agreement'] == 1.0
    assert report['int8']['within_1lsb'] >= WITHIN_1LSB
    assert report['accuracy']['ncnn_int8'] == report['accuracy']['simulated'] > 0.9


def _winograd_candidates(graph):
    for layer in graph.layers:
        p = layer.params
        if layer.kind == 'Convolution' and layer.quant is not None and layer.quant.int8:
            variant = winograd.uses_winograd(p['kernel'], p['stride'], p['dilate'], p['groups'],
                                             layer.weights['weight'].shape[1] * p['groups'],
                                             p['num_output'])
            if variant is not None:
                yield layer, variant


def _adversarial_errors(layer, variant, guarded, tmp_path):
    """Max |ncnn - integer reference| of ``layer`` alone (as exported) on the input that
    drives its accumulator to the worst case for Winograd."""
    quant = layer.quant
    codes = winograd.adversarial_input(quant.weight_codes, layer.params['groups'],
                                       variant=variant)
    x = (codes / quant.input_scale).astype(np.float32)
    assert np.array_equal(reference.quantize(x, quant.input_scale), codes)  # codes survive
    single = Graph([Layer('Input', 'data', [], {'shape': x.shape}),
                    Layer('Convolution', 'conv', ['data'], dict(layer.params, activation=None),
                          layer.weights, quant)], ['conv'])
    param, binary = ncnn_files.render(single, int8=True, guarded={'conv'} if guarded else ())
    (tmp_path / 'one.param').write_text(param)
    (tmp_path / 'one.bin').write_bytes(binary)
    model = NcnnModel(str(tmp_path / 'one.param'), str(tmp_path / 'one.bin'), **EXACT_OPTIONS)
    out = model.run(x, ['conv'])['conv']
    p = layer.params
    acc = reference.conv2d_int(codes[None], quant.weight_codes, p['stride'], p['pad'],
                               p['dilate'], p['groups'])[0]
    expected = reference.dequantize(acc, quant.input_scale, quant.weight_scales,
                                    layer.weights.get('bias'), channel_axis=0)
    return float(np.abs(out - expected).max())


@pytest.mark.parametrize('policy', ['off', 'bound'])
def test_no_exported_layer_can_go_wrong_in_int8_winograd(tmp_path, policy):
    """Every 3x3 stride-1 int8 conv of an exported net, fed the input that drives ncnn's
    int8 Winograd to its worst case, gives exactly the integer reference under the export's
    own Winograd decision (both safe policies); the same input breaks the layers that would
    keep Winograd under the 'unsafe' policy, so the test can fail."""
    net, _ = calibrated_model('cifar_resnet20_v1', 32)
    export(net, str(tmp_path), (3, 32, 32), winograd=policy)
    manifest = json.loads((tmp_path / 'model.json').read_text())
    guarded = {layer['name'] for layer in manifest['layers'] if layer.get('winograd_guard')}
    graph = trace(net, (3, 32, 32))
    broken_without_guard = 0
    for layer, variant in _winograd_candidates(graph):
        assert _adversarial_errors(layer, variant, layer.name in guarded, tmp_path) == 0.0, \
            layer.name
        broken_without_guard += _adversarial_errors(layer, variant, False, tmp_path) > 0
    assert broken_without_guard >= 1


class _EveryOp(mx.gluon.HybridBlock):
    """A net using every op the exporter supports, traced from MXNet (not hand-mapped)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.bn_in = nn.BatchNorm()                                       # stand-alone BN
            self.conv_a = nn.Conv2D(8, 3, padding=1)
            self.leaky = nn.LeakyReLU(0.1)
            self.conv_b = nn.Conv2D(8, 3, padding=2, dilation=2, groups=2)
            self.conv_c = nn.Conv2D(8, 1, activation='sigmoid')
            self.conv_d = nn.Conv2D(16, 3, strides=2, padding=1, use_bias=False)
            self.bn_d = nn.BatchNorm()
            self.max_full = nn.MaxPool2D(2, 2, ceil_mode=True)          # with a tail
            self.avg_valid = nn.AvgPool2D(3, 2, padding=1)
            self.dropout = nn.Dropout(0.5)
            self.dense = nn.Dense(12, activation='relu')
            self.out = nn.Dense(5)

    def hybrid_forward(self, F, x):
        x = self.bn_in(x)
        a = self.leaky(self.conv_a(x))
        b = F.clip(self.conv_b(a), 0, 6)                                     # ReLU6
        c = self.conv_c(a)
        y = F.concat(a + b, c * b, dim=1)                                    # add, mul, concat
        y = F.relu(self.bn_d(self.conv_d(y)))
        y = F.maximum(self.max_full(y), self.avg_valid(y))
        y = F.Flatten(self.dropout(y))
        return F.softmax(self.out(self.dense(y)), axis=-1)


def test_every_supported_op_exports_and_runs_in_ncnn(tmp_path):
    rs = np.random.RandomState(3)
    mx.random.seed(3)
    net = _EveryOp(prefix='every_')
    net.initialize()
    data = mx.nd.array(rs.normal(0, 1, (6, 3, 10, 10)))
    net(data)
    randomize_bn(net, rs)
    qat.convert_model(net)
    qat.calibrate(net, [data], method='max')
    export(net, str(tmp_path), (3, 10, 10))
    layers = ncnn_files.read_param(str(tmp_path / 'model-int8.param'))
    kinds = [kind for kind, *_ in layers]
    for kind in ('BatchNorm', 'Convolution', 'ConvolutionDepthWise', 'Eltwise', 'Concat', 'Pooling', 'Flatten', 'InnerProduct', 'Softmax', 'Split'):
        assert kind in kinds, kind
    assert 'Dropout' not in kinds and 'ReLU' not in kinds and 'Clip' not in kinds
    fused = {params.get(9) for kind, _, _, _, params in layers
             if kind in ('Convolution', 'ConvolutionDepthWise', 'InnerProduct')}
    assert {1, 2, 3, 4} <= fused  # relu, leaky, clip (ReLU6), sigmoid fused into their layer
    eltwise = {params.get(0) for kind, _, _, _, params in layers if kind == 'Eltwise'}
    assert eltwise == {0, 1, 2}  # prod, sum, max
    report = verify(net, str(tmp_path), [data], packing=False)
    assert report['fp32']['max_relative_error'] <= FP32_RELATIVE
    assert report['int8']['top1_agreement'] == 1.0
    assert report['int8']['within_1lsb'] == 1.0
    caffe_types = {layer.type for layer in caffe.read_prototxt(str(tmp_path / 'model.prototxt'))}
    assert {'BatchNorm', 'Scale', 'ReLU', 'Sigmoid', 'Clip', 'Eltwise', 'Concat',
            'Softmax'} <= caffe_types


@pytest.mark.parametrize('how', ['no fake BN', 'conv excluded'])
def test_batchnorm_left_by_the_converter_is_folded_into_its_conv(tmp_path, how):
    """A real BatchNorm after a conv (fake BN off, or the conv excluded) is folded at export
    with the same fold function: no BatchNorm layer remains and ncnn agrees with the net."""
    rs = np.random.RandomState(4)
    mx.random.seed(4)
    net = nn.HybridSequential(prefix='fold_')
    with net.name_scope():
        net.add(nn.Conv2D(8, 3, padding=1, in_channels=3), nn.BatchNorm(in_channels=8),
                nn.Activation('relu'), nn.Conv2D(8, 3, padding=1, in_channels=8),
                nn.BatchNorm(in_channels=8), nn.Activation('relu'), nn.GlobalAvgPool2D(),
                nn.Dense(4, in_units=8))
    net.initialize()
    data = mx.nd.array(rs.normal(0, 1, (8, 3, 8, 8)))
    net(data)
    randomize_bn(net, rs)
    if how == 'no fake BN':
        qat.convert_model(net, config=qat.QuantConfig(fake_bn=False))
    else:
        qat.convert_model(net, exclude=['fold_conv1'])
    qat.calibrate(net, [data], method='max')
    export(net, str(tmp_path), (3, 8, 8))
    kinds = [kind for kind, *_ in ncnn_files.read_param(str(tmp_path / 'model-int8.param'))]
    assert 'BatchNorm' not in kinds and kinds.count('Convolution') == 2
    report = verify(net, str(tmp_path), [data], packing=False)
    assert report['fp32']['max_relative_error'] <= FP32_RELATIVE
    assert report['int8']['top1_agreement'] == 1.0
    assert report['int8']['within_1lsb'] >= WITHIN_1LSB


def test_a_nan_figure_fails_every_threshold():
    """NaN compares false with everything: a report with NaN outputs must not pass."""
    nan = float('nan')
    report = {'int8': {'top1_agreement': nan, 'within_1lsb': 1.0},
              'fp32': {'max_relative_error': nan}}
    failures = _failures(report, dict(THRESHOLDS))
    assert [line.split(':')[0] for line in failures] == ['min_top1_agreement',
                                                          'max_fp32_relative_error']
    good = {'int8': {'top1_agreement': 1.0, 'within_1lsb': 1.0},
            'fp32': {'max_relative_error': 0.0}}
    assert _failures(good, dict(THRESHOLDS)) == []


def test_verify_notes_inputs_beyond_int32_codes():
    """ncnn converts x * scale through int32: an input that outruns its range that far gets
    a note naming the layer (the codes then differ for reasons no export can fix)."""
    from qat.deploy.verify import overflow_notes
    manifest = {'layers': [{'name': 'data', 'kind': 'Input', 'inputs': [], 'source': 'data',
                            'int8': False},
                           {'name': 'conv', 'kind': 'Convolution', 'inputs': ['data'],
                            'source': 'conv_fwd', 'int8': True, 'input_scale': 1000.0},
                           {'name': 'fc', 'kind': 'InnerProduct', 'inputs': ['conv'],
                            'source': 'fc_fwd', 'int8': True, 'input_scale': 10.0}]}
    samples = np.full((1, 3, 2, 2), 3e6, np.float32)  # 3e9 codes
    notes = overflow_notes(manifest, {'conv_fwd': np.ones((1, 4))}, samples)
    assert len(notes) == 1 and notes[0].startswith('conv: its input reaches 3e+06, 3e+09')
    assert overflow_notes(manifest, {'conv_fwd': np.ones((1, 4))}, samples / 1e3) == []
