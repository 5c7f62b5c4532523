"""The exported files of a few nets on fixed seeds, pinned by their SHA-256.

A refactoring must not change one byte of what reaches the device: the ncnn fp32 / int8
models, the table and the manifest are compared byte for byte, the Caffe files as the protobuf
messages they parse to (serialized deterministically), so a writer may change how it encodes
them but not what they say. The pins were taken with the code as it was before the
architecture change (commit 4d63796). A deliberate change of the exported bytes updates them,
with the reason in the commit (the manifests since gained ``ncnn_arithmetic``, the nodes verify
computes with ncnn's own fp32 arithmetic; the model files are unchanged).
"""
import hashlib

import mxnet as mx
import numpy as np
import pytest
from google.protobuf import text_format
from gluoncv.model_zoo import get_model
from mxnet.gluon import nn

import qat
from qat.deploy.caffe import caffe_messages

from tests.helpers import randomize_bn

NCNN_FILES = ('table', 'param', 'bin', 'int8_param', 'int8_bin', 'manifest')


def _zoo(name, size, method, seed=0):
    mx.random.seed(seed)
    rs = np.random.RandomState(seed)
    with mx.name.NameManager():
        net = get_model(name, pretrained=False, classes=10)
    net.initialize(mx.init.Xavier())
    data = [mx.nd.array(rs.normal(0, 1, (4, 3, size, size))) for _ in range(2)]
    net(data[0])
    randomize_bn(net, rs)
    qat.convert_model(net)
    qat.calibrate(net, data, method=method)
    qat.freeze_bn(net)
    return net, (3, size, size)


def _custom(seed=0):
    """conv+BN+relu, a grouped conv, max pooling, an excluded conv and a Dense, at W4A4 with
    the first layer at 8 bits: per-layer configs, clips in front of narrow inputs, fp32
    layers in the int8 model."""
    mx.random.seed(seed)
    rs = np.random.RandomState(seed)
    net = nn.HybridSequential(prefix='pin_')
    with net.name_scope():
        net.add(nn.Conv2D(16, 3, padding=1, in_channels=3), nn.BatchNorm(in_channels=16),
                nn.Activation('relu'), nn.Conv2D(16, 3, padding=1, groups=4, in_channels=16),
                nn.Activation('relu'), nn.MaxPool2D(2), nn.Conv2D(8, 1, in_channels=16),
                nn.GlobalAvgPool2D(), nn.Dense(10, in_units=8))
    net.initialize(mx.init.Xavier())
    randomize_bn(net, rs)
    data = [mx.nd.array(rs.normal(0, 1, (4, 3, 16, 16))) for _ in range(2)]
    qat.convert_model(net, config=qat.QuantConfig(weight_bits=4, input_bits=4),
                      layer_configs={qat.first_layer(net): qat.QuantConfig()},
                      exclude=['pin_conv2'])
    qat.calibrate(net, data, method='mse')
    qat.freeze_bn(net)
    return net, (3, 16, 16)


def _digest(data):
    return hashlib.sha256(data).hexdigest()[:16]


def export_digests(net, shape, folder):
    paths = qat.export(net, folder, shape, name='pinned')
    digests = {}
    for kind in NCNN_FILES:
        with open(paths[kind], 'rb') as handle:
            digests[kind] = _digest(handle.read())
    messages = caffe_messages()
    with open(paths['caffemodel'], 'rb') as handle:
        model = messages['NetParameter'].FromString(handle.read())
    with open(paths['prototxt']) as handle:
        prototxt = text_format.Parse(handle.read(), messages['NetParameter']())
    digests['caffemodel'] = _digest(model.SerializeToString(deterministic=True))
    digests['prototxt'] = _digest(prototxt.SerializeToString(deterministic=True))
    return digests


NETS = {
    'cifar_resnet20_v1': lambda: _zoo('cifar_resnet20_v1', 32, 'max'),
    'mobilenetv2_0.25': lambda: _zoo('mobilenetv2_0.25', 32, 'kl'),
    'custom_w4a4': _custom,
}

PINS = {
    'cifar_resnet20_v1': {
        'table': '49a89bab456e223c',
        'param': '68f8be1969e33756',
        'bin': '937c5c91b59f11f2',
        'int8_param': '2706ecbfe47a08c5',
        'int8_bin': '74b2d20897fafb28',
        'manifest': '803da730e62efb66',
        'caffemodel': 'eccb30ee7e410751',
        'prototxt': 'dc74a1f38430f185',
    },
    'custom_w4a4': {
        'table': '049b32c683572204',
        'param': 'b17cbd8168f20b1e',
        'bin': 'cd3bb911f1c254f7',
        'int8_param': '3ae3fe2b23894d66',
        'int8_bin': '70f1e4f104cc7b5f',
        'manifest': '23b130aad94717b9',
        'caffemodel': '7d44e9e87d65362b',
        'prototxt': '12c393539e06847e',
    },
    'mobilenetv2_0.25': {
        'table': '0d501eceba32d249',
        'param': '99ca93f031245528',
        'bin': '3e90005aedcfe665',
        'int8_param': 'b5461fa50066b7cd',
        'int8_bin': '4864365cad1308f5',
        'manifest': '8735f112bb23fe62',
        'caffemodel': '21d6fc9c77d5c685',
        'prototxt': 'f860497402da57a8',
    },
}


@pytest.mark.parametrize('name', sorted(NETS))
def test_exported_files_are_pinned(name, tmp_path):
    net, shape = NETS[name]()
    assert export_digests(net, shape, str(tmp_path)) == PINS[name]
