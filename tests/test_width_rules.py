"""Deployment-aware width rules: ``QuantScheme(winograd_weight_bits=6)`` gives every 3x3
stride-1 ungrouped conv 6-bit weights (ncnn2table's rule for int8 Winograd, scale 31/absmax),
and those codes are what the int8 file carries."""
import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import qat
from qat.config import QuantConfig, QuantScheme
from qat.deploy import ncnn as ncnn_files, winograd
from qat.deploy.table import read_table
from qat.nn import quant_blocks
from tests.helpers import converted_and_calibrated

SHAPE = (3, 12, 12)


@pytest.mark.parametrize('block, bits', [
    (nn.Conv2D(8, 3, padding=1), 6),
    (nn.Conv2D(8, 3, strides=2, padding=1), 8),
    (nn.Conv2D(8, 1), 8),
    (nn.Conv2D(8, 3, padding=2, dilation=2), 8),
    (nn.Conv2D(8, 3, padding=1, groups=8, in_channels=8), 8),
    (nn.Dense(8), 8),
])
def test_the_rule_picks_ncnn2tables_convs(block, bits):
    scheme = QuantScheme(winograd_weight_bits=6)
    assert scheme.config_for(block, 'x').weight_bits == bits


def test_by_name_wins_and_the_first_layer_keeps_its_input_bits():
    conv = nn.Conv2D(8, 3, padding=1, prefix='first_')
    scheme = QuantScheme(first_layer_bits=8, winograd_weight_bits=6,
                         default=QuantConfig(weight_bits=4, input_bits=4))
    first = scheme.config_for(conv, 'x', first=True)
    assert (first.weight_bits, first.input_bits) == (6, 8)
    named = QuantScheme(by_name={'first*': QuantConfig()}, winograd_weight_bits=6)
    assert named.config_for(conv, 'x').weight_bits == 8


def test_recipe_key_is_validated():
    with pytest.raises(qat.errors.UserError, match=r'quantize.winograd_weight_bits: '):
        QuantScheme.from_dict({'winograd_weight_bits': 9})
    assert QuantScheme.from_dict({'winograd_weight_bits': 6}).winograd_weight_bits == 6


def _net():
    net = nn.HybridSequential()
    net.add(nn.Conv2D(16, 3, strides=2, padding=1, in_channels=3), nn.BatchNorm(),
            nn.Activation('relu'), nn.Conv2D(16, 3, padding=1), nn.BatchNorm(),
            nn.Activation('relu'), nn.GlobalAvgPool2D(), nn.Dense(4))
    return net


def test_six_bit_codes_reach_the_int8_file_and_verify_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(qat, 'convert_model', lambda net, **kw: qat.convert.convert_model(
        net, config=QuantScheme(winograd_weight_bits=6)))
    net, data = converted_and_calibrated(_net, SHAPE)
    blocks = {b.name: b for _, b in quant_blocks(net)}
    six = [name for name, block in blocks.items() if block.config.weight_bits == 6]
    assert len(six) == 1
    paths = qat.export(net, str(tmp_path), SHAPE, winograd='bound')
    layers = ncnn_files.read_weights(paths['int8_param'], paths['int8_bin'])
    for name, block in blocks.items():
        codes = layers[name]['weight']
        limit = 31 if name in six else 127
        assert np.abs(codes).max() == limit  # each channel's absmax code is qmax
        if name in six:
            assert winograd.is_safe(codes.reshape(16, 16, 3, 3))
    scales, _ = read_table(paths['table'])
    folded = blocks[six[0]].folded_weight()[0].asnumpy().reshape(16, -1)
    expected = np.float32(31) / np.abs(folded).max(axis=1).astype(np.float32)
    np.testing.assert_allclose(scales[six[0]], expected, rtol=1e-6)  # ncnn2table's 31/absmax
    assert qat.verify(net, str(tmp_path), data, packing=False)['passed']
    assert qat.verify(net, str(tmp_path), data)['int8']['within_1lsb'] == 1.0


# ----- unsigned codes where the input cannot be negative -------------------------------------
class _Branches(nn.HybridBlock):
    """What feeds each conv: the image, a BN (signed), a ReLU, a max pool of a ReLU, a sum of
    two ReLUs, a swish x * sigmoid(x) (signed), a squeeze-excitation relu * sigmoid, a
    clip(0, 6) and a LeakyReLU (signed); then the dense after a global pool of a ReLU."""

    def __init__(self):
        super().__init__(prefix='b_')
        with self.name_scope():
            self.stem = nn.Conv2D(8, 3, padding=1, in_channels=3, prefix='stem_')
            self.bn = nn.BatchNorm(prefix='bn_')
            self.names = ['after_bn', 'after_relu', 'after_pool', 'after_sum', 'after_swish',
                          'after_se', 'after_clip', 'after_leaky']
            for name in self.names:
                setattr(self, name, nn.Conv2D(8, 1, in_channels=8, prefix=name + '_'))
            self.dense = nn.Dense(4, in_units=8, prefix='dense_')

    def hybrid_forward(self, F, x):
        y = self.bn(self.stem(x))
        r = F.relu(y)
        outs = [self.after_bn(y), self.after_relu(r),
                self.after_pool(F.Pooling(r, kernel=(3, 3), pad=(1, 1), pool_type='max')),
                self.after_sum(r + F.Activation(y, act_type='relu')),
                self.after_swish(y * F.sigmoid(y)), self.after_se(r * F.sigmoid(y)),
                self.after_clip(F.clip(y, 0, 6)), self.after_leaky(F.LeakyReLU(y, slope=0.1))]
        total = F.add_n(*outs)
        return self.dense(F.flatten(F.Pooling(F.relu(total), global_pool=True,
                                              pool_type='avg')))


UNSIGNED = {'after_relu', 'after_pool', 'after_sum', 'after_se', 'after_clip', 'dense'}


def _branches():
    net = _Branches()
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1,) + SHAPE))
    return net


@pytest.mark.parametrize('bits', [4, 7])
def test_unsigned_after_relu_picks_the_inputs_that_cannot_be_negative(bits):
    net = _branches()
    qat.convert_model(net, config=QuantScheme(QuantConfig(weight_bits=bits, input_bits=bits),
                                              unsigned_after_relu=True))
    signed = {block.name[len('b_'):]: block.config.input_signed
              for _, block in quant_blocks(net)}
    assert {name for name, value in signed.items() if not value} == UNSIGNED
    assert signed['stem'] and signed['after_bn'] and signed['after_swish']


def test_unsigned_after_relu_leaves_8_bit_layers_and_the_default_signed():
    for scheme in (QuantScheme(unsigned_after_relu=True),
                   QuantScheme(QuantConfig(weight_bits=4, input_bits=4))):
        net = _branches()
        qat.convert_model(net, config=scheme)
        assert all(block.config.input_signed for _, block in quant_blocks(net))
    assert QuantScheme.from_dict({'unsigned_after_relu': True}).unsigned_after_relu


def test_unsigned_after_relu_exports_and_verifies_exactly(tmp_path):
    net = _branches()
    qat.convert_model(net, config=QuantScheme(QuantConfig(weight_bits=4, input_bits=4),
                                              first_layer_bits=8, unsigned_after_relu=True))
    data = [mx.nd.array(np.random.RandomState(0).normal(0, 1, (4,) + SHAPE))]
    qat.calibrate(net, data, method='max')
    unsigned = sum(not b.config.input_signed for _, b in quant_blocks(net))
    assert unsigned == len(UNSIGNED)
    qat.export(net, str(tmp_path), SHAPE)
    report = qat.verify(net, str(tmp_path), data, packing=False)
    assert report['passed'] and report['int8']['max_abs_error'] == 0.0


def test_mixed_precision_promotes_an_unsigned_layer_to_signed_8_bits():
    from qat.analysis.mixed_precision import _to_8_bits
    net = _branches()
    qat.convert_model(net, config=QuantScheme(QuantConfig(weight_bits=4, input_bits=4),
                                              unsigned_after_relu=True))
    block = dict((b.name, b) for _, b in quant_blocks(net))['b_after_relu']
    assert not block.config.input_signed
    _to_8_bits(block)
    assert (block.config.input_bits, block.config.input_signed) == (8, True)
