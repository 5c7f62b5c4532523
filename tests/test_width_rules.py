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
