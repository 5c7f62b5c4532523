"""ShuffleNet's channel shuffle (reshape to (N, g, C/g, H, W), swap axes 1 and 2, reshape back)
exported as one ncnn ShuffleChannel layer: a permutation, so the int8 layer after it sees
exactly the simulation's codes. Any other run of reshapes is one ncnn Reshape (exact too)."""
import pytest
from mxnet.gluon import HybridBlock, nn

import qat
from tests.helpers import converted_and_calibrated


class ShuffleNet(HybridBlock):
    def __init__(self, groups, channels=12, shuffle=True, **kwargs):
        super().__init__(**kwargs)
        self.groups, self.shuffle = groups, shuffle
        with self.name_scope():
            self.c1 = nn.Conv2D(channels, 1, in_channels=3)
            self.c2 = nn.Conv2D(channels, 3, padding=1, groups=groups, in_channels=channels)
            self.pool = nn.GlobalAvgPool2D()
            self.fc = nn.Dense(5, in_units=channels)

    def hybrid_forward(self, F, x):
        y = F.relu(self.c1(x))
        if self.shuffle:
            y = y.reshape((0, -4, self.groups, -1, -2)).swapaxes(1, 2).reshape((0, -3, -2))
        else:  # a reshape that is no channel shuffle
            y = y.reshape((0, -4, self.groups, -1, -2)).reshape((0, -3, -2))
        return self.fc(self.pool(F.relu(self.c2(y))))


def _net(groups, **kwargs):
    return converted_and_calibrated(lambda: ShuffleNet(groups, **kwargs), (3, 7, 9))


@pytest.mark.parametrize('packing', [False, True], ids=['packing-off', 'packing-on'])
@pytest.mark.parametrize('groups', [2, 3, 4])
def test_channel_shuffle_is_one_exact_shufflechannel_layer(tmp_path, groups, packing):
    net, data = _net(groups)
    paths = qat.export(net, str(tmp_path), (3, 7, 9))
    lines = open(paths['int8_param']).read().splitlines()
    shuffle = [line for line in lines if line.startswith('ShuffleChannel')]
    assert len(shuffle) == 1 and shuffle[0].endswith(f'0={groups}')
    assert not any(line.startswith(('Reshape', 'Permute')) for line in lines)
    report = qat.verify(net, str(tmp_path), data, packing=packing)
    assert report['passed'], report['failures']
    for layer in report['layers']:
        assert layer.get('code_mismatches', 0) == 0, layer['layer']
        if layer['int8']:
            assert layer['max_lsb'] == 0, layer


def test_another_reshape_run_is_one_exact_ncnn_reshape(tmp_path):
    net, data = _net(2, shuffle=False)  # reshape to 5-D and back: one Reshape to (C, H, W)
    paths = qat.export(net, str(tmp_path), (3, 7, 9))
    lines = open(paths['int8_param']).read().splitlines()
    reshapes = [line for line in lines if line.startswith('Reshape')]
    assert len(reshapes) == 1 and reshapes[0].endswith('0=9 1=7 2=12'), reshapes
    report = qat.verify(net, str(tmp_path), data, packing=False)
    assert report['passed'], report['failures']
    assert all(layer.get('code_mismatches', 0) == 0 for layer in report['layers'])
