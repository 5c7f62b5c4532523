"""Importers (``qat.importers``): a model file -> a Gluon net of standard layers, judged
against an oracle that does not go through the importer.

* MXNet symbol files written by ``HybridBlock.export``: the original Gluon net;
* ONNX written by MXNet's exporter: onnxruntime on the same file;
* ncnn fp32 files, ours (``qat.deploy.export``) and pnnx's: the ncnn runtime on the same
  files; our Caffe files: the ncnn import of the same export;
* a Caffe model composed here as protobuf messages and prototxt text (not by our writer):
  the same small net computed in numpy (float64);

then the line on an imported model (convert, calibrate, int8 export, verify; the
``qat calibrate`` command; a recipe with QAT), and the one clear error of a layer we cannot
read.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import HybridBlock, nn

import qat
from qat.app import ptq
from qat.cli import main as qat_main
from qat.deploy.caffe import caffe_messages
from qat.importers import IMPORTERS, GraphNet, UnsupportedLayerError, import_model
from qat.modes import freeze_bn
from qat.nn import quant_blocks

from .helpers import naive_conv2d_f64, randomize_bn, tiny_recipe

# Tolerances, each with its reason.
SYMBOL_ATOL = 1e-5      # the same MXNet operators on the same weights: equal up to float32
ONNX_ATOL = 1e-4        # onnxruntime's kernels sum in another order than MXNet's
NCNN_RTOL = 1e-5        # ncnn's fp32 kernels (packing, fma) vs MXNet's: relative to max|out|
CAFFE_ATOL = 1e-5       # float32 net vs the float64 numpy computation of the same net

# (GluonCV model, input size): classification families of the zoo sweep at small inputs
NETS = (('resnet18_v1', 32), ('mobilenet0.25', 32), ('mobilenetv2_0.25', 32),
        ('squeezenet1.1', 209), ('cifar_resnet20_v1', 32), ('mobilenetv3_small', 32),
        ('shufflenet_v2', 32))


def _gluoncv(name, size, seed=0):
    """A GluonCV net with random weights and random BN statistics (so that BN is not an
    identity), hybridized, shapes known."""
    from gluoncv.model_zoo import get_model
    mx.random.seed(seed)
    with mx.name.NameManager():
        net = get_model(name, pretrained=False, **({'classes': 10} if 'cifar' in name else {}))
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, size, size)))
    randomize_bn(net, np.random.RandomState(seed))
    net.hybridize()
    net(mx.nd.zeros((1, 3, size, size)))  # export needs the hybridized graph
    return net


def _images(size, count=2, seed=1):
    return np.random.RandomState(seed).normal(0, 1, (count, 3, size, size)).astype(np.float32)


def _convs(net):
    """The conv names, as ncnn / Caffe layer names (letters, digits, _)."""
    return sorted(re.sub(r'\W', '_', b.name) for _, b in _walk(net) if isinstance(b, nn.Conv2D))


def _walk(net):
    for key, child in net._children.items():
        yield key, child
        yield from _walk(child)


# ----- MXNet symbol files --------------------------------------------------------------------
@pytest.mark.parametrize('name, size', NETS, ids=[n for n, _ in NETS])
def test_symbol_files_import_to_the_same_net(name, size, tmp_path):
    net = _gluoncv(name, size)
    x = mx.nd.array(_images(size))
    expected = net(x).asnumpy()
    net.export(str(tmp_path / 'net'))
    imported = import_model(str(tmp_path / 'net-symbol.json'))
    assert isinstance(imported, GraphNet)
    got = imported(x).asnumpy()
    assert np.abs(got - expected).max() <= SYMBOL_ATOL
    # the blocks are standard Gluon layers named after the source layers
    assert _convs(imported) == _convs(net)
    assert sum(isinstance(b, nn.BatchNorm) for _, b in _walk(imported)) == \
        sum(isinstance(b, nn.BatchNorm) for _, b in _walk(net))


def test_a_symbol_block_becomes_a_graph_net_convert_model_converts(tmp_path):
    net = _gluoncv('mobilenet0.25', 32)
    net.export(str(tmp_path / 'net'))
    block = mx.gluon.SymbolBlock.imports(str(tmp_path / 'net-symbol.json'), ['data'],
                                         str(tmp_path / 'net-0000.params'))
    imported = qat.importers.symbol.from_block(block)
    x = mx.nd.array(_images(32))
    assert np.abs(imported(x).asnumpy() - block(x).asnumpy()).max() <= SYMBOL_ATOL
    qat.convert_model(imported)
    assert len(quant_blocks(imported)) == len(_convs(net)) + 1  # the convs and the Dense


# ----- ONNX -----------------------------------------------------------------------------------
def _onnx_export(net, size, path):
    """Gluon -> ONNX with MXNet's exporter, stamped opset 13 / IR 8: the exporter stamps the
    onnx package's newest opset, which onnxruntime 1.17 does not load (the translations are
    the opset-13 ones)."""
    onnx = pytest.importorskip('onnx')
    net.export(str(path) + '-mx')
    mx.onnx.export_model(str(path) + '-mx-symbol.json', str(path) + '-mx-0000.params',
                         [(1, 3, size, size)], [np.float32], str(path))
    model = onnx.load(str(path))
    model.ir_version = 8
    model.opset_import[0].version = 13
    onnx.save(model, str(path))
    return str(path)


def _onnxruntime(path, x):
    ort = pytest.importorskip('onnxruntime')
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


ONNX_NETS = tuple(n for n in NETS if n[0] not in ('squeezenet1.1', 'shufflenet_v2'))


@pytest.mark.parametrize('name, size', ONNX_NETS, ids=[n for n, _ in ONNX_NETS])
def test_onnx_import_matches_onnxruntime(name, size, tmp_path):
    net = _gluoncv(name, size)
    path = _onnx_export(net, size, tmp_path / 'net.onnx')
    x = _images(size, count=1)
    expected = _onnxruntime(path, x)
    imported = import_model(path)
    got = imported(mx.nd.array(x)).asnumpy()
    assert np.abs(got - expected).max() <= ONNX_ATOL
    assert _convs(imported) == _convs(net)  # read directly: the names kept


def _onnx_graph(tmp_path, op, **attrs):
    """A two-node ONNX model: a 3x3 conv, then ``op``."""
    onnx = pytest.importorskip('onnx')
    from onnx import TensorProto, helper, numpy_helper
    rs = np.random.RandomState(0)
    weight = numpy_helper.from_array(rs.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), 'w')
    graph = helper.make_graph(
        [helper.make_node('Conv', ['x', 'w'], ['c'], name='conv', kernel_shape=[3, 3],
                          pads=[1, 1, 1, 1]),
         helper.make_node(op, ['c'], ['y'], name='second', **attrs)],
        'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 3, 8, 8]),
              helper.make_tensor_value_info('w', TensorProto.FLOAT, [4, 3, 3, 3])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, None)], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])
    model.ir_version = 8
    path = str(tmp_path / f'{op}.onnx')
    onnx.save(model, path)
    return path


def test_onnx_node_the_reader_lacks_goes_through_mxnets_import(tmp_path):
    path = _onnx_graph(tmp_path, 'Softsign')
    x = _images(8, count=1)
    got = import_model(path)(mx.nd.array(x)).asnumpy()
    assert np.abs(got - _onnxruntime(path, x)).max() <= ONNX_ATOL


def test_onnx_shape_and_resize_nodes_match_onnxruntime(tmp_path):
    """What PyTorch exports beside convolutions: Pad, Resize (bilinear to a size, nearest by
    2), Slice, Split, Concat, ReduceMean, Unsqueeze / Squeeze, a constant per-channel Mul,
    Softplus, Exp, MatMul."""
    onnx = pytest.importorskip('onnx')
    from onnx import TensorProto, helper, numpy_helper
    rs = np.random.RandomState(0)
    consts = {'w': rs.normal(0, 0.5, (4, 3, 3, 3)), 'pads': np.array([0, 0, 1, 2, 0, 0, 1, 2]),
              'sizes': np.array([1, 4, 7, 9]), 'scales': np.array([1, 1, 2, 2], np.float32),
              'starts': np.array([1, 0]), 'ends': np.array([6, 8]), 'axes': np.array([2, 3]),
              'gain': rs.uniform(0.5, 1.5, (8, 1, 1)), 'mm': rs.normal(0, 0.5, (8, 3)),
              'ax0': np.array([0])}
    node = helper.make_node
    nodes = [
        node('Conv', ['x', 'w'], ['c'], name='conv', kernel_shape=[3, 3]),
        node('Pad', ['c', 'pads'], ['p'], name='pad', mode='reflect'),
        node('Resize', ['p', '', '', 'sizes'], ['r'], name='resize', mode='linear'),
        node('Resize', ['r', '', 'scales'], ['u'], name='up', mode='nearest'),
        node('Slice', ['u', 'starts', 'ends', 'axes'], ['s'], name='crop'),
        node('Split', ['s'], ['s0', 's1'], name='halves', axis=1),
        node('Concat', ['s1', 's0', 's'], ['cat'], name='cat', axis=1),
        node('Mul', ['cat', 'gain'], ['g'], name='gain'),
        node('Softplus', ['g'], ['sp'], name='softplus'),
        node('ReduceMean', ['sp'], ['m'], name='gap', axes=[2, 3], keepdims=0),
        node('Exp', ['m'], ['e'], name='exp'),
        node('Unsqueeze', ['e', 'ax0'], ['ue'], name='unsq'),
        node('Squeeze', ['ue', 'ax0'], ['se'], name='sq'),
        node('MatMul', ['se', 'mm'], ['y'], name='fc')]
    graph = helper.make_graph(
        nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 3, 8, 10])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32 if v.dtype.kind == 'f' else np.int64), k)
         for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])
    model.ir_version = 8
    path = str(tmp_path / 'shapes.onnx')
    onnx.save(model, path)
    x = _images(10, count=1)[:, :, :8, :]
    got = import_model(path)(mx.nd.array(x)).asnumpy()
    expected = _onnxruntime(path, x)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= ONNX_ATOL * max(1, np.abs(expected).max())


def test_onnx_view_by_the_batch_size_keeps_the_batch(tmp_path):
    """PyTorch's ``x.view(x.size(0), -1)``: Shape -> Gather -> Unsqueeze -> Concat ->
    Reshape, on an input whose batch size is symbolic; run at batch 3."""
    onnx = pytest.importorskip('onnx')
    from onnx import TensorProto, helper, numpy_helper
    rs = np.random.RandomState(0)
    consts = {'w': rs.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32),
              'fc': rs.normal(0, 0.5, (5, 4 * 6 * 6)).astype(np.float32),
              'zero': np.array(0, np.int64), 'ax0': np.array([0], np.int64),
              'rest': np.array([-1], np.int64)}
    node = helper.make_node
    nodes = [node('Conv', ['x', 'w'], ['c'], name='conv', kernel_shape=[3, 3]),
             node('Shape', ['c'], ['shape'], name='shape'),
             node('Gather', ['shape', 'zero'], ['n'], name='n', axis=0),
             node('Unsqueeze', ['n', 'ax0'], ['n1'], name='n1'),
             node('Concat', ['n1', 'rest'], ['target'], name='target', axis=0),
             node('Reshape', ['c', 'target'], ['flat'], name='view'),
             node('Gemm', ['flat', 'fc'], ['y'], name='fc', transB=1)]
    graph = helper.make_graph(
        nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['N', 3, 8, 8])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])
    model.ir_version = 8
    path = str(tmp_path / 'view.onnx')
    onnx.save(model, path)
    x = _images(8, count=3)
    got = import_model(path)(mx.nd.array(x)).asnumpy()
    expected = _onnxruntime(path, x)
    assert got.shape == expected.shape == (3, 5)
    assert np.abs(got - expected).max() <= ONNX_ATOL * max(1, np.abs(expected).max())


def test_onnx_node_nobody_reads_is_one_error(tmp_path):
    path = _onnx_graph(tmp_path, 'Shrink')
    with pytest.raises(UnsupportedLayerError, match=f"{path}: layer 'second' of type 'Shrink'"):
        import_model(path)


# ----- ncnn fp32 (and our Caffe files) --------------------------------------------------------
def _ncnn_fp32(param, bin_path, x, input_name, output_name):
    import ncnn
    net = ncnn.Net()
    net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = net.opt.use_fp16_packed = False
    net.load_param(param)
    net.load_model(bin_path)
    outs = []
    for sample in x:
        sample = np.ascontiguousarray(sample)  # kept alive: the Mat reads its memory
        extractor = net.create_extractor()
        extractor.input(input_name, ncnn.Mat(sample))
        _, out = extractor.extract(output_name)
        outs.append(np.array(out).ravel())
    return np.stack(outs)


class OpsNet(HybridBlock):
    """The layers ncnn writes for what GluonCV nets rarely have: GELU, reflect padding,
    bilinear and nearest resizing, a crop, ELU, PReLU, a deconvolution, max pooling, swish,
    a permute."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv = nn.Conv2D(8, 3, padding=1, in_channels=3)
            self.conv2 = nn.Conv2D(8, 1, in_channels=8)
            self.gelu, self.elu, self.prelu = nn.GELU(), nn.ELU(0.7), nn.PReLU(in_channels=8)
            self.up = nn.Conv2DTranspose(8, 3, strides=2, padding=1, output_padding=1,
                                         in_channels=8)
            self.dense = nn.Dense(5, in_units=144)

    def hybrid_forward(self, F, x):
        y = F.pad(self.gelu(self.conv(x)), mode='reflect', pad_width=(0, 0, 0, 0, 1, 1, 1, 1))
        y = F.slice_axis(F.contrib.BilinearResize2D(y, height=12, width=12), axis=2, begin=1,
                         end=7)
        y = F.UpSampling(self.conv2(self.prelu(self.elu(y))), scale=2, sample_type='nearest')
        y = F.Pooling(self.up(y), kernel=(8, 8), stride=(8, 8), pool_type='max')
        return F.softmax(self.dense(F.transpose(y * F.sigmoid(y), axes=(0, 1, 3, 2))))


def _converted(name, size):
    """A converted, calibrated net with BN frozen (random weights and BN statistics)."""
    if name != 'ops':
        return qat.app.models.calibrated_random(name, size)
    mx.random.seed(0)
    net = OpsNet(prefix='ops_')
    net.initialize(mx.init.Xavier())
    x = mx.nd.array(_images(size, seed=0))
    qat.convert_model(net)
    qat.calibrate(net, [x], method='max')
    freeze_bn(net)
    return net


NCNN_NETS = (('resnet18_v1', 32), ('mobilenet0.25', 32), ('mobilenetv2_0.25', 32),
             ('cifar_resnet20_v1', 32), ('mobilenetv3_small', 32), ('se_resnet18_v1', 32),
             ('shufflenet_v2', 32), ('ops', 10))
SLOW_NCNN = ('resnet18_v1', 'se_resnet18_v1')  # 4-10 s each (the export of a large net)


@pytest.mark.parametrize('name, size', [
    pytest.param(n, size, id=n, marks=[pytest.mark.slow] if n in SLOW_NCNN else [])
    for n, size in NCNN_NETS])
def test_our_ncnn_and_caffe_files_import_to_what_ncnn_computes(name, size, tmp_path):
    net = _converted(name, size)
    paths = qat.export(net, str(tmp_path), (3, size, size))
    output = json.load(open(paths['manifest']))['outputs'][0]
    x = _images(size)
    expected = _ncnn_fp32(paths['param'], paths['bin'], x, 'data', output)
    from_ncnn = import_model(paths['param'])
    got = from_ncnn(mx.nd.array(x)).asnumpy().reshape(len(x), -1)
    assert np.abs(got - expected).max() <= NCNN_RTOL * np.abs(expected).max()
    assert from_ncnn.preprocess['shape'] == (3, size, size)
    if 'prototxt' in paths:  # Caffe: the same model through the other reader
        from_caffe = import_model(paths['prototxt'])(mx.nd.array(x)).asnumpy()
        assert np.abs(from_caffe.reshape(got.shape) - got).max() <= SYMBOL_ATOL


def _pnnx():
    """The pnnx executable of the PyPI package (found without importing the package, which
    wants torch), or one on PATH; None without it."""
    spec = importlib.util.find_spec('pnnx')
    path = os.path.join(os.path.dirname(spec.origin), 'pnnx') if spec else shutil.which('pnnx')
    return path if path and os.access(path, os.X_OK) else None


PNNX = _pnnx()


@pytest.mark.skipif(PNNX is None, reason='pnnx not installed (pip install --no-deps pnnx)')
def test_ncnn_files_written_by_pnnx_import_to_what_ncnn_computes(tmp_path):
    path = _onnx_export(_gluoncv('cifar_resnet20_v1', 32), 32, tmp_path / 'net.onnx')
    subprocess.run([PNNX, path, 'inputshape=[1,3,32,32]'], cwd=tmp_path, check=True,
                   capture_output=True, timeout=120)
    param, bin_path = str(tmp_path / 'net.ncnn.param'), str(tmp_path / 'net.ncnn.bin')
    x = _images(32)
    expected = _ncnn_fp32(param, bin_path, x, 'in0', 'out0')
    got = import_model(param)(mx.nd.array(x)).asnumpy().reshape(len(x), -1)
    assert np.abs(got - expected).max() <= NCNN_RTOL * np.abs(expected).max()


# ----- Caffe composed here --------------------------------------------------------------------
CAFFE_NET = """name: "composed"
%(input)s
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1
                      weight_filler { type: "xavier" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1"
  batch_norm_param { use_global_stats: true } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }
layer { name: "prelu2" type: "PReLU" bottom: "conv2" top: "conv2" }
layer { name: "sum" type: "Eltwise" bottom: "pool1" bottom: "conv2" top: "sum"
  eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "pool1" top: "cat" }
layer { name: "ave" type: "Pooling" bottom: "cat" top: "ave"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "drop" type: "Dropout" bottom: "ave" top: "ave" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc" type: "InnerProduct" bottom: "ave" top: "fc"
  inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
%(extra)s"""
INPUT_LAYER = ('layer { name: "data" type: "Input" top: "data" '
               'input_param { shape { dim: 1 dim: 3 dim: 9 dim: 9 } } }')
DATA_LAYER = ('layer { name: "data" type: "Data" top: "data" top: "label" '
              'transform_param { scale: 0.017 mean_value: 104 mean_value: 117 mean_value: 123 } '
              'data_param { source: "train_lmdb" batch_size: 8 } }')


def _caffe_weights(seed=0):
    rs = np.random.RandomState(seed)
    return {'conv1': [rs.normal(0, 0.5, (4, 3, 3, 3)), rs.normal(0, 0.1, 4)],
            'bn1': [rs.normal(0, 0.2, 4) * 2, rs.uniform(0.5, 1.5, 4) * 2, [2.0]],
            'scale1': [rs.uniform(0.5, 1.5, 4), rs.normal(0, 0.2, 4)],
            'conv2': [rs.normal(0, 0.5, (4, 4, 1, 1))],
            'prelu2': [rs.uniform(0.05, 0.3, 4)],
            'fc': [rs.normal(0, 0.5, (5, 8)), rs.normal(0, 0.1, 5)]}


def _write_blobs(path, weights, legacy=('fc',)):
    """A caffemodel (protobuf messages) of {layer: [arrays]}, the 2-D weights of the
    ``legacy`` layers as (num, channels, height, width) blobs."""
    messages = caffe_messages()
    layers = []
    for name, arrays in weights.items():
        blobs = []
        for array in arrays:
            array = np.asarray(array, np.float32)
            if name in legacy and array.ndim == 2:
                blobs.append(messages['BlobProto'](num=1, channels=1, height=array.shape[0],
                                                   width=array.shape[1], data=array.ravel()))
            else:
                blobs.append(messages['BlobProto'](shape={'dim': array.shape},
                                                   data=array.ravel()))
        layers.append(messages['LayerParameter'](name=name, blobs=blobs))
    path.write_bytes(messages['NetParameter'](name='composed', layer=layers).SerializeToString())


def _write_caffe(tmp_path, weights, input_layer=INPUT_LAYER, extra=''):
    """The composed net: the prototxt as text, the caffemodel as protobuf messages."""
    prototxt = tmp_path / 'net.prototxt'
    prototxt.write_text(CAFFE_NET % {'input': input_layer, 'extra': extra})
    _write_blobs(tmp_path / 'net.caffemodel', weights)
    return str(prototxt)


def _caffe_numpy(x, w):
    """The composed net in float64, from Caffe's definitions."""
    conv = naive_conv2d_f64(x, w['conv1'][0], w['conv1'][1], stride=(2, 2), pad=(1, 1))
    mean, var = (np.asarray(w['bn1'][k]) / w['bn1'][2][0] for k in (0, 1))
    c = lambda v: np.asarray(v).reshape(1, -1, 1, 1)  # noqa: E731  per channel
    y = (conv - c(mean)) / np.sqrt(c(var) + 1e-5) * c(w['scale1'][0]) + c(w['scale1'][1])
    y = np.maximum(y, 0)
    n, ch, h, wd = y.shape  # 5x5 -> CEIL rounding: 3x3, the last window clipped
    out = int(np.ceil((h - 2) / 2)) + 1
    pool = np.array([[[[y[i, k, 2 * r:2 * r + 2, 2 * s:2 * s + 2].max() for s in range(out)]
                       for r in range(out)] for k in range(ch)] for i in range(n)])
    conv2 = naive_conv2d_f64(pool, w['conv2'][0])
    prelu = np.maximum(conv2, 0) + c(w['prelu2'][0]) * np.minimum(conv2, 0)
    cat = np.concatenate([pool - 0.5 * prelu, pool], axis=1)
    fc = cat.mean(axis=(2, 3)) @ np.asarray(w['fc'][0]).T + w['fc'][1]
    e = np.exp(fc - fc.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_caffe_model_composed_with_protobuf_matches_numpy(tmp_path):
    weights = _caffe_weights()
    net = import_model(_write_caffe(tmp_path, weights))
    x = np.random.RandomState(3).normal(0, 1, (2, 3, 9, 9)).astype(np.float32)
    got = net(mx.nd.array(x)).asnumpy()
    assert np.abs(got - _caffe_numpy(x, weights)).max() <= CAFFE_ATOL
    # BatchNorm + Scale are one nn.BatchNorm; the in-place ReLU and Dropout need no names
    kinds = {key: type(block).__name__ for key, block in net._children.items()}
    assert kinds['bn1'] == 'BatchNorm' and 'scale1' not in kinds and 'drop' not in kinds
    assert net.preprocess == {'shape': (3, 9, 9)}


def _caffe_onnx():
    """caffe-onnx's converter module (``pip install --no-deps caffe-onnx``: it installs the
    top-level packages ``src`` and ``proto``), or None."""
    try:
        spec = importlib.util.find_spec('src.caffe2onnx')
    except ModuleNotFoundError:
        return None
    return spec


@pytest.mark.skipif(_caffe_onnx() is None, reason='caffe-onnx not installed')
def test_caffe_model_matches_a_second_reader_caffe_onnx(tmp_path):
    """Where caffe-onnx handles the layers (it drops Eltwise coefficients, the BatchNorm scale
    factor and writes a Dropout onnxruntime rejects: those are left out here), its ONNX file
    run by onnxruntime agrees with our import of the Caffe files."""
    onnx = pytest.importorskip('onnx')
    weights = _caffe_weights()
    weights['bn1'] = [np.asarray(weights['bn1'][0]) / 2, np.asarray(weights['bn1'][1]) / 2,
                      [1.0]]
    text = '\n'.join(line for line in (CAFFE_NET % {'input': INPUT_LAYER, 'extra': ''})
                     .splitlines() if '"Dropout"' not in line).replace('coeff: 1 coeff: -0.5',
                                                                      '')
    (tmp_path / 'net.prototxt').write_text(text)
    _write_blobs(tmp_path / 'net.caffemodel', weights, legacy=())  # it reads shaped blobs
    # its caffe_pb2 predates protobuf 4: the pure-Python protobuf reads it
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION='python')
    subprocess.run([sys.executable, '-c', 'import sys; from src.cli import main; '
                    'sys.argv = ["caffe2onnx", "net.prototxt", "net.caffemodel", "net", "."]; '
                    'main()'], cwd=tmp_path, env=env, check=True, capture_output=True,
                   timeout=120)
    model = onnx.load(str(tmp_path / 'net.onnx'))
    model.ir_version, model.opset_import[0].version = 8, 11  # what onnxruntime 1.17 loads
    onnx.save(model, str(tmp_path / 'net.onnx'))
    x = np.random.RandomState(3).normal(0, 1, (1, 3, 9, 9)).astype(np.float32)
    expected = _onnxruntime(str(tmp_path / 'net.onnx'), x)
    got = import_model(str(tmp_path / 'net.prototxt'))(mx.nd.array(x)).asnumpy()
    assert np.abs(got - expected).max() <= ONNX_ATOL


def test_caffe_transform_param_is_the_preprocessing(tmp_path, images):
    prototxt = _write_caffe(tmp_path, _caffe_weights(), DATA_LAYER)
    assert import_model(prototxt).preprocess == {
        'mean': [104.0, 117.0, 123.0], 'norm': [pytest.approx(0.017)], 'pixel': 'BGR'}
    out = tmp_path / 'out'
    assert qat_main(['calibrate', '--model', prototxt, '--images', str(images),
                     '--shape', '9,9,3', '--output', str(out), '--method', 'max']) == 0
    pre = json.load(open(out / 'preprocess.json'))
    assert pre['pixel'] == 'BGR' and pre['mean'] == [104.0, 117.0, 123.0]
    assert pre['norm'] == [pytest.approx(0.017)] * 3


def test_caffe_pooling_drops_a_last_window_in_the_padding_as_caffe_does(tmp_path):
    """3x3, kernel 2, stride 2, pad 1: Caffe's CEIL gives 3 windows and drops the one that
    starts in the padding (rows 3..4): 2x2, which is MXNet's floor rounding here."""
    (tmp_path / 'p.prototxt').write_text(
        'input: "data" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 }\n'
        'layer { name: "max" type: "Pooling" bottom: "data" top: "max" '
        'pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 } }\n'
        'layer { name: "ave" type: "Pooling" bottom: "data" top: "ave" '
        'pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 } }\n')
    (tmp_path / 'p.caffemodel').write_bytes(b'')
    x = np.random.RandomState(0).normal(0, 1, (1, 2, 3, 3)).astype(np.float32)
    got_max, got_ave = (o.asnumpy() for o in import_model(str(tmp_path / 'p.prototxt'))(
        mx.nd.array(x)))
    rows = [slice(0, 1), slice(1, 3)]  # windows [-1, 0] and [1, 2], clipped to the input
    want_max = np.array([[[[x[0, c, r, q].max() for q in rows] for r in rows]
                          for c in range(2)]])
    # Caffe's average divides by the window clipped to the padded input: 2 x 2 everywhere
    want_ave = np.array([[[[x[0, c, r, q].sum() / 4 for q in rows] for r in rows]
                          for c in range(2)]])
    assert got_max.shape == (1, 2, 2, 2)
    assert np.abs(got_max - want_max).max() <= CAFFE_ATOL
    assert np.abs(got_ave - want_ave).max() <= CAFFE_ATOL


def test_a_recipe_takes_the_caffe_preprocessing_it_does_not_set(tmp_path):
    from qat.app.recipe import load
    prototxt = _write_caffe(tmp_path, _caffe_weights(), DATA_LAYER)
    recipe = load(None, [f'model.name={prototxt}'])
    assert recipe['model']['source'] == 'file'
    pre = recipe['preprocess']
    assert pre['mean'] == [104.0, 117.0, 123.0] and pre['pixel'] == 'BGR'
    assert pre['std'] == [pytest.approx(1 / 0.017)] * 3
    given = load(None, [f'model.name={prototxt}', 'preprocess.mean=[1,2,3]',
                        'preprocess.pixel=RGB'])['preprocess']
    assert given['mean'] == [1, 2, 3] and given['pixel'] == 'RGB'
    assert given['std'] == [127.5] * 3  # a given mean: the file's scale is not taken either


def test_caffe_lrn_deconvolution_and_slice_match_numpy(tmp_path):
    (tmp_path / 'd.prototxt').write_text(
        'input: "data" input_dim: 1 input_dim: 6 input_dim: 4 input_dim: 5\n'
        'layer { name: "norm" type: "LRN" bottom: "data" top: "norm" '
        'lrn_param { local_size: 3 alpha: 0.3 beta: 0.75 k: 2 } }\n'
        'layer { name: "up" type: "Deconvolution" bottom: "norm" top: "up" '
        'convolution_param { num_output: 2 kernel_size: 3 stride: 2 pad: 1 } }\n'
        'layer { name: "cut" type: "Slice" bottom: "data" top: "a" top: "b" top: "c" '
        'slice_param { axis: 1 slice_point: 1 slice_point: 4 } }\n'
        'layer { name: "halves" type: "Slice" bottom: "data" top: "h0" top: "h1" }\n'
        'layer { name: "cat" type: "Concat" bottom: "c" bottom: "a" bottom: "h1" bottom: "b" '
        'bottom: "h0" top: "cat" }\n')
    rs = np.random.RandomState(0)
    weight, bias = rs.normal(0, 0.5, (6, 2, 3, 3)), rs.normal(0, 0.1, 2)
    _write_blobs(tmp_path / 'd.caffemodel', {'up': [weight, bias]})
    x = rs.normal(0, 1, (1, 6, 4, 5)).astype(np.float32)
    up, cat = (o.asnumpy() for o in import_model(str(tmp_path / 'd.prototxt'))(mx.nd.array(x)))
    squares = np.stack([(x[:, max(0, c - 1):c + 2] ** 2).sum(axis=1) for c in range(6)], 1)
    norm = x * (2 + 0.3 / 3 * squares) ** -0.75
    full = np.zeros((1, 2, 2 * 3 + 3, 2 * 4 + 3))  # (H - 1) * stride + kernel, before the pad
    for i in range(4):
        for j in range(5):
            full[0, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3] += np.einsum(
                'c,cokl->okl', norm[0, :, i, j], weight)
    want_up = full[:, :, 1:-1, 1:-1] + bias.reshape(1, 2, 1, 1)
    assert up.shape == want_up.shape
    assert np.abs(up - want_up).max() <= CAFFE_ATOL
    assert np.array_equal(cat, np.concatenate([x[:, 4:], x[:, :1], x[:, 3:], x[:, 1:4],
                                               x[:, :3]], axis=1))


def test_caffe_elementwise_layers_match_numpy(tmp_path):
    """A Scale no BatchNorm absorbs, Power, AbsVal, ReLU6, Clip, ELU, leaky ReLU, Sigmoid,
    TanH, Eltwise PROD / MAX, Reshape, Flatten and a Softmax over the channels."""
    layers = [('scale', 'Scale', 'data', 'scale_param { bias_term: true }'),
              ('power', 'Power', 'scale', 'power_param { power: 2 scale: 0.5 shift: 1 }'),
              ('abs', 'AbsVal', 'scale', ''), ('six', 'ReLU6', 'scale', ''),
              ('clip', 'Clip', 'scale', 'clip_param { min: -0.5 max: 0.25 }'),
              ('elu', 'ELU', 'scale', 'elu_param { alpha: 0.3 }'),
              ('leaky', 'ReLU', 'scale', 'relu_param { negative_slope: 0.1 }'),
              ('sig', 'Sigmoid', 'scale', ''), ('tanh', 'TanH', 'scale', '')]
    text = 'input: "data" input_shape { dim: 1 dim: 3 dim: 2 dim: 4 }\n' + ''.join(
        f'layer {{ name: "{n}" type: "{t}" bottom: "{b}" top: "{n}" {extra} }}\n'
        for n, t, b, extra in layers) + (
        'layer { name: "prod" type: "Eltwise" bottom: "power" bottom: "abs" bottom: "six" '
        'top: "prod" eltwise_param { operation: PROD } }\n'
        'layer { name: "max" type: "Eltwise" bottom: "clip" bottom: "elu" bottom: "leaky" '
        'top: "max" eltwise_param { operation: MAX } }\n'
        'layer { name: "cat" type: "Concat" bottom: "prod" bottom: "max" bottom: "sig" '
        'bottom: "tanh" top: "cat" }\n'
        'layer { name: "shape" type: "Reshape" bottom: "cat" top: "shape" '
        'reshape_param { shape { dim: 0 dim: 6 dim: -1 dim: 2 } } }\n'
        'layer { name: "prob" type: "Softmax" bottom: "shape" top: "prob" }\n'
        'layer { name: "flat" type: "Flatten" bottom: "prob" top: "flat" }\n')
    (tmp_path / 'e.prototxt').write_text(text)
    rs = np.random.RandomState(0)
    gamma, beta = rs.uniform(0.5, 2, 3), rs.normal(0, 1, 3)
    _write_blobs(tmp_path / 'e.caffemodel', {'scale': [gamma, beta]})
    x = rs.normal(0, 2, (1, 3, 2, 4)).astype(np.float32)
    got = import_model(str(tmp_path / 'e.prototxt'))(mx.nd.array(x)).asnumpy()
    y = x * gamma.reshape(1, 3, 1, 1) + beta.reshape(1, 3, 1, 1)
    prod = (1 + 0.5 * y) ** 2 * np.abs(y) * np.clip(y, 0, 6)
    biggest = np.maximum(np.maximum(np.clip(y, -0.5, 0.25),
                                    np.where(y > 0, y, 0.3 * (np.exp(y) - 1))),
                         np.where(y > 0, y, 0.1 * y))
    cat = np.concatenate([prod, biggest, 1 / (1 + np.exp(-y)), np.tanh(y)], axis=1)
    shaped = cat.reshape(1, 6, -1, 2)
    e = np.exp(shaped - shaped.max(axis=1, keepdims=True))
    want = (e / e.sum(axis=1, keepdims=True)).reshape(1, -1)
    assert np.abs(got - want).max() <= CAFFE_ATOL


# ----- an unsupported layer: one error naming the file, the layer and its type -----------------
def test_unsupported_layers_are_one_clear_error(tmp_path):
    prototxt = _write_caffe(tmp_path, _caffe_weights(), extra=(
        'layer { name: "py" type: "Python" bottom: "prob" top: "py" }'))
    with pytest.raises(UnsupportedLayerError, match=f"{prototxt}: layer 'py' of type 'Python'"):
        import_model(prototxt)

    param = tmp_path / 'net.param'
    param.write_text('7767517\n2 2\nInput data 0 1 data 0=8 1=8 2=3\n'
                     'Interp up 1 1 data up 0=2 1=2.0 2=2.0\n')
    (tmp_path / 'net.bin').write_bytes(b'')
    with pytest.raises(UnsupportedLayerError, match=f"{param}: layer 'up' of type 'Interp'"):
        import_model(str(param))

    data = mx.sym.var('data')  # a 1-D convolution (N, C, W)
    symbol = mx.sym.Convolution(data, mx.sym.var('c_weight'), kernel=(3,), num_filter=3,
                                no_bias=True, name='c')
    symbol.save(str(tmp_path / 'c-symbol.json'))
    mx.nd.save(str(tmp_path / 'c-0000.params'), {'arg:c_weight': mx.nd.ones((3, 3, 3))})
    with pytest.raises(UnsupportedLayerError, match="layer 'c' of type 'Convolution'"):
        import_model(str(tmp_path / 'c-symbol.json'))

    with pytest.raises(qat.importers.ModelFileError, match='valid suffixes'):
        import_model(str(tmp_path / 'net.pb'))
    assert set(IMPORTERS) == {'-symbol.json', '.onnx', '.prototxt', '.param'}


DAMAGED = {  # model file, its contents, weights file, its contents, the file the error names
    'symbol': ('a-symbol.json', '{not json', 'a-0000.params', b'', 'a-symbol.json'),
    'onnx': ('b.onnx', b'\x00garbage\xff', None, None, 'b.onnx'),
    'prototxt': ('c.prototxt', 'layer { name: "x" type: }', 'c.caffemodel', b'', 'c.prototxt'),
    'caffemodel': ('e.prototxt', 'input: "d"\n', 'e.caffemodel', b'\xff\xfe\x01garbage',
                   'e.caffemodel'),
    'bin': ('f.param', '7767517\n2 2\nInput data 0 1 data 0=8 1=8 2=3\n'
            'Convolution c 1 1 data c 0=4 1=3 5=1 6=108\n', 'f.bin', b'\0' * 20, 'f.bin'),
    'missing weights': ('g.param', '7767517\n0 0\n', None, None, 'g.bin'),
}


@pytest.mark.parametrize('case', sorted(DAMAGED))
def test_a_damaged_or_missing_file_is_one_error_naming_it(case, tmp_path):
    model, text, weights, data, named = DAMAGED[case]
    for name, content in ((model, text), (weights, data)):
        if name is not None:
            (tmp_path / name).write_bytes(content if isinstance(content, bytes)
                                          else content.encode())
    if case == 'onnx':
        pytest.importorskip('onnx')
    with pytest.raises(qat.importers.ModelFileError) as error:
        import_model(str(tmp_path / model))
    assert str(error.value).startswith(str(tmp_path / named)) and '\n' not in str(error.value)


# ----- the whole line on an imported model ----------------------------------------------------
@pytest.mark.parametrize('form', ['symbol', 'onnx', 'ncnn', 'caffe'])
def test_imported_model_converts_calibrates_exports_and_verifies(form, tmp_path):
    size = 32
    if form == 'symbol':
        _gluoncv('cifar_resnet20_v1', 32).export(str(tmp_path / 'src'))
        path = str(tmp_path / 'src-symbol.json')
    elif form == 'onnx':
        path = _onnx_export(_gluoncv('mobilenetv2_0.25', 32), 32, tmp_path / 'src.onnx')
    else:  # the fp32 ncnn / Caffe files of an export: folded BN, fused ReLUs
        source = qat.export(qat.app.models.calibrated_random('mobilenet0.25', size),
                            str(tmp_path / 'src'), (3, size, size))
        path = source['param' if form == 'ncnn' else 'prototxt']
    net = import_model(path)
    qat.convert_model(net)
    assert len(quant_blocks(net)) >= 10
    data = [mx.nd.array(_images(size, count=4, seed=k)) for k in range(2)]
    qat.calibrate(net, data, method='max')
    freeze_bn(net)
    qat.export(net, str(tmp_path / 'out'), (3, size, size))
    report = qat.verify(net, str(tmp_path / 'out'), data)
    assert report['passed'], report['failures']
    assert report['int8']['top1_agreement'] == 1


def test_qat_calibrate_takes_a_symbol_file(tmp_path, images, capsys):
    _gluoncv('cifar_resnet20_v1', 32).export(str(tmp_path / 'net'))
    os.rename(tmp_path / 'net-0000.params', tmp_path / 'weights.params')
    model = str(tmp_path / 'net-symbol.json')
    out = tmp_path / 'out'
    argv = ['calibrate', '--model', model, '--images', str(images), '--shape', '32,32,3',
            '--method', 'max', '--output', str(out), '--verify', '4']
    with pytest.raises(SystemExit) as exit_:  # the weights are not next to it
        qat_main(argv)
    assert exit_.value.code == 2 and 'net-0000.params' in capsys.readouterr().err
    assert qat_main(argv + ['--weights', str(tmp_path / 'weights.params')]) == 0
    assert 'PASSED' in capsys.readouterr().out
    assert (out / 'model-int8.param').exists()
    assert 'cifarresnetv10_conv0' in (out / 'model.table').read_text()
    with pytest.raises(SystemExit):  # a weights file belongs to a model file
        qat_main(['calibrate', '--model', 'cifar_resnet20_v1', '--weights', model,
                  '--images', str(images), '--shape', '32,32,3', '--output', str(out)])
    assert '--weights' in capsys.readouterr().err


def test_recipe_fine_tunes_an_imported_model(tmp_path):
    from qat.app.stages import run_recipe
    from .helpers import tiny_net
    net = tiny_net()
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, 3, 8, 8)))
    net.export(str(tmp_path / 'tiny'))
    recipe = tiny_recipe(tmp_path, model={'source': 'gluoncv', 'name': 'x', 'kwargs': {}},
                         float={'epochs': 0}, qat={'epochs': 1, 'input_quant_epoch': 0,
                                                   'freeze_bn_epoch': None,
                                                   'freeze_ranges_epoch': None},
                         calibrate={'batches': 2, 'report_bits': []},
                         export={'enabled': True}, verify={'samples': 32})
    text = open(recipe).read().replace("source: gluoncv", "source: file").replace(
        "name: x", f"name: {tmp_path / 'tiny-symbol.json'}")
    open(recipe, 'w').write(text)
    results = run_recipe(recipe)
    assert results['verify_passed']
    assert ptq.models.source_of(str(tmp_path / 'tiny-symbol.json')) == 'file'
