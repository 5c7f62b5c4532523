"""Average pooling between int8 layers: simulated as ncnn computes it, bit for bit.

ncnn's fp32 Pooling (x86) sums the window row by row from 0 in float32 and, with
count_include_pad (the exporter writes MXNet's flag; GluonCV's inception pools use it),
multiplies by float32(1 / (kh * kw)), packing on and off (measured). MXNet's Pooling divides,
and the next int8 layer's codes flipped (inceptionv3). ``convert_model`` makes such an
``nn.AvgPool2D`` a ``QAvgPool2D``: exactly ``nn.AvgPool2D`` while BN is not frozen or
quantization is off, ``ops.avgpool_ncnn`` in the deployed mode.
"""
import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon
from mxnet.gluon import nn

import qat
from qat import ops
from qat import reference as ref
from qat.deploy import ncnn as ncnn_files, verify, export
from qat.deploy.ir import Graph, Layer
from qat.deploy.verify import EXACT_OPTIONS, NcnnModel
from qat.nn import QAvgPool2D, mode_blocks
from tests.helpers import train_alike

CASES = [((3, 3), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1)), ((3, 3), (2, 2), (0, 0)),
         ((5, 3), (1, 2), (2, 1)), ((2, 2), (2, 2), (0, 0)), ((7, 7), (1, 1), (0, 0))]


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.int32)


def _ncnn_pool(tmp_path, x, kernel, stride, pad, count_include_pad, packing):
    graph = Graph([Layer('Input', 'data', [], {'shape': x.shape}),
                   Layer('Pooling', 'pool', ['data'],
                         {'pool': 'avg', 'kernel': kernel, 'stride': stride, 'pad': pad,
                          'global_pool': False, 'full': False,
                          'count_include_pad': count_include_pad})], ['pool'])
    param, binary = ncnn_files.render(graph)
    (tmp_path / 'pool.param').write_text(param)
    (tmp_path / 'pool.bin').write_bytes(binary)
    model = NcnnModel(str(tmp_path / 'pool.param'), str(tmp_path / 'pool.bin'),
                      use_packing_layout=packing, **EXACT_OPTIONS)
    return model.run(x, ['pool'])['pool']


@pytest.mark.parametrize('channels', [3, 8, 16], ids=lambda c: f'c{c}')
@pytest.mark.parametrize('packing', [False, True], ids=['packing-off', 'packing-on'])
@pytest.mark.parametrize('kernel, stride, pad', CASES)
def test_formula_is_ncnn_avgpool_bit_for_bit(tmp_path, kernel, stride, pad, packing, channels):
    """count_include_pad: ops.avgpool_ncnn (imperative and symbolic), the oracle and ncnn
    agree to 0 ULP on every elempack; MXNet's Pooling does not (where 1/area is inexact)."""
    rs = np.random.RandomState(channels)
    x = (rs.normal(0, 1, (channels, 13, 11))
         * 10 ** rs.uniform(-3, 3, (channels, 1, 1))).astype(np.float32)
    want = ref.avgpool_ncnn(x[None], kernel, stride, pad)[0]
    got = _ncnn_pool(tmp_path, x, kernel, stride, pad, True, packing).reshape(want.shape)
    np.testing.assert_array_equal(bits(got), bits(want))
    imperative = ops.avgpool_ncnn(mx.nd, mx.nd.array(x[None]), kernel, stride, pad)
    data = mx.sym.var('data')
    symbolic = ops.avgpool_ncnn(mx.sym, data, kernel, stride, pad).eval(
        data=mx.nd.array(x[None]))[0]
    for out in (imperative, symbolic):
        np.testing.assert_array_equal(bits(out.asnumpy()[0]), bits(want))
    mxnet = mx.nd.Pooling(mx.nd.array(x[None]), kernel=kernel, stride=stride, pad=pad,
                          pool_type='avg', count_include_pad=True).asnumpy()[0]
    if kernel[0] * kernel[1] not in (4,):
        assert (bits(mxnet) != bits(want)).any()


@pytest.mark.parametrize('kernel, stride, pad', CASES[:4])
def test_without_count_include_pad_ncnn_divides_as_mxnet_with_packing_off(tmp_path, kernel,
                                                                            stride, pad):
    """count_include_pad off: ncnn's generic kernel divides by the window's area inside the
    input, bit for bit MXNet's Pooling (left float); packed blobs multiply (the oracle's
    two forms)."""
    rs = np.random.RandomState(5)
    x = rs.normal(0, 1, (8, 9, 13)).astype(np.float32)
    off = ref.avgpool_ncnn(x[None], kernel, stride, pad, count_include_pad=False,
                           divide=True)[0]
    on = ref.avgpool_ncnn(x[None], kernel, stride, pad, count_include_pad=False)[0]
    for packing, want in ((False, off), (True, on)):
        got = _ncnn_pool(tmp_path, x, kernel, stride, pad, False, packing).reshape(want.shape)
        np.testing.assert_array_equal(bits(got), bits(want))
    mxnet = mx.nd.Pooling(mx.nd.array(x[None]), kernel=kernel, stride=stride, pad=pad,
                          pool_type='avg', count_include_pad=False).asnumpy()[0]
    np.testing.assert_array_equal(bits(mxnet), bits(off))


# ----- the block -------------------------------------------------------------------------
class PoolNet(gluon.HybridBlock):
    """conv -> 3x3/1 avgpool (pad 1) -> conv -> 3x3/2 avgpool -> conv -> dense, and an
    avgpool without count_include_pad (left float)."""

    def __init__(self, channels=8, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv0 = nn.Conv2D(channels, 3, padding=1)
            self.pool0 = nn.AvgPool2D(3, 1, 1)
            self.conv1 = nn.Conv2D(channels, 3, padding=1)
            self.pool1 = nn.AvgPool2D(3, 2, 1)
            self.conv2 = nn.Conv2D(channels, 1)
            self.pool2 = nn.AvgPool2D(2, 1, count_include_pad=False)
            self.conv3 = nn.Conv2D(channels, 1)
            self.out = nn.Dense(5)

    def hybrid_forward(self, F, x):
        x = self.pool0(F.relu(self.conv0(x)))
        x = self.pool1(self.conv1(x))
        x = self.pool2(F.relu(self.conv2(x)))
        return self.out(self.conv3(x))


def poolnet(seed=0, convert=True, channels=8, **kwargs):
    mx.random.seed(seed)
    rs = np.random.RandomState(seed)
    net = PoolNet(channels, prefix='pn_')
    net.initialize(mx.init.Xavier())
    data = mx.nd.array(rs.normal(0, 1, (4, 3, 11, 13)))
    net(data)
    if convert:
        qat.convert_model(net, **kwargs)
    return net, data


def test_count_include_pad_pools_become_qavgpool2d_and_back():
    net, _ = poolnet()
    assert type(net.pool0) is QAvgPool2D and type(net.pool1) is QAvgPool2D
    assert type(net.pool2) is nn.AvgPool2D  # ncnn's arithmetic is MXNet's (packing off)
    assert [b for _, b in mode_blocks(net) if isinstance(b, QAvgPool2D)] == [net.pool0,
                                                                              net.pool1]
    qat.convert_model(net)  # a second conversion leaves them as they are
    assert type(net.pool0) is QAvgPool2D
    qat.to_float(net)
    assert type(net.pool0) is nn.AvgPool2D and type(net.pool1) is nn.AvgPool2D


def test_modes_deployed_computes_ncnn_formula_else_nn_avgpool(tmp_path):
    net, data = poolnet()
    x = mx.nd.array(np.random.RandomState(4).normal(0, 1, (2, 8, 9, 7)))
    pool = net.pool0
    mxnet = mx.nd.Pooling(x, kernel=(3, 3), stride=(1, 1), pad=(1, 1), pool_type='avg')
    np.testing.assert_array_equal(bits(pool(x).asnumpy()), bits(mxnet.asnumpy()))
    qat.calibrate(net, [data], method='max')
    qat.freeze_bn(net)
    assert pool.mode == {'quantize': True, 'bn_frozen': True}
    want = ref.avgpool_ncnn(x.asnumpy(), (3, 3), (1, 1), (1, 1))
    np.testing.assert_array_equal(bits(pool(x).asnumpy()), bits(want))
    path = str(tmp_path / 'net.params')
    qat.save_parameters(net, path)
    other, _ = poolnet()
    assert other.pool0.mode['bn_frozen'] is False
    qat.load_parameters(other, path)
    assert other.pool0.mode == {'quantize': True, 'bn_frozen': True}


@pytest.mark.parametrize('hybridize', [False, True], ids=['imperative', 'hybridized'])
def test_training_is_exactly_nn_avgpool(hybridize):
    """QAT with BN not frozen: outputs, gradients and parameters bit-identical to the same
    net with the pools left float, step after step."""
    net, data = poolnet()
    twin, _ = poolnet(convert_fn={nn.AvgPool2D: None})
    assert type(net.pool0) is QAvgPool2D and type(twin.pool0) is nn.AvgPool2D
    for n in (net, twin):
        qat.calibrate(n, [data], method='max')
        if hybridize:
            n.hybridize()
    train_alike(net, twin, (3, 11, 13))


@pytest.mark.parametrize('channels', [8, 5], ids=['c8', 'c5'])
@pytest.mark.parametrize('packing', [False, True], ids=['packing-off', 'packing-on'])
def test_net_with_avgpools_between_int8_convs_is_bit_exact(tmp_path, packing, channels):
    """Exported and verified layer by layer: every int8 layer 0 LSB, 0 code mismatches,
    on elempack 8 and 1 blobs."""
    net, data = poolnet(channels=channels)
    qat.calibrate(net, [data], method='max')
    qat.freeze_bn(net)
    export(net, str(tmp_path), (3, 11, 13), name='model')
    x = mx.nd.array(np.random.RandomState(7).normal(0, 1, (8, 3, 11, 13)))
    report = verify(net, str(tmp_path), [x], packing=packing)
    int8 = [layer for layer in report['layers'] if layer['int8']]
    assert len(int8) >= 4
    for layer in int8:
        assert layer['max_lsb'] == 0.0, layer
        assert layer.get('code_mismatches', 0) == 0, layer
    assert report['int8']['max_abs_error'] == 0.0
