"""Blocks that appear more than once: registered in two slots (GoogLeNet's ``output`` is also
``head.2``), called twice (DLA's one pool after every level, Xception's shared relu), and two
blocks tied to one weight. The first two convert once and export bit-exact; the third is a
clear error."""
import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import HybridBlock, nn

import qat
from qat.errors import UserError


class CalledTwice(HybridBlock):
    """One conv, one relu and one pool, each called twice: nodes that share a name."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.stem = nn.Conv2D(8, 3, padding=1, in_channels=3)
            self.conv = nn.Conv2D(8, 3, padding=1, in_channels=8)
            self.relu = nn.Activation('relu')
            self.pool = nn.GlobalAvgPool2D()
            self.fc = nn.Dense(10, in_units=16)

    def hybrid_forward(self, F, x):
        a = self.relu(self.stem(x))
        b = self.relu(self.conv(a))
        c = self.relu(self.conv(b))
        return self.fc(F.concat(F.flatten(self.pool(b)), F.flatten(self.pool(c)), dim=1))


class TwoSlots(HybridBlock):
    """A Dense registered as ``output`` and inside ``head``, as GluonCV's GoogLeNet does."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.body = nn.HybridSequential(prefix='')
            self.body.add(nn.Conv2D(8, 3, in_channels=3), nn.BatchNorm(in_channels=8),
                          nn.Activation('relu'))
            self.head = nn.HybridSequential(prefix='')
            self.output = nn.Dense(10, in_units=8 * 6 * 6)
            self.head.add(self.output)

    def hybrid_forward(self, F, x):
        return self.head(self.body(x))


class Tied(HybridBlock):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.fc1 = nn.Dense(16, in_units=3 * 8 * 8)
            self.fc2 = nn.Dense(16, in_units=16, params=nn.Dense(16, in_units=16).params)
            self.fc3 = nn.Dense(16, in_units=16, params=self.fc2.params)

    def hybrid_forward(self, F, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _exported_and_verified(cls, tmp_path):
    with mx.name.NameManager():
        net = cls()
    net.initialize(mx.init.Xavier())
    data = mx.nd.array(np.random.RandomState(0).normal(0, 1, (4, 3, 8, 8)))
    want = net(data).asnumpy()
    qat.convert_model(net)
    qat.disable_quantize(net)
    np.testing.assert_array_equal(net(data).asnumpy(), want)  # still the float net
    qat.enable_quantize(net)
    qat.calibrate(net, [data], method='max')
    qat.freeze_bn(net)
    net.hybridize()
    net(data)
    qat.export(net, str(tmp_path), (3, 8, 8))
    return net, qat.verify(net, str(tmp_path), [data], packing=False)


def test_a_block_called_twice_exports_and_verifies_bit_exact(tmp_path):
    net, report = _exported_and_verified(CalledTwice, tmp_path)
    assert len(qat.quant_blocks(net)) == 3
    assert report['passed'], report['failures']
    int8 = [layer for layer in report['layers'] if layer['int8']]
    assert len(int8) == 4  # the shared conv is two int8 layers of the export
    assert all(layer['max_lsb'] == 0 and layer.get('code_mismatches', 0) == 0
               for layer in int8)


def test_a_block_in_two_slots_is_converted_once(tmp_path):
    net, report = _exported_and_verified(TwoSlots, tmp_path)
    assert net.output is net.head[0] and isinstance(net.output, qat.QDense)
    assert [block.name for _, block in qat.quant_blocks(net)] == [net.body[0].name,
                                                                  net.output.name]
    assert report['passed'], report['failures']
    qat.to_float(net)
    assert net.output is net.head[0] and type(net.output) is nn.Dense


def test_tied_weights_are_a_clear_error():
    with mx.name.NameManager():
        net = Tied()
    net.initialize()
    net(mx.nd.zeros((1, 3, 8, 8)))
    with pytest.raises(UserError, match='share one weight .*exclude the other'):
        qat.convert_model(net)
    qat.convert_model(Tied(), exclude=['*dense2*'])  # quantizing one of them is fine
