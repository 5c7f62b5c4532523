"""The int8 Winograd bound (qat.deploy.winograd) against the real ncnn runtime.

One int8 Convolution (3x3, stride 1, pad 1, 8=2) with weight scales 1 and input scale 1, so
the input codes are the fed values and the fp32 output is ncnn's int32 result; compared with
the int64 convolution of ``qat.reference.conv2d_int``.
"""
import numpy as np
import pytest

ncnn = pytest.importorskip('ncnn')

from qat.deploy import winograd as wg  # noqa: E402
from qat.deploy.ir import Graph, Layer, Quant  # noqa: E402
from qat.deploy.ncnn import render  # noqa: E402
from qat.reference import conv2d_int  # noqa: E402

EXACT = 0  # max |ncnn - reference| allowed where a result must be exact
ALL_EQUAL_Y = 9 * 127 * 127  # |y| per input channel: all codes 127, all inputs 127


def model_files(tmp_path, codes, shape, groups=1, no_winograd=False, name='m'):
    """Write the single-conv int8 model with the project's ncnn writer; (param, bin) paths."""
    codes = np.asarray(codes)
    out = codes.shape[0]
    conv = Layer('Convolution', 'conv', ['data'],
                 params=dict(num_output=out, kernel=(3, 3), stride=(1, 1), pad=(1, 1),
                             dilate=(1, 1), groups=groups, activation=None, bias_term=False),
                 weights={'weight': codes.astype(np.float32)},
                 quant=Quant(np.float32(1), np.ones(out, np.float32), codes.astype(np.int8)))
    graph = Graph([Layer('Input', 'data', [], params={'shape': tuple(shape)}), conv], ['conv'])
    text, data = render(graph, int8=True, guarded={'conv'} if no_winograd else ())
    param, weights = tmp_path / f'{name}.param', tmp_path / f'{name}.bin'
    param.write_text(text)
    weights.write_bytes(data)
    return str(param), str(weights)


def run_ncnn(files, x, packing=True, winograd43=True):
    net = ncnn.Net()
    net.opt.use_int8_inference = True
    net.opt.use_packing_layout = packing
    net.opt.use_winograd43_convolution = winograd43
    net.opt.num_threads = 1
    net.load_param(files[0])
    net.load_model(files[1])
    data = np.ascontiguousarray(x, np.float32)  # ncnn.Mat does not keep its array alive
    mat = ncnn.Mat(data)
    ex = net.create_extractor()
    ex.input('data', mat)
    _, out = ex.extract('conv')
    return np.array(out).astype(np.int64)


def reference(x, codes, groups=1):
    return conv2d_int(np.asarray(x)[None], codes, pad=(1, 1), groups=groups)[0].astype(np.int64)


def laplace_codes(rng, out, channels, qmax=127):
    """Trained-like codes: Laplacian weights, per-output-channel max scaled to qmax."""
    w = rng.laplace(size=(out, channels, 3, 3))
    return np.round(w * qmax / np.abs(w).max(axis=(1, 2, 3), keepdims=True)).astype(np.int64)


# ---- the selection and the arithmetic, without the runtime ----------------------------------

@pytest.mark.parametrize('args, expected', [
    (((3, 3), (1, 1), (1, 1), 1, 16, 16), 'F43'),
    ((3, 1, 1, 1, 9, 8), 'F43'),
    ((3, 1, 1, 1, 8, 9), 'F43'),
    ((3, 1, 1, 1, 8, 8), None),          # needs num_input > 8 or num_output > 8
    ((3, 2, 1, 1, 64, 64), None),        # stride 2
    ((3, 1, 2, 1, 64, 64), None),        # dilation 2
    ((1, 1, 1, 1, 64, 64), None),        # 1x1
    ((3, 1, 1, 64, 64, 64), None),       # depthwise
    ((3, 1, 1, 2, 32, 32), 'F43'),       # grouped: 16 per group
    ((3, 1, 1, 4, 32, 32), None),        # grouped: 8 per group
])
def test_selection(args, expected):
    assert wg.uses_winograd(*args) == expected


def test_selection_options():
    assert wg.uses_winograd(3, 1, 1, 1, 64, 64, winograd43=False) == 'F23'
    assert wg.uses_winograd(3, 1, 1, 1, 64, 64, winograd=False) is None


@pytest.mark.parametrize('variant', ['F43', 'F23'])
def test_matrices_give_scaled_convolution(variant):
    """A^T [(G g G^T) * (B^T d B)] A = SCALE * (d correlated with g), exactly in integers."""
    g_mat, bt, at = wg.MATRICES[variant]
    rng = np.random.default_rng(0)
    n, m = bt.shape[0], at.shape[0]
    for _ in range(20):
        g = rng.integers(-127, 128, (3, 3))
        d = rng.integers(-127, 128, (n, n))
        y = at @ ((g_mat @ g @ g_mat.T) * (bt @ d @ bt.T)) @ at.T
        direct = np.array([[(d[i:i + 3, j:j + 3] * g).sum() for j in range(m)]
                           for i in range(m)])
        np.testing.assert_array_equal(y, wg.SCALE[variant] * direct)


def test_safe_limits_by_brute_force():
    """SAFE_Y is the largest |y| below which every y comes out right (runtime model)."""
    for variant in ('F43', 'F23', None):
        limit = wg.SAFE_Y[variant]
        if variant == 'F43':
            y = np.arange(-limit, limit + 1)
            assert np.array_equal(wg.runtime_result(y, variant), y)
        edge = np.array([limit - 1, limit, -limit])
        assert np.array_equal(wg.runtime_result(edge, variant), edge)
        assert wg.runtime_result(limit + 1, variant) != limit + 1
    assert wg.runtime_result(2 ** 31 // 576 + 1, 'F43') < 0  # 576 y wraps


def test_worst_case_all_equal_codes():
    for channels in (1, 12, 13, 64):
        codes = np.full((8, channels, 3, 3), 127)
        worst = wg.worst_case(codes)
        assert worst['y'] == ALL_EQUAL_Y * channels
        assert worst['output'] == 576 * ALL_EQUAL_Y * channels
        assert worst['kernel_tm'] == 144 * 127
        assert worst['input_tm'] == 100 * 127
        assert worst['gemm'] == channels * 144 * 127 * 100 * 127
        assert worst['safe'] == (channels <= 12) == wg.is_safe(codes)
    # post-ReLU inputs: the range [0, 127] halves nothing here (all codes positive)
    assert wg.worst_case(np.full((1, 4, 3, 3), 127), x_range=(0, 127))['y'] == 4 * ALL_EQUAL_Y


def test_worst_case_stages_are_attained():
    """The 'gemm' maximum is reached by the per-channel sign tiles; 'y' by adversarial_input."""
    rng = np.random.default_rng(1)
    codes = rng.integers(-127, 128, (4, 6, 3, 3))
    worst = wg.worst_case(codes)
    u = np.einsum('ai,ocij,bj->ocab', wg.G43, codes, wg.G43)
    o, a, b = np.unravel_index(np.abs(u).sum(axis=1).argmax(), (4, 6, 6))
    coef = np.outer(wg.BT43[a], wg.BT43[b])
    gemm = 0
    for c in range(6):  # each channel's 6x6 tile: +-127 by the sign of U * coef
        tile = 127 * np.sign(u[o, c, a, b] * coef)
        gemm += u[o, c, a, b] * (wg.BT43 @ tile @ wg.BT43.T)[a, b]
    assert abs(gemm) == worst['gemm']
    x = wg.adversarial_input(codes, variant=None)
    assert np.abs(reference(x, codes)).max() == worst['y']


# ---- the runtime -------------------------------------------------------------------------

@pytest.mark.parametrize('name, codes', [
    ('all-127, 13 channels (off by one)', np.full((8, 13, 3, 3), 127)),
    ('all-127, 26 channels (wraps)', np.full((8, 26, 3, 3), 127)),
    ('random 8-bit, 64 channels', np.random.default_rng(2).integers(-127, 128, (16, 64, 3, 3))),
    ('random 8-bit, 128 channels', np.random.default_rng(3).integers(-127, 128, (16, 128, 3, 3))),
    ('random 8-bit, 256 channels', np.random.default_rng(4).integers(-127, 128, (16, 256, 3, 3))),
    ('trained-like 8-bit, 256 channels', laplace_codes(np.random.default_rng(5), 16, 256)),
])
def test_unsafe_layers_fail_in_ncnn_and_31_64_fixes_them(tmp_path, name, codes):
    """(a) is_safe says no -> the adversarial input breaks ncnn's Winograd, exactly as the
    runtime model predicts; the same layer with 31=64 is exact."""
    assert not wg.is_safe(codes)
    x = wg.adversarial_input(codes)
    assert np.abs(x).max() <= 127
    ref = reference(x, codes)
    files = model_files(tmp_path, codes, x.shape)
    for packing in (True, False):
        out = run_ncnn(files, x, packing)
        assert np.abs(out - ref).max() > EXACT, name
        np.testing.assert_array_equal(out, wg.runtime_result(ref))
    guarded = model_files(tmp_path, codes, x.shape, no_winograd=True, name='guarded')
    for packing in (True, False):
        assert np.abs(run_ncnn(guarded, x, packing) - ref).max() == EXACT, name


@pytest.mark.parametrize('name, codes, x_range', [
    ('random 8-bit, 9 channels', np.random.default_rng(6).integers(-127, 128, (32, 9, 3, 3)),
     (-127, 127)),
    ('random 8-bit, 16 channels', np.random.default_rng(7).integers(-127, 128, (32, 16, 3, 3)),
     (-127, 127)),
    ('all-127, 12 channels', np.full((8, 12, 3, 3), 127), (-127, 127)),
    ('trained-like 8-bit, 64 channels', laplace_codes(np.random.default_rng(8), 64, 64),
     (-127, 127)),
    ('trained-like 8-bit, 128 channels, post-ReLU input',
     laplace_codes(np.random.default_rng(9), 64, 128), (0, 127)),
    ('random 6-bit, 48 channels', np.random.default_rng(10).integers(-31, 32, (32, 48, 3, 3)),
     (-127, 127)),
    ('trained-like 6-bit, 256 channels', laplace_codes(np.random.default_rng(11), 32, 256, 31),
     (-127, 127)),
])
def test_safe_layers_are_exact_in_ncnn(tmp_path, name, codes, x_range):
    """(b) is_safe says yes -> exact with Winograd on, under the input that attains the
    bound and under random full-range inputs."""
    assert wg.is_safe(codes, x_range=x_range), name
    x = wg.adversarial_input(codes, x_range=x_range)
    ref = reference(x, codes)
    assert np.abs(ref).max() == wg.worst_case(codes, x_range=x_range)['y']
    rng = np.random.default_rng(12)
    noise = rng.integers(x_range[0], x_range[1] + 1, (codes.shape[1], 12, 12))
    files = model_files(tmp_path, codes, x.shape)
    noise_files = model_files(tmp_path, codes, noise.shape, name='noise')
    for packing in (True, False):
        assert np.abs(run_ncnn(files, x, packing) - ref).max() == EXACT, name
        out = run_ncnn(noise_files, noise, packing)
        assert np.abs(out - reference(noise, codes)).max() == EXACT, name


def test_contract_probe(tmp_path):
    """(c) 8-bit all-equal codes. The worst case (all inputs 127): the bound's threshold
    12 | 13 channels is where ncnn starts to fail (and 26, where 576 y wraps int32). The
    probe input of docs/ncnn-int8-contract.md §4.1 (the sign tile [-1,-1,1,1] x [-1,-1,1,1], which maximizes the
    transformed input |V| = 100 * 127, not y): ok at 48 channels, wrong at 64, as reported,
    because its y is smaller; the runtime model predicts every output in both cases."""
    sign = np.array([-1, -1, 1, 1])
    probe_tile = 127 * np.outer(np.tile(sign, 2), np.tile(sign, 2))
    results = {}
    for channels in (12, 13, 25, 26, 48, 64):
        codes = np.full((8, channels, 3, 3), 127)
        for name, x in (('worst', wg.adversarial_input(codes)),
                        ('probe', np.broadcast_to(probe_tile, (channels, 8, 8)))):
            ref = reference(x, codes)
            out = run_ncnn(model_files(tmp_path, codes, x.shape), x)
            np.testing.assert_array_equal(out, wg.runtime_result(ref))
            results[name, channels] = np.abs(out - ref).max() == EXACT
        assert wg.is_safe(codes) == (channels <= 12)
    assert results['worst', 12] and not results['worst', 13] and not results['worst', 26]
    assert results['probe', 48] and not results['probe', 64]


def test_runtime_model_on_random_layers(tmp_path):
    """ncnn's output = runtime_result(exact y) for any layer and input, F(4,3) and F(2,3)."""
    rng = np.random.default_rng(13)
    for channels, out_channels in ((24, 8), (40, 13), (96, 4)):
        codes = rng.integers(-127, 128, (out_channels, channels, 3, 3))
        x = rng.choice([-127, 127], (channels, 10, 9)) * rng.integers(0, 2, (channels, 10, 9))
        ref = reference(x, codes)
        files = model_files(tmp_path, codes, x.shape)
        np.testing.assert_array_equal(run_ncnn(files, x), wg.runtime_result(ref))
        f23 = run_ncnn(files, x, winograd43=False)  # runtime option: F(2,3), safe to 2^29
        assert wg.is_safe(codes, variant='F23')
        assert np.abs(f23 - ref).max() == EXACT


def test_grouped_convolutions_use_winograd_per_group(tmp_path):
    """A grouped conv decides Winograd per group, with per-group channel counts
    (``uses_winograd`` with ``groups``). With 2 groups of 32 channels in and out, Winograd
    runs and the per-group adversarial input breaks it exactly as ``runtime_result``
    predicts. With 8 groups of 8 it does not run, and the result is exact.

    Both shapes have a multiple of 8 outputs per group and a dequantized output, so the
    writer splits them: Slice -> one plain int8 Convolution per group -> Concat
    (docs/ncnn-int8-contract.md §2.2, §4.3). The test therefore no longer exercises
    ConvolutionDepthWise's own per-group Winograd. It checks that the per-group
    Convolutions of a split grouped conv get the Winograd choice and failure that
    ``uses_winograd`` and ``runtime_result`` predict for the grouped layer. It runs with
    packing off only, as it did when these shapes were written as ConvolutionDepthWise,
    which is wrong with packing on (§4.3)."""
    for groups, expect_exact in ((2, False), (8, True)):
        codes = np.full((64, 64 // groups, 3, 3), 127)
        assert (wg.uses_winograd(3, 1, 1, groups, 64, 64) is None) == expect_exact
        x = wg.adversarial_input(codes, groups=groups)
        ref = reference(x, codes, groups)
        files = model_files(tmp_path, codes, x.shape, groups=groups)
        out = run_ncnn(files, x, packing=False)
        assert (np.abs(out - ref).max() == EXACT) == expect_exact
        if not expect_exact:
            np.testing.assert_array_equal(out, wg.runtime_result(ref))
