"""The Caffe writer against protobuf: the files parse back (with the ``google.protobuf`` package)
into the same layers, params and bit-identical weights,
and a numpy forward of the decoded Caffe net (Caffe's semantics) equals a numpy forward of the IR
graph (MXNet's semantics)."""
import os

import mxnet as mx
import numpy as np
import pytest

from qat.deploy import caffe
from qat.deploy.caffe import read_caffemodel, read_prototxt, write_caffe
from qat.deploy.ir import Graph, Layer
from tests.helpers import naive_conv2d_f64

# Both forwards run in float64 on the same float32 parameters (the zoo's eps and slopes are
# float32 numbers, so the text round trip is exact): only the order of float64 operations may
# differ.
FORWARD_RTOL = 1e-6


def rand(shape, seed, low=-1.0, high=1.0):
    return np.random.RandomState(seed).uniform(low, high, shape).astype(np.float32)


def f32(value):
    """What protobuf reads back for a float field written from ``value``."""
    return float(np.float32(value))


# ---------------------------------------------------------------------------------------------
# IR graphs built by hand

def conv(name, source, channels_in, channels_out, kernel, seed, stride=(1, 1), pad=(0, 0),
         dilate=(1, 1), groups=1, bias=True, act=None):
    weights = {'weight': rand((channels_out, channels_in // groups, *kernel), seed),
               'bias': rand((channels_out,), seed + 1000) if bias else None}
    params = {'num_output': channels_out, 'kernel': kernel, 'stride': stride, 'pad': pad,
              'dilate': dilate, 'groups': groups, 'bias_term': bias, 'activation': act}
    return Layer('Convolution', name, [source], params, weights)


def dense(name, source, units_in, units_out, seed, bias=True, act=None):
    weights = {'weight': rand((units_out, units_in), seed),
               'bias': rand((units_out,), seed + 1000) if bias else None}
    params = {'num_output': units_out, 'bias_term': bias, 'activation': act}
    return Layer('InnerProduct', name, [source], params, weights)


def pool(name, source, pool_type, kernel=(1, 1), stride=(1, 1), pad=(0, 0), full=False,
         global_pool=False, count_include_pad=True):
    return Layer('Pooling', name, [source],
                 {'pool': pool_type, 'kernel': kernel, 'stride': stride, 'pad': pad,
                  'global_pool': global_pool, 'full': full,
                  'count_include_pad': count_include_pad})


def batch_norm(name, source, channels, seed):
    rs = np.random.RandomState(seed)
    weights = {'gamma': rs.uniform(0.5, 1.5, channels), 'beta': rs.uniform(-0.5, 0.5, channels),
               'mean': rs.uniform(-0.5, 0.5, channels), 'var': rs.uniform(0.5, 1.5, channels)}
    return Layer('BatchNorm', name, [source], {'channels': channels, 'eps': 2 ** -10},
                 {k: v.astype(np.float32) for k, v in weights.items()})


def zoo_graph():
    """Every IR kind: grouped / depthwise / dilated / asymmetric convolutions with each fused
    activation, stand-alone BN and activations, the three eltwise ops, concat on channels and on
    height, max / avg / global pooling in floor and ceil conventions, flatten, dense, softmax."""
    layers = [
        Layer('Input', 'data', [], {'shape': (3, 10, 10)}),
        conv('c1', 'data', 3, 8, (3, 3), 1, pad=(1, 1), act=('relu',)),
        conv('g1', 'c1', 8, 8, (3, 3), 2, stride=(2, 2), pad=(1, 1), groups=2, bias=False,
             act=('leaky', 0.125)),
        conv('d1', 'g1', 8, 8, (3, 3), 3, pad=(2, 2), dilate=(2, 2), groups=8,
             act=('clip', 0.0, 6.0)),
        conv('a1', 'd1', 8, 8, (1, 3), 4, pad=(0, 2), dilate=(1, 2), act=('sigmoid',)),
        batch_norm('bn', 'a1', 8, 5),
        Layer('ReLU', 'r1', ['bn'], {'slope': 0.0}),
        Layer('ReLU', 'lk', ['bn'], {'slope': 0.25}),
        Layer('Clip', 'cl', ['bn'], {'low': -0.5, 'high': 0.75}),
        Layer('Sigmoid', 'sg', ['bn']),
        Layer('Eltwise', 'es', ['r1', 'lk', 'cl'], {'op': 'sum'}),
        Layer('Eltwise', 'ep', ['es', 'sg'], {'op': 'prod'}),
        Layer('Eltwise', 'em', ['ep', 'g1'], {'op': 'max'}),
        Layer('Concat', 'cat', ['em', 'd1'], {'axis': 1}),
        pool('mp', 'cat', 'max', (2, 2), (2, 2)),                       # floor 2 vs ceil 3
        pool('ap', 'cat', 'avg', (3, 3), (2, 2), (1, 1)),               # floor == ceil
        pool('at', 'cat', 'avg', (2, 2), (2, 2), full=True),            # ceil tail
        pool('mt', 'c1', 'max', (3, 3), (2, 2), (1, 1), full=True),     # ceil with padding
        pool('gp', 'cat', 'avg', global_pool=True),
        pool('gm', 'mt', 'max', global_pool=True),
        Layer('Concat', 'cat2', ['ap', 'at'], {'axis': 2}),
        Layer('Flatten', 'fl', ['at']),
        dense('fc', 'fl', 144, 10, 6),
        Layer('Softmax', 'sm', ['fc'], {'axis': 1}),
        dense('f2', 'gp', 16, 6, 7, bias=False, act=('leaky', 0.0625)),
    ]
    return Graph(layers, ['sm', 'f2', 'cat2', 'mp', 'gm'])


def conv_param(num_output, bias, pad, kernel, stride, group, dilation):
    return {'convolution_param': {
        'num_output': num_output, 'bias_term': bias, 'pad_h': pad[0], 'pad_w': pad[1],
        'kernel_h': kernel[0], 'kernel_w': kernel[1], 'stride_h': stride[0],
        'stride_w': stride[1], 'group': group, 'dilation': dilation}}


def pool_param(pool_type, kernel, stride, pad, round_mode=None):
    fields = {'pool': pool_type, 'kernel_h': kernel[0], 'kernel_w': kernel[1],
              'stride_h': stride[0], 'stride_w': stride[1], 'pad_h': pad[0], 'pad_w': pad[1]}
    if round_mode:
        fields['round_mode'] = round_mode
    return {'pooling_param': fields}


ZOO_CAFFE = [  # (name, type, bottoms, tops, params) as Caffe must read them
    ('data', 'Input', [], ['data'], {'input_param': {'shape': [{'dim': [1, 3, 10, 10]}]}}),
    ('c1', 'Convolution', ['data'], ['c1'],
     conv_param(8, True, (1, 1), (3, 3), (1, 1), 1, [1])),
    ('c1_relu', 'ReLU', ['c1'], ['c1'], {}),
    ('g1', 'Convolution', ['c1'], ['g1'],
     conv_param(8, False, (1, 1), (3, 3), (2, 2), 2, [1])),
    ('g1_leaky', 'ReLU', ['g1'], ['g1'], {'relu_param': {'negative_slope': 0.125}}),
    ('d1', 'Convolution', ['g1'], ['d1'],
     conv_param(8, True, (2, 2), (3, 3), (1, 1), 8, [2])),
    ('d1_clip', 'Clip', ['d1'], ['d1'], {'clip_param': {'min': 0.0, 'max': 6.0}}),
    ('a1', 'Convolution', ['d1'], ['a1'],
     conv_param(8, True, (0, 2), (1, 3), (1, 1), 1, [1, 2])),
    ('a1_sigmoid', 'Sigmoid', ['a1'], ['a1'], {}),
    ('bn', 'BatchNorm', ['a1'], ['bn'],
     {'batch_norm_param': {'use_global_stats': True, 'eps': 2 ** -10}}),
    ('bn_scale', 'Scale', ['bn'], ['bn'], {'scale_param': {'bias_term': True}}),
    ('r1', 'ReLU', ['bn'], ['r1'], {}),
    ('lk', 'ReLU', ['bn'], ['lk'], {'relu_param': {'negative_slope': 0.25}}),
    ('cl', 'Clip', ['bn'], ['cl'], {'clip_param': {'min': -0.5, 'max': 0.75}}),
    ('sg', 'Sigmoid', ['bn'], ['sg'], {}),
    ('es', 'Eltwise', ['r1', 'lk', 'cl'], ['es'], {'eltwise_param': {'operation': 'SUM'}}),
    ('ep', 'Eltwise', ['es', 'sg'], ['ep'], {'eltwise_param': {'operation': 'PROD'}}),
    ('em', 'Eltwise', ['ep', 'g1'], ['em'], {'eltwise_param': {'operation': 'MAX'}}),
    ('cat', 'Concat', ['em', 'd1'], ['cat'], {'concat_param': {'axis': 1}}),
    ('mp', 'Pooling', ['cat'], ['mp'], pool_param('MAX', (2, 2), (2, 2), (0, 0), 'FLOOR')),
    ('ap', 'Pooling', ['cat'], ['ap'], pool_param('AVE', (3, 3), (2, 2), (1, 1))),
    ('at', 'Pooling', ['cat'], ['at'], pool_param('AVE', (2, 2), (2, 2), (0, 0))),
    ('mt', 'Pooling', ['c1'], ['mt'], pool_param('MAX', (3, 3), (2, 2), (1, 1))),
    ('gp', 'Pooling', ['cat'], ['gp'], {'pooling_param': {'pool': 'AVE', 'global_pooling': True}}),
    ('gm', 'Pooling', ['mt'], ['gm'], {'pooling_param': {'pool': 'MAX', 'global_pooling': True}}),
    ('cat2', 'Concat', ['ap', 'at'], ['cat2'], {'concat_param': {'axis': 2}}),
    ('fl', 'Flatten', ['at'], ['fl'], {}),
    ('fc', 'InnerProduct', ['fl'], ['fc'],
     {'inner_product_param': {'num_output': 10, 'bias_term': True}}),
    ('sm', 'Softmax', ['fc'], ['sm'], {'softmax_param': {'axis': 1}}),
    ('f2', 'InnerProduct', ['gp'], ['f2'],
     {'inner_product_param': {'num_output': 6, 'bias_term': False}}),
    ('f2_leaky', 'ReLU', ['f2'], ['f2'], {'relu_param': {'negative_slope': 0.0625}}),
]


def write(graph, folder, name='net'):
    proto = os.path.join(folder, f'{name}.prototxt')
    model = os.path.join(folder, f'{name}.caffemodel')
    write_caffe(graph, proto, model, name)
    return proto, model


@pytest.fixture(scope='module')
def zoo(tmp_path_factory):
    graph = zoo_graph()
    return (graph, *write(graph, str(tmp_path_factory.mktemp('zoo')), 'zoo'))


# ---------------------------------------------------------------------------------------------
# Structure, params and weights

def test_prototxt_parses_back_to_the_graph(zoo):
    _, proto, _ = zoo
    assert [tuple(layer) for layer in read_prototxt(proto)] == ZOO_CAFFE


def test_caffemodel_weights_are_bit_identical(zoo):
    graph, _, model = zoo
    blobs = read_caffemodel(model)
    weighted = {'c1': 'Convolution', 'g1': 'Convolution', 'd1': 'Convolution',
                'a1': 'Convolution', 'bn': 'BatchNorm', 'bn_scale': 'Scale',
                'fc': 'InnerProduct', 'f2': 'InnerProduct'}
    assert {name: kind for name, (kind, _) in blobs.items()} == weighted
    for name in ('c1', 'g1', 'd1', 'a1', 'fc', 'f2'):
        w = graph[name].weights
        expected = [w['weight']] + ([w['bias']] if w['bias'] is not None else [])
        assert_bit_identical(blobs[name][1], expected)
    bn = graph['bn'].weights
    assert_bit_identical(blobs['bn'][1], [bn['mean'], bn['var'], np.ones(1, np.float32)])
    assert_bit_identical(blobs['bn_scale'][1], [bn['gamma'], bn['beta']])
    assert blobs['g1'][1][0].shape == (8, 4, 3, 3) and blobs['d1'][1][0].shape == (8, 1, 3, 3)
    assert blobs['fc'][1][0].shape == (10, 144) and blobs['bn'][1][2].shape == (1,)


def assert_bit_identical(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        e = np.asarray(e, np.float32)
        assert a.dtype == np.float32 and a.shape == e.shape
        assert np.array_equal(a.view(np.uint32), e.view(np.uint32))


def test_special_floats_survive(tmp_path):
    """Bit patterns in the caffemodel, and float32 values of text floats that are not exact."""
    w = rand((2, 1, 1, 1), 0)
    w.flat[:] = [-0.0, 1e-40]  # negative zero and a float32 subnormal
    bias = np.array([3.4028235e38, -1.1754944e-38], np.float32)
    graph = Graph([Layer('Input', 'data', [], {'shape': (1, 2, 2)}),
                   Layer('Convolution', 'c', ['data'],
                         {'num_output': 2, 'kernel': (1, 1), 'stride': (1, 1), 'pad': (0, 0),
                          'dilate': (1, 1), 'groups': 1, 'activation': ('leaky', 0.1)},
                         {'weight': w, 'bias': bias}),
                   Layer('Clip', 'clip', ['c'], {'low': -1e-5, 'high': 3.4028235e38})], ['clip'])
    proto, model = write(graph, str(tmp_path))
    assert_bit_identical(read_caffemodel(model)['c'][1], [w, bias])
    params = {layer.name: layer.params for layer in read_prototxt(proto)}
    assert params['c_leaky'] == {'relu_param': {'negative_slope': f32(0.1)}}
    assert params['clip'] == {'clip_param': {'min': f32(-1e-5), 'max': f32(3.4028235e38)}}


def test_caffemodel_is_what_protobuf_serializes(zoo):
    """The hand encoder emits the canonical encoding: protobuf re-serializes the parsed message
    to the same bytes."""
    _, _, model = zoo
    data = open(model, 'rb').read()
    net = caffe.caffe_messages()['NetParameter'].FromString(data)
    assert net.name == 'zoo'
    assert net.SerializeToString() == data


def test_prototxt_text(tmp_path):
    graph = Graph([Layer('Input', 'data', [], {'shape': (3, 4, 4)}),
                   conv('conv', 'data', 3, 2, (3, 3), 0, pad=(1, 1), act=('relu',))], ['conv'])
    proto, _ = write(graph, str(tmp_path), 'tiny')
    assert open(proto).read() == '''\
name: "tiny"
layer {
  name: "data"
  type: "Input"
  top: "data"
  input_param {
    shape {
      dim: 1
      dim: 3
      dim: 4
      dim: 4
    }
  }
}
layer {
  name: "conv"
  type: "Convolution"
  bottom: "data"
  top: "conv"
  convolution_param {
    num_output: 2
    bias_term: true
    pad_h: 1
    pad_w: 1
    kernel_h: 3
    kernel_w: 3
    stride_h: 1
    stride_w: 1
    group: 1
    dilation: 1
  }
}
layer {
  name: "conv_relu"
  type: "ReLU"
  bottom: "conv"
  top: "conv"
}
'''


def test_output_is_deterministic(zoo, tmp_path):
    graph, proto, model = zoo
    proto2, model2 = write(graph, str(tmp_path), 'zoo')
    assert open(proto, 'rb').read() == open(proto2, 'rb').read()
    assert open(model, 'rb').read() == open(model2, 'rb').read()


def test_added_names_do_not_collide(tmp_path):
    graph = Graph([Layer('Input', 'data', [], {'shape': (2, 3, 3)}),
                   conv('c', 'data', 2, 2, (1, 1), 0, act=('relu',)),
                   batch_norm('b', 'c', 2, 1),
                   Layer('ReLU', 'c_relu', ['b'], {'slope': 0.0}),
                   Layer('Sigmoid', 'b_scale', ['c_relu'])], ['b_scale'])
    proto, model = write(graph, str(tmp_path))
    names = [(layer.name, layer.type, layer.tops) for layer in read_prototxt(proto)]
    assert names == [('data', 'Input', ['data']), ('c', 'Convolution', ['c']),
                     ('c_relu_1', 'ReLU', ['c']), ('b', 'BatchNorm', ['b']),
                     ('b_scale_1', 'Scale', ['b']), ('c_relu', 'ReLU', ['c_relu']),
                     ('b_scale', 'Sigmoid', ['b_scale'])]
    assert sorted(read_caffemodel(model)) == ['b', 'b_scale_1', 'c']


# ---------------------------------------------------------------------------------------------
# Errors and atomic writes

def test_unsupported_kind_raises_and_writes_nothing(tmp_path):
    graph = Graph([Layer('Input', 'data', [], {'shape': (1, 2, 2)}),
                   Layer('Deconvolution', 'upsample', ['data'])], ['upsample'])
    with pytest.raises(ValueError, match=r"'Deconvolution'.*'upsample'"):
        write(graph, str(tmp_path))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('size, kwargs, message', [
    (5, dict(kernel=(2, 2), stride=(2, 2), pad=(1, 1), full=True), 'no Caffe rounding'),
    (6, dict(kernel=(3, 3), stride=(2, 2), pad=(1, 1), count_include_pad=False),
     'count_include_pad'),
    (6, dict(kernel=(2, 2), stride=(2, 2), pad=(2, 2)), 'pad < kernel'),
])
def test_pooling_caffe_cannot_express_raises(tmp_path, size, kwargs, message):
    graph = Graph([Layer('Input', 'data', [], {'shape': (1, size, size)}),
                   pool('pool7', 'data', 'avg', **kwargs)], ['pool7'])
    with pytest.raises(ValueError, match=f"'pool7'.*{message}"):
        write(graph, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_writes_replace_atomically(zoo, tmp_path, monkeypatch):
    graph = zoo[0]
    proto, model = write(graph, str(tmp_path))
    write(graph, str(tmp_path))  # overwriting works and leaves no temporary files
    assert sorted(os.listdir(tmp_path)) == ['net.caffemodel', 'net.prototxt']
    before = open(proto, 'rb').read(), open(model, 'rb').read()

    def failing_replace(src, dst):
        raise OSError('disk full')
    monkeypatch.setattr(os, 'replace', failing_replace)
    with pytest.raises(OSError, match='disk full'):
        write(Graph(graph.layers[:2], ['c1']), str(tmp_path))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ['net.caffemodel', 'net.prototxt']
    assert (open(proto, 'rb').read(), open(model, 'rb').read()) == before


# ---------------------------------------------------------------------------------------------
# Meaning: the decoded Caffe net computes what the IR graph computes

def pool_windows(x, kind, kernel, stride, pad, out_hw):
    """Windows [r*s - p, min(r*s - p + k, size + p)): max over the part inside the input; the
    average divides by the whole window (padding counted, a ceil tail not). This is Caffe's rule
    and MXNet's with count_include_pad=True (checked against MXNet below)."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, *out_hw))
    for r in range(out_hw[0]):
        for q in range(out_hw[1]):
            h0, w0 = r * stride[0] - pad[0], q * stride[1] - pad[1]
            h1, w1 = min(h0 + kernel[0], h + pad[0]), min(w0 + kernel[1], w + pad[1])
            window = x[:, :, max(h0, 0):min(h1, h), max(w0, 0):min(w1, w)]
            out[:, :, r, q] = (window.max(axis=(2, 3)) if kind == 'max' else
                               window.sum(axis=(2, 3)) / ((h1 - h0) * (w1 - w0)))
    return out


def mxnet_pool_hw(hw, p):
    rounding = np.ceil if p['full'] else np.floor
    return [int(rounding((n + 2 * pd - k) / s)) + 1
            for n, k, s, pd in zip(hw, p['kernel'], p['stride'], p['pad'])]


def ir_pool(x, p):
    if p['global_pool']:
        return x.max(axis=(2, 3), keepdims=True) if p['pool'] == 'max' else \
            x.mean(axis=(2, 3), keepdims=True)
    return pool_windows(x, p['pool'], p['kernel'], p['stride'], p['pad'],
                        mxnet_pool_hw(x.shape[2:], p))


def apply_act(act, y):
    kind = act[0]
    if kind in ('relu', 'leaky'):
        return np.where(y > 0, y, y * (act[1] if kind == 'leaky' else 0.0))
    if kind == 'clip':
        return np.clip(y, act[1], act[2])
    return 1 / (1 + np.exp(-y))


def softmax(y, axis):
    e = np.exp(y - y.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def channel(v):
    return np.asarray(v, np.float64).reshape(1, -1, 1, 1)


IR_OPS = {
    'Convolution': lambda xs, p, w: naive_conv2d_f64(xs[0], w['weight'], w['bias'], p['stride'],
                                                     p['pad'], p['dilate'], p['groups']),
    'InnerProduct': lambda xs, p, w: xs[0].reshape(len(xs[0]), -1) @ w['weight'].T.astype(float)
    + (0 if w['bias'] is None else w['bias']),
    'BatchNorm': lambda xs, p, w: (xs[0] - channel(w['mean']))
    / np.sqrt(channel(w['var']) + p['eps']) * channel(w['gamma']) + channel(w['beta']),
    'ReLU': lambda xs, p, w: apply_act(('leaky', p['slope']), xs[0]),
    'Clip': lambda xs, p, w: np.clip(xs[0], p['low'], p['high']),
    'Sigmoid': lambda xs, p, w: apply_act(('sigmoid',), xs[0]),
    'Pooling': lambda xs, p, w: ir_pool(xs[0], p),
    'Eltwise': lambda xs, p, w: {'sum': np.sum, 'prod': np.prod, 'max': np.max}[p['op']](xs, 0),
    'Concat': lambda xs, p, w: np.concatenate(xs, p['axis']),
    'Flatten': lambda xs, p, w: xs[0].reshape(len(xs[0]), -1),
    'Softmax': lambda xs, p, w: softmax(xs[0], p['axis']),
}


def ir_forward(graph, x):
    blobs = {}
    for layer in graph.layers:
        xs = [blobs[name] for name in layer.inputs]
        y = x if layer.kind == 'Input' else IR_OPS[layer.kind](xs, layer.params, layer.weights)
        if layer.params.get('activation'):
            y = apply_act(layer.params['activation'], y)
        blobs[layer.name] = y
    return blobs


def caffe_pool(x, p):
    if p.get('global_pooling'):
        return ir_pool(x, {'pool': 'max' if p['pool'] == 'MAX' else 'avg', 'global_pool': True})
    k, s, pad = (p['kernel_h'], p['kernel_w']), (p['stride_h'], p['stride_w']), \
        (p['pad_h'], p['pad_w'])
    rounding = np.floor if p.get('round_mode') == 'FLOOR' else np.ceil
    out = []
    for n, kk, ss, pp in zip(x.shape[2:], k, s, pad):
        size = int(rounding((n + 2 * pp - kk) / ss)) + 1
        out.append(size - 1 if pp and (size - 1) * ss >= n + pp else size)  # Caffe's clip
    return pool_windows(x, 'max' if p['pool'] == 'MAX' else 'avg', k, s, pad, out)


def caffe_conv(x, p, blobs):
    dilation = p.get('dilation', [1]) * (2 if len(p.get('dilation', [1])) == 1 else 1)
    bias = blobs[1] if p.get('bias_term', True) else None
    return naive_conv2d_f64(x, blobs[0], bias, (p['stride_h'], p['stride_w']),
                            (p['pad_h'], p['pad_w']), tuple(dilation), p.get('group', 1))


def caffe_batch_norm(x, p, blobs):
    mean, var, factor = blobs
    return (x - channel(mean / factor[0])) / np.sqrt(channel(var / factor[0]) + p['eps'])


CAFFE_OPS = {  # (bottoms, the layer's *_param dict, blobs) -> top
    'Convolution': lambda xs, p, b: caffe_conv(xs[0], p['convolution_param'], b),
    'InnerProduct': lambda xs, p, b: xs[0].reshape(len(xs[0]), -1) @ b[0].T.astype(float)
    + (b[1] if p['inner_product_param'].get('bias_term', True) else 0),
    'BatchNorm': lambda xs, p, b: caffe_batch_norm(xs[0], p['batch_norm_param'], b),
    'Scale': lambda xs, p, b: xs[0] * channel(b[0]) + channel(b[1]),
    'ReLU': lambda xs, p, b: np.where(xs[0] > 0, xs[0], xs[0] * p.get('relu_param', {}).get(
        'negative_slope', 0.0)),
    'Clip': lambda xs, p, b: np.clip(xs[0], p['clip_param']['min'], p['clip_param']['max']),
    'Sigmoid': lambda xs, p, b: 1 / (1 + np.exp(-xs[0])),
    'Pooling': lambda xs, p, b: caffe_pool(xs[0], p['pooling_param']),
    'Eltwise': lambda xs, p, b: {'SUM': np.sum, 'PROD': np.prod, 'MAX': np.max}[
        p['eltwise_param']['operation']](xs, 0),
    'Concat': lambda xs, p, b: np.concatenate(xs, p['concat_param']['axis']),
    'Flatten': lambda xs, p, b: xs[0].reshape(len(xs[0]), -1),
    'Softmax': lambda xs, p, b: softmax(xs[0], p['softmax_param']['axis']),
}


def caffe_forward(proto, model, x):
    weights, blobs = read_caffemodel(model), {}
    for layer in read_prototxt(proto):
        xs = [blobs[name] for name in layer.bottoms]
        b = [blob.astype(np.float64) for blob in weights.get(layer.name, ('', []))[1]]
        blobs[layer.tops[0]] = x if layer.type == 'Input' else \
            CAFFE_OPS[layer.type](xs, layer.params, b)
    return blobs


def test_caffe_forward_equals_ir_forward(zoo):
    graph, proto, model = zoo
    x = rand((2, 3, 10, 10), 11, -2.0, 2.0).astype(np.float64)
    expected, actual = ir_forward(graph, x), caffe_forward(proto, model, x)
    # In-place Caffe layers leave each IR blob holding the IR layer's (activated) output.
    for name, value in expected.items():
        assert actual[name].shape == value.shape, name
        np.testing.assert_allclose(actual[name], value, rtol=FORWARD_RTOL, atol=1e-12,
                                   err_msg=name)
    assert expected['mp'].shape == (2, 16, 2, 2) and expected['mt'].shape == (2, 8, 6, 6)


@pytest.mark.parametrize('name', ['mp', 'ap', 'at', 'mt', 'gp', 'gm'])
def test_the_ir_pooling_oracle_is_mxnet(name):
    """The test's MXNet-side pooling agrees with MXNet itself on the zoo's configurations."""
    p = zoo_graph()[name].params
    x = rand((1, 3, 5, 5) if name != 'mt' else (1, 3, 10, 10), 3)
    y = mx.nd.Pooling(mx.nd.array(x), kernel=p['kernel'], stride=p['stride'], pad=p['pad'],
                      pool_type=p['pool'], global_pool=p['global_pool'],
                      pooling_convention='full' if p['full'] else 'valid',
                      count_include_pad=p['count_include_pad']).asnumpy()
    np.testing.assert_allclose(ir_pool(x.astype(np.float64), p), y, rtol=1e-6, atol=1e-7)
