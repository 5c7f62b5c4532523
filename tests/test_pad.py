"""MXNet's Pad (constant / edge / reflect, on height and width) exported as ncnn Padding: an
fp32 layer without arithmetic, so the int8 layer after it sees exactly the simulation's codes.
Caffe has no padding layer: the export then writes the ncnn files and no Caffe files."""
import logging
import os

import pytest
from mxnet.gluon import HybridBlock, nn

import qat
from tests.helpers import converted_and_calibrated

# fp32 layers after the int8 ones (pooling, dense) differ by float32 summation order only
FLOAT_ROUNDING_LSB = 1e-3


class PadNet(HybridBlock):
    def __init__(self, mode, pad_width=(0, 0, 0, 0, 1, 2, 2, 1), **kwargs):
        super().__init__(**kwargs)
        self.mode, self.pad_width = mode, pad_width
        with self.name_scope():
            self.c1 = nn.Conv2D(8, 3, in_channels=3)
            self.c2 = nn.Conv2D(8, 3, in_channels=8)
            self.pool = nn.GlobalAvgPool2D()
            self.fc = nn.Dense(5, in_units=8)

    def hybrid_forward(self, F, x):
        y = F.relu(self.c1(x))
        y = F.pad(y, mode=self.mode, pad_width=self.pad_width,
                  constant_value=0.5 if self.mode == 'constant' else 0)
        return self.fc(self.pool(F.relu(self.c2(y))))


def _net(mode, **kwargs):
    return converted_and_calibrated(lambda: PadNet(mode, **kwargs), (3, 11, 9))


@pytest.mark.parametrize('packing', [False, True], ids=['packing-off', 'packing-on'])
@pytest.mark.parametrize('mode', ['constant', 'edge', 'reflect'])
def test_pad_exports_as_padding_and_the_next_int8_layer_is_exact(tmp_path, caplog, mode,
                                                                  packing):
    net, data = _net(mode)
    with caplog.at_level(logging.WARNING):
        paths = qat.export(net, str(tmp_path), (3, 11, 9))
    text = open(paths['int8_param']).read()
    padding = [line for line in text.splitlines() if line.startswith('Padding')]
    assert len(padding) == 1
    assert ' 0=1 1=2 2=2 3=1 ' in padding[0] + ' '
    assert f"4={ {'constant': 0, 'edge': 1, 'reflect': 2}[mode] }" in padding[0]
    report = qat.verify(net, str(tmp_path), data, packing=packing)
    assert report['passed'], report['failures']
    for layer in report['layers']:
        assert layer.get('code_mismatches', 0) == 0, layer['layer']
        limit = 0 if layer['int8'] else FLOAT_ROUNDING_LSB
        assert layer['max_lsb'] <= limit, layer
    # Caffe has no padding layer: the ncnn files are there, the Caffe files are not
    assert 'prototxt' not in paths and not os.path.exists(tmp_path / 'model.prototxt')
    assert "no Caffe files: cannot write IR kind 'Padding'" in caplog.text
