"""Grouped (not depthwise) int8 convolutions in ncnn, packing on (ncnn's default) and off.

ncnn's int8 ConvolutionDepthWise (``7=groups``) runs a grouped conv as one Convolution per
group. With packing on and a multiple of 8 outputs per group, the x86 AVX / AVX-512 int8
Convolution writes its dequantized output with another elempack (8 or 16) than the slice of
the layer's output prepared for it (4): the group's result lands in a new Mat and the layer
returns uninitialized memory (measured 1e19 to 1e36 LSB off in the layer, or NaN). A
requantized output (8=101) and the fp32 path are not affected. The exporter writes that class (``ncnn.splits_groups``)
as Slice -> one int8 Convolution per group -> Concat and keeps ConvolutionDepthWise for
every other grouped conv (docs/ncnn-int8-contract.md §4.3).

Checked here: the exported int8 model agrees with the simulation exactly (0 LSB, 0 code
mismatches, top-1 1.0) with packing on and off over a sweep of groups / channels per group;
the old form still fails with ncnn's default options on the buggy class (so the workaround
is needed) while the exported form is exact; the old form is exact outside the class (so the
split is written only where needed).
"""
import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

pytest.importorskip('ncnn')

import qat  # noqa: E402
from qat import reference  # noqa: E402
from qat.deploy import export, ncnn as ncnn_files, verify  # noqa: E402
from qat.deploy.ir import Graph, Layer, Quant  # noqa: E402
from qat.deploy.verify import NcnnModel  # noqa: E402

FP32_RELATIVE = 1e-4
FLOAT_ROUNDING_LSB = 1e-3  # fp32 layers of the int8 model (pooling sums in another order)
# the old form's error on the buggy class: 1e19 LSB and more in the layer (120+ at the
# output), or NaN
BUG_LSB = 50

# (groups, input channels per group, outputs per group)
SPLIT = [(2, 4, 8), (2, 8, 16), (2, 16, 32), (4, 4, 16), (4, 16, 8), (8, 8, 8), (32, 4, 8),
         (3, 8, 24), (2, 3, 16)]
KEPT = [(4, 4, 4), (2, 8, 12), (4, 8, 2), (2, 16, 4)]  # not a multiple of 8 outputs per group


def _net(groups, in_g, out_g, tail=False, seed=0, size=8):
    """conv -> ReLU -> grouped 3x3 conv [-> ReLU -> 1x1 conv] -> GAP -> Dense, calibrated
    (max), BN frozen; and two batches of N(0, 1) images."""
    mx.random.seed(seed)
    rs = np.random.RandomState(seed)
    net = nn.HybridSequential(prefix='g_')
    with net.name_scope():
        net.add(nn.Conv2D(groups * in_g, 3, padding=1, in_channels=3), nn.Activation('relu'),
                nn.Conv2D(groups * out_g, 3, padding=1, groups=groups,
                          in_channels=groups * in_g))
        if tail:  # the grouped conv feeds an int8 conv: requantized (8=101)
            net.add(nn.Activation('relu'), nn.Conv2D(8, 1, in_channels=groups * out_g))
        net.add(nn.GlobalAvgPool2D(), nn.Dense(5))
    net.initialize(mx.init.Xavier())
    data = [mx.nd.array(rs.normal(0, 1, (4, 3, size, size))) for _ in range(2)]
    net(data[0])
    qat.convert_model(net)
    qat.calibrate(net, data, method='max')
    qat.freeze_bn(net)
    return net, data, (3, size, size)


def _assert_exact(net, folder, data, packing):
    report = verify(net, folder, [data[1]], packing=packing)
    assert report['passed'], report['failures']
    assert report['int8']['top1_agreement'] == 1.0
    assert report['int8']['max_abs_error'] == 0.0
    assert report['fp32']['max_relative_error'] <= FP32_RELATIVE
    for layer in report['layers']:
        assert layer['max_lsb'] <= (0.0 if layer['int8'] else FLOAT_ROUNDING_LSB), layer
        assert layer.get('code_mismatches', 0) == 0, layer
    return report


def _layers(folder, int8=True):
    return {name: (kind, bottoms, params) for kind, name, bottoms, _, params in
            ncnn_files.read_param(f"{folder}/model{'-int8' if int8 else ''}.param")}


@pytest.mark.parametrize('groups, in_g, out_g', SPLIT + KEPT)
def test_grouped_int8_conv_is_exact_with_packing_on_and_off(tmp_path, groups, in_g, out_g):
    net, data, shape = _net(groups, in_g, out_g)
    folder = str(tmp_path)
    paths = export(net, folder, shape)
    layers = _layers(folder)
    split = (groups, in_g, out_g) in SPLIT
    if split:
        assert layers['g_conv1'][0] == 'Concat'
        assert layers['g_conv1'][1] == [f'g_conv1_group_{g}' for g in range(groups)]
        assert layers['g_conv1_slice'][0] == 'Slice'
        assert layers['g_conv1_slice'][2][0] == [in_g] * groups  # ints, one per group
        for g in range(groups):
            kind, bottoms, params = layers[f'g_conv1_group_{g}']
            assert (kind, bottoms, params[0], params[8]) == (
                'Convolution', [f'g_conv1_slice_{g}'], out_g, 2)
        assert 'ConvolutionDepthWise' not in {kind for kind, _, _ in layers.values()}
        assert layers['g_conv0'][2][8] == 2  # no requantization into a Slice
    else:
        assert layers['g_conv1'][0] == 'ConvolutionDepthWise'
        assert layers['g_conv1'][2][8] == 1
        assert layers['g_conv0'][2][8] == 102
    # the fp32 model keeps ConvolutionDepthWise (its packed path is exact)
    assert _layers(folder, int8=False)['g_conv1'][0] == 'ConvolutionDepthWise'
    # read back as one layer: the trained codes, one scale per group, the input scale
    block = {b.name: b for _, b in qat.quant_blocks(net)}['g_conv1']
    written = ncnn_files.read_weights(paths['int8_param'], paths['int8_bin'])
    assert set(written) == {'g_conv0', 'g_conv1', 'g_dense0'}
    codes, scales = (value.asnumpy() for value in block.weight_codes())
    np.testing.assert_array_equal(written['g_conv1']['weight'], codes.reshape(-1))
    np.testing.assert_array_equal(written['g_conv1']['weight_scales'],
                                  scales.reshape(groups, -1)[:, 0])
    assert written['g_conv1']['input_scale'][0] == block.input_scale()
    for packing in (True, False):
        _assert_exact(net, folder, data, packing)


def test_requantized_grouped_conv_keeps_convolutiondepthwise_and_is_exact(tmp_path):
    """8=101 (the output goes to an int8 conv as codes) uses elempack 8 on both sides in
    ncnn: not in the class, exact with packing on."""
    net, data, shape = _net(4, 8, 8, tail=True)
    export(net, str(tmp_path), shape)
    layers = _layers(str(tmp_path))
    assert layers['g_conv1'][0] == 'ConvolutionDepthWise' and layers['g_conv1'][2][8] == 101
    for packing in (True, False):
        report = _assert_exact(net, str(tmp_path), data, packing)
        assert {entry['layer']: entry.get('code_mismatches') for entry in report['layers']
                if entry['kind'] == 'Convolution'}['g_conv1'] == 0


class _Assorted(mx.gluon.HybridBlock):
    """Split grouped convs in a chain (no requantization between them), a fused leaky ReLU,
    and a grouped 1x1 conv after global pooling (Reshape in front of the Slice)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.stem = nn.Conv2D(16, 3, padding=1, activation='relu')
            self.a = nn.Conv2D(32, 3, padding=1, groups=2)
            self.leaky = nn.LeakyReLU(0.1)
            self.b = nn.Conv2D(32, 3, padding=1, groups=4, activation='relu')
            self.pool = nn.GlobalAvgPool2D()
            self.c = nn.Conv2D(16, 1, groups=2)
            self.out = nn.Dense(5)

    def hybrid_forward(self, F, x):
        y = self.b(self.leaky(self.a(self.stem(x))))
        return self.out(self.c(self.pool(y)))


@pytest.mark.parametrize('bits', [8, 4])
def test_split_grouped_convs_in_a_chain_after_pooling_and_narrow(tmp_path, bits):
    rs = np.random.RandomState(5)
    mx.random.seed(5)
    net = _Assorted(prefix='mix_')
    net.initialize(mx.init.Xavier())
    data = [mx.nd.array(rs.normal(0, 1, (4, 3, 8, 8))) for _ in range(2)]
    net(data[0])
    config = qat.QuantConfig(weight_bits=bits, input_bits=bits)
    qat.convert_model(net, config=config, layer_configs={qat.first_layer(net): qat.QuantConfig()})
    qat.calibrate(net, data, method='max')
    qat.freeze_bn(net)
    export(net, str(tmp_path), (3, 8, 8))
    layers = _layers(str(tmp_path))
    kinds = [kind for kind, _, _ in layers.values()]
    assert kinds.count('Slice') == 3 and 'ConvolutionDepthWise' not in kinds
    assert kinds.count('Convolution') == 1 + 2 + 4 + 2 and 'Reshape' in kinds
    assert {layers[f'mix_conv1_group_{g}'][2].get(9) for g in range(2)} == {2}  # fused leaky
    assert {layers[f'mix_conv2_group_{g}'][2].get(9) for g in range(4)} == {1}  # fused relu
    assert layers['mix_conv3_slice'][1] == ['mix_conv3_reshape']
    if bits == 4:  # narrow inputs: a saturating Clip in front of each split conv
        assert kinds.count('Clip') == 4
    for packing in (True, False):
        _assert_exact(net, str(tmp_path), data, packing)


# ----- the bug itself: the old form against ncnn's default options ----------------------------

def _single(groups, in_g, out_g, seed=0, size=(7, 9)):
    """One int8 grouped 3x3 conv (pad 1, bias, per-group scales) as a graph; an input; and
    the integer reference of ncnn's output (docs/ncnn-int8-contract.md §3.2)."""
    rs = np.random.RandomState(seed)
    out = groups * out_g
    codes = rs.randint(-127, 128, (out, in_g, 3, 3))
    scales = np.repeat(rs.uniform(50, 200, groups), out_g).astype(np.float32)
    bias = rs.normal(0, 0.1, out).astype(np.float32)
    s_in = np.float32(40)
    conv = Layer('Convolution', 'conv', ['data'],
                 params=dict(num_output=out, kernel=(3, 3), stride=(1, 1), pad=(1, 1),
                             dilate=(1, 1), groups=groups, activation=None, bias_term=True),
                 weights={'weight': (codes / scales[:, None, None, None]).astype(np.float32),
                          'bias': bias},
                 quant=Quant(s_in, scales, codes.astype(np.int8)))
    x = rs.normal(0, 1, (groups * in_g,) + size).astype(np.float32)
    graph = Graph([Layer('Input', 'data', [], params={'shape': x.shape}), conv], ['conv'])
    acc = reference.conv2d_int(reference.quantize(x, s_in)[None], codes, pad=(1, 1),
                               groups=groups)[0]
    expected = reference.dequantize(acc, s_in, scales, bias, channel_axis=0)
    lsb = float(np.abs(expected).max()) / 127
    return graph, x, expected, lsb


def _run(graph, tmp_path, x, name, **options):
    """The int8 model of ``graph`` in ncnn with its default options (but ``options``)."""
    text, data = ncnn_files.render(graph, int8=True)
    (tmp_path / f'{name}.param').write_text(text)
    (tmp_path / f'{name}.bin').write_bytes(data)
    model = NcnnModel(str(tmp_path / f'{name}.param'), str(tmp_path / f'{name}.bin'), **options)
    return model.run(x, ['conv'])['conv'].reshape(-1), text


def _old_form(monkeypatch):
    """Render grouped convs as before the workaround: ConvolutionDepthWise 7=groups, 8=1."""
    monkeypatch.setattr(ncnn_files, 'splits_groups', lambda graph, layer: False)


def _error(out, expected, lsb):
    if not np.all(np.isfinite(out)):
        return float('inf')
    return float(np.abs(out - expected.reshape(-1)).max()) / lsb


@pytest.mark.parametrize('groups, in_g, out_g', [(2, 8, 8), (4, 4, 16), (8, 16, 32),
                                                 (2, 3, 24)])
def test_old_form_hits_the_bug_with_default_options_and_the_export_does_not(
        tmp_path, monkeypatch, groups, in_g, out_g):
    graph, x, expected, lsb = _single(groups, in_g, out_g)
    new, text = _run(graph, tmp_path, x, 'new')
    assert 'Slice' in text and 'ConvolutionDepthWise' not in text
    assert _error(new, expected, lsb) == 0.0  # ncnn's defaults: packing (and fp16 storage) on
    assert _error(_run(graph, tmp_path, x, 'new_flat', use_packing_layout=False)[0],
                  expected, lsb) == 0.0
    with monkeypatch.context() as patch:
        _old_form(patch)
        old, text = _run(graph, tmp_path, x, 'old')
        assert 'ConvolutionDepthWise' in text and ' 7=%d 8=1' % groups in text
        # If this fails, ncnn computes the old form right: the split may be dropped.
        assert _error(old, expected, lsb) > BUG_LSB
        flat, _ = _run(graph, tmp_path, x, 'old_flat', use_packing_layout=False)
        assert _error(flat, expected, lsb) == 0.0  # the bug is the packed path only


@pytest.mark.parametrize('groups, in_g, out_g', [(2, 8, 4), (4, 16, 12), (8, 4, 2)])
def test_old_form_is_exact_outside_the_class_and_stays(tmp_path, groups, in_g, out_g):
    """Outputs per group not a multiple of 8: ConvolutionDepthWise is right with packing on,
    and the export keeps it (pinned bytes, e.g. custom_w4a4's 4 outputs per group)."""
    graph, x, expected, lsb = _single(groups, in_g, out_g)
    out, text = _run(graph, tmp_path, x, 'kept')
    assert 'ConvolutionDepthWise' in text and 'Slice' not in text
    assert _error(out, expected, lsb) == 0.0
