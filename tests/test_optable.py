"""One test per op and pattern of the op table (``qat.deploy.optable``), on the real ncnn runtime.

Each net is int8 conv -> the op -> int8 conv -> global pool -> int8 dense, on an odd-sized
input (7x9: vector tails everywhere), random weights, max-calibrated. Exported, then verified
with packing off: the op's ncnn layer is in the int8 model, fp32 ncnn matches MXNet float
(relative 1e-4), and, for the ops whose arithmetic is MXNet's or emulated
(``qat/native/ncnnmath.cc``), every layer of the int8 model, float ones included, equals the
simulation bit for bit (0 LSB, 0 code differences). The few ops whose ncnn arithmetic is not
emulated (GELU, division, softmax, general adaptive pooling) must still pass verify, within
0.01 LSB of the next int8 layer's input step.
"""
import gluoncv
import mxnet as mx
import pytest
from mxnet.gluon import HybridBlock, nn

import qat
from qat import native
from qat.deploy.export import read_manifest
from tests.helpers import converted_and_calibrated

SHAPE = (3, 7, 9)


class OpNet(HybridBlock):
    """c1 -> op -> c2 -> pool -> fc; ``op(F, y, net)`` may use the blocks ``extra()`` makes
    (a function: every net gets blocks of its own)."""

    def __init__(self, op, extra=(), depthwise=None, **kwargs):
        super().__init__(**kwargs)
        self.op = op
        with self.name_scope():
            self.c1 = nn.Conv2D(8, 3, padding=1, in_channels=3,
                                bias_initializer=mx.init.Uniform(1.0))
            self.extra = nn.HybridSequential()
            for block in (extra() if callable(extra) else extra):
                self.extra.add(block)
            self.c2 = nn.Conv2D(8, 1)
            self.pool = nn.GlobalAvgPool2D()
            self.fc = nn.Dense(5)

    def hybrid_forward(self, F, x):
        y = self.op(F, self.c1(x), self)
        return self.fc(self.pool(F.relu(self.c2(y))))


def _standalone(act):
    """``act`` on a blob that has a second consumer, so it cannot be fused into c1."""
    return lambda F, y, net: F.concat(act(F, y, net), y, dim=1)


def _se(F, y, net):  # an SE block through a Dense: InnerProduct + fused sigmoid, Reshape
    w = F.sigmoid(net.extra[0](F.contrib.AdaptiveAvgPooling2D(y, output_size=1)))
    return F.broadcast_mul(y, w.expand_dims(axis=2).expand_dims(axis=2))


def _se_conv(F, y, net):  # an SE block through a 1x1 conv: Convolution + fused sigmoid
    w = F.sigmoid(net.extra[0](F.contrib.AdaptiveAvgPooling2D(y, output_size=1)))
    return F.broadcast_mul(y, w)


def _split(F, y, net):
    a, b = F.split(y, num_outputs=2, axis=1)
    return F.concat(b, a, dim=1)


# name -> (op, extra blocks, ncnn layer types expected in the int8 model)
EXACT = {
    'sigmoid': (_standalone(lambda F, y, n: F.sigmoid(y)), (), ['Sigmoid']),
    'sigmoid_fused_conv': (lambda F, y, n: F.sigmoid(y), (), ['Convolution']),
    'tanh': (_standalone(lambda F, y, n: F.tanh(y)), (), ['TanH']),
    'elu': (_standalone(lambda F, y, n: F.LeakyReLU(y, act_type='elu', slope=0.7)), (),
            ['ELU']),
    'prelu': (_standalone(lambda F, y, n: n.extra[0](y)), lambda: (nn.PReLU(),), ['PReLU']),
    'leaky': (_standalone(lambda F, y, n: F.LeakyReLU(y, slope=0.1)), (), ['ReLU']),
    'swish': (_standalone(lambda F, y, n: n.extra[0](y)), lambda: (nn.Swish(),), ['Swish']),
    'swish_plain': (_standalone(lambda F, y, n: y * F.sigmoid(y)), (), ['Swish']),
    'hard_sigmoid_op': (_standalone(lambda F, y, n: F.hard_sigmoid(y)), (), ['HardSigmoid']),
    'hard_sigmoid_gluoncv': (_standalone(lambda F, y, n: n.extra[0](y)),
                             lambda: (gluoncv.nn.HardSigmoid(),), ['HardSigmoid']),
    'hard_swish_gluoncv': (_standalone(lambda F, y, n: n.extra[0](y)),
                           lambda: (gluoncv.nn.HardSwish(),), ['HardSwish']),
    'se_dense': (_se, lambda: (nn.Dense(8),), ['InnerProduct', 'Reshape', 'BinaryOp']),
    'se_conv': (_se_conv, lambda: (nn.Conv2D(8, 1),), ['BinaryOp']),
    'broadcast_sub_channel': (lambda F, y, n: F.broadcast_sub(
        y, F.slice_axis(y, axis=1, begin=0, end=1)), (), ['Crop', 'BinaryOp']),
    'broadcast_add_negative_axis': (lambda F, y, n: F.broadcast_add(
        y, F.slice_axis(y, axis=-1, begin=2, end=3)), (), ['Crop', 'BinaryOp']),
    'scalars': (lambda F, y, n: F.maximum(2.0 - (y * 0.5 + 1.0), -0.25), (), ['BinaryOp']),
    'transpose': (lambda F, y, n: F.transpose(y, axes=(0, 1, 3, 2)), (), ['Permute']),
    'swapaxes': (lambda F, y, n: F.swapaxes(y, 2, 3), (), ['Permute']),
    # (F.slice with a None bound crashes MXNet's deferred shape inference in a long run)
    'slice_odd': (lambda F, y, n: F.slice_axis(F.slice_axis(y, axis=2, begin=1, end=6), axis=3,
                                               begin=2, end=None), (), ['Crop']),
    'split': (_split, (), ['Crop']),
    'reshape_flatten_back': (lambda F, y, n: F.reshape(F.flatten(y), (0, 8, 7, 9)), (),
                             ['Flatten', 'Reshape']),
    'concat_height': (lambda F, y, n: F.concat(y, F.relu(y), dim=2), (), ['Concat']),
    'global_avg_odd_plane': (_standalone(lambda F, y, n: F.broadcast_mul(
        y, F.contrib.AdaptiveAvgPooling2D(y, output_size=1))), (), ['Pooling', 'BinaryOp']),
    'upsampling_nearest': (lambda F, y, n: F.UpSampling(y, scale=2, sample_type='nearest'), (),
                           ['Interp']),
    'bilinear_align': (lambda F, y, n: F.contrib.BilinearResize2D(y, height=12, width=17), (),
                       ['Interp']),
    'bilinear_half_pixel': (lambda F, y, n: F.contrib.BilinearResize2D(
        y, height=13, width=5, align_corners=False), (), ['Interp']),
    'bilinear_scale': (lambda F, y, n: F.contrib.BilinearResize2D(
        y, scale_height=2, scale_width=2, align_corners=False), (), ['Interp']),
    'ones_like_plus': (lambda F, y, n: F.elemwise_add(F.ones_like(y), F.sigmoid(y)), (),
                       ['BinaryOp']),
    'pad_reflect': (lambda F, y, n: F.pad(y, mode='reflect', pad_width=(0, 0, 0, 0, 1, 2, 2, 1)),
                    (), ['Padding']),
    'depthwise_5x5_dequantized': (lambda F, y, n: n.extra[0](y),
                                  lambda: (nn.Conv2D(8, 5, padding=2, groups=8,
                                             bias_initializer=mx.init.Uniform(1.0)),),
                                  ['ConvolutionDepthWise']),
    'depthwise_3x3_relu6_dequantized': (lambda F, y, n: F.concat(
        F.clip(n.extra[0](y), 0, 6), y, dim=1), lambda: (nn.Conv2D(8, 3, padding=1, groups=8,
                                                           bias_initializer=mx.init.Uniform(1.0)),),
        ['ConvolutionDepthWise']),
}

APPROXIMATE = {
    'gelu': (_standalone(lambda F, y, n: F.LeakyReLU(y, act_type='gelu')), (), ['GELU']),
    'div_scalar': (_standalone(lambda F, y, n: y / 3.0), (), ['BinaryOp']),
    'broadcast_div': (lambda F, y, n: F.broadcast_div(
        y, F.contrib.AdaptiveAvgPooling2D(F.abs(y) + 1, output_size=1)), (), ['BinaryOp']),
    'adaptive_avg_2x3': (lambda F, y, n: F.contrib.AdaptiveAvgPooling2D(y, output_size=(2, 3)),
                         (), ['Pooling']),
    'deconvolution': (lambda F, y, n: n.extra[0](y), lambda: (nn.Conv2DTranspose(
        6, 3, strides=2, padding=1, output_padding=1, bias_initializer=mx.init.Uniform(1.0)),),
        ['Deconvolution']),
    'instance_norm': (lambda F, y, n: n.extra[0](y), lambda: (nn.InstanceNorm(
        beta_initializer=mx.init.Uniform(1.0), gamma_initializer=mx.init.Uniform(1.0)),),
        ['InstanceNorm']),
    'layer_norm': (lambda F, y, n: n.extra[0](y), lambda: (nn.LayerNorm(
        beta_initializer=mx.init.Uniform(1.0)),), ['LayerNorm']),
    'group_norm': (lambda F, y, n: n.extra[0](y), lambda: (nn.GroupNorm(
        num_groups=2, beta_initializer=mx.init.Uniform(1.0)),), ['GroupNorm']),
    'sum_mean_keepdims': (lambda F, y, n: F.broadcast_add(
        F.sum(y, axis=1, keepdims=True), F.mean(y, axis=(2, 3), keepdims=True)), (),
        ['Reduction', 'BinaryOp']),
    'softmax_channels': (_standalone(lambda F, y, n: F.softmax(y, axis=1)), (), ['Softmax']),
}


def _export_and_verify(case, tmp_path):
    op, extra, kinds = case
    net, data = converted_and_calibrated(lambda: OpNet(op, extra), SHAPE)
    paths = qat.export(net, str(tmp_path), SHAPE)
    types = {line.split()[0] for line in open(paths['int8_param']).read().splitlines()[2:]}
    assert set(kinds) <= types, (kinds, sorted(types))
    report = qat.verify(net, str(tmp_path), data, packing=False)
    assert report['passed'], report['failures']
    assert report['fp32']['max_relative_error'] <= 1e-4
    return report


@pytest.mark.skipif(not native.available(), reason="ncnn's arithmetic needs the native ops")
@pytest.mark.parametrize('name', sorted(EXACT))
def test_op_is_exact_in_ncnn(name, tmp_path):
    report = _export_and_verify(EXACT[name], tmp_path)
    inexact = [(layer['layer'], layer['max_lsb'], layer.get('code_mismatches'))
               for layer in report['layers']
               if layer['max_lsb'] != 0 or layer.get('code_mismatches', 0)]
    assert not inexact, inexact


@pytest.mark.parametrize('name', sorted(APPROXIMATE))
def test_op_without_emulated_arithmetic_is_within_a_hundredth_lsb(name, tmp_path):
    report = _export_and_verify(APPROXIMATE[name], tmp_path)
    worst = max(layer['max_lsb'] for layer in report['layers'])
    assert worst <= 0.01, [(layer['layer'], layer['max_lsb']) for layer in report['layers']]


def test_unsupported_reshape_names_the_op_and_block(tmp_path):
    net, _ = converted_and_calibrated(lambda: OpNet(
        lambda F, y, n: F.reshape(y, (0, 2, 2, 2, 7, 9)).sum(axis=1).reshape((0, 4, 7, 9))), SHAPE)
    with pytest.raises(qat.deploy.ExportError, match=r"op 'Reshape' .*opnet.*at most 4 "
                                                     r"per-sample axes"):
        qat.export(net, str(tmp_path), SHAPE)


def test_several_outputs_are_exported_and_each_verified(tmp_path):
    class TwoHeads(OpNet):
        def hybrid_forward(self, F, x):
            y = F.relu(self.c1(x))
            return self.fc(self.pool(F.relu(self.c2(y)))), F.sigmoid(self.pool(y))

    net, data = converted_and_calibrated(lambda: TwoHeads(None), SHAPE)
    paths = qat.export(net, str(tmp_path), SHAPE)
    manifest = read_manifest(str(tmp_path))
    assert len(manifest['outputs']) == 2
    report = qat.verify(net, str(tmp_path), data, packing=False)
    assert report['passed'], report['failures']
    heads = [layer for layer in report['layers'] if layer['layer'] in manifest['outputs']]
    assert len(heads) == 2 and all(layer['max_lsb'] == 0 for layer in heads), heads
    assert paths['int8_param']


def test_without_the_native_ops_verify_warns_and_stays_within_a_hundredth_lsb(
        monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(native._state, 'ok', False)  # as on a machine without a compiler
    with caplog.at_level('WARNING', logger='qat.deploy.verify'):
        report = _export_and_verify(EXACT['se_dense'], tmp_path)
    assert "simulated with MXNet's arithmetic" in caplog.text
    assert max(layer['max_lsb'] for layer in report['layers']) <= 0.01
