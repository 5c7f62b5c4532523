"""numpy oracle: the formulas of ``qat.ops`` and ncnn's integer arithmetic, independently.

Used by the tests and by ``verify`` as the judge. Everything is float32 where ncnn is float32
and int32 where ncnn accumulates in int32.
"""
import numpy as np

from .ops import MAX_THRESHOLD, MIN_THRESHOLD, qrange


def safe_threshold(threshold):
    t = np.asarray(threshold, dtype=np.float32)
    t = np.where(np.isnan(t), np.float32(MIN_THRESHOLD), t)
    return np.clip(t, np.float32(MIN_THRESHOLD), np.float32(MAX_THRESHOLD)).astype(np.float32)


def scale_from_threshold(threshold, bits, signed=True):
    return (np.float32(qrange(bits, signed)[1]) / safe_threshold(threshold)).astype(np.float32)


def float2int(v, bits=8, signed=True):
    """ncnn float2int8 generalized to ``bits``: trunc(v + copysign(0.5, v)) in float32, then
    saturate. Returns int32 codes."""
    v = np.asarray(v, dtype=np.float32)
    rounded = np.trunc(v + np.copysign(np.float32(0.5), v)).astype(np.float32)
    low, high = qrange(bits, signed)
    return np.clip(rounded, low, high).astype(np.int32)


def quantize(x, scale, bits=8, signed=True):
    """Codes of x: float2int(float32(x * scale))."""
    product = (np.asarray(x, np.float32) * np.asarray(scale, np.float32)).astype(np.float32)
    return float2int(product, bits, signed)


def weight_threshold(weight, groups=1, granularity='channel'):
    """Per-output-channel range (O,) as in ``ops.weight_threshold``."""
    w = np.abs(np.asarray(weight, np.float32))
    channels = w.shape[0]
    if granularity == 'tensor':
        return np.full(channels, w.max(), np.float32)
    if groups == 1:
        return w.reshape(channels, -1).max(axis=1)
    return np.repeat(w.reshape(groups, -1).max(axis=1), channels // groups)


def fold_bn(weight, bias, gamma, beta, mean, var, eps, fix_gamma=False):
    """Same as ``ops.fold_bn`` in float32."""
    f32 = lambda a: np.asarray(a, np.float32)
    inv_std = (np.float32(1) / np.sqrt(f32(var) + np.float32(eps))).astype(np.float32)
    factor = inv_std if fix_gamma else (f32(gamma) * inv_std).astype(np.float32)
    folded = (f32(weight) * factor.reshape(-1, *([1] * (np.ndim(weight) - 1)))).astype(np.float32)
    centered = -f32(mean) if bias is None else f32(bias) - f32(mean)
    return folded, (f32(beta) + centered * factor).astype(np.float32)


def batchnorm_ncnn(x, gamma, beta, mean, var, eps, fix_gamma=False, channel_axis=1):
    """ncnn's fp32 BatchNorm (``ops.batchnorm_ncnn``): ``s = sqrtf(var + eps)``,
    ``b = gamma / s``, ``a = beta - (gamma * mean) / s`` in float32 (gamma = 1 if fixed; where
    ``s == 0``, times 10000, ncnn's folded 1 / 0.0001f), ``y = fma(x, b[c], a[c])``."""
    f32 = lambda v: np.asarray(v, np.float32)
    var = f32(var)
    gamma = np.ones_like(var) if fix_gamma else f32(gamma)
    s = np.sqrt(var + np.float32(eps)).astype(np.float32)
    zero = s == 0
    s = np.where(zero, np.float32(1), s).astype(np.float32)

    def over_s(v):
        return np.where(zero, v * np.float32(10000), v / s).astype(np.float32)
    b = over_s(gamma)
    a = (f32(beta) - over_s((gamma * f32(mean)).astype(np.float32))).astype(np.float32)
    shape = [1] * np.ndim(x)
    shape[channel_axis] = -1
    return fma(x, b.reshape(shape), a.reshape(shape))


def conv2d_int(x_q, w_q, stride=(1, 1), pad=(0, 0), dilate=(1, 1), groups=1):
    """Integer convolution, NCHW x OIHW, zero padding, int64 accumulation checked to fit int32
    (as ncnn's int32 accumulator). Returns int32 (N, O, H', W')."""
    x = np.asarray(x_q, np.int64)
    w = np.asarray(w_q, np.int64)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilate
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    og = o // groups
    out = np.zeros((n, o, out_h, out_w), np.int64)
    for g in range(groups):
        xs = x[:, g * cg:(g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dh:i * dh + sh * out_h:sh, j * dw:j * dw + sw * out_w:sw]
                out[:, g * og:(g + 1) * og] += np.einsum('nchw,oc->nohw', patch,
                                                         w[g * og:(g + 1) * og, :, i, j])
    assert np.abs(out).max(initial=0) < 2 ** 31, "int32 accumulator overflow"
    return out.astype(np.int32)


def fma(a, b, c):
    """float32 fused multiply-add ``round(a * b + c)`` (one rounding). The product of two
    float32 is exact in extended precision, so only the sum is rounded before float32
    (a double rounding that differs from a true FMA with probability ~2^-40)."""
    wide = np.longdouble
    return (np.asarray(a, np.float32).astype(wide) * np.asarray(b, np.float32).astype(wide)
            + np.asarray(c, np.float32).astype(wide)).astype(np.float32)


def dequantize(acc, s_in, s_w, bias=None, channel_axis=1, fused=True):
    """ncnn's output of an int8 layer with ``m[p] = 1 / (s_in * s_w[p])``: Convolution
    (``fused``): ``fma(float32(acc), m[p], bias[p])``; InnerProduct: ``float32(acc * m[p]) +
    bias[p]`` (two roundings; measured against the x86 runtime)."""
    s_w = np.asarray(s_w, np.float32)
    multiplier = (np.float32(1) / (np.float32(s_in) * s_w).astype(np.float32)).astype(np.float32)
    shape = [1] * np.ndim(acc)
    shape[channel_axis] = -1
    bias = np.zeros_like(s_w) if bias is None else np.asarray(bias, np.float32)
    acc = np.asarray(acc, np.float32)
    if not fused:
        return ((acc * multiplier.reshape(shape)).astype(np.float32)
                + bias.reshape(shape)).astype(np.float32)
    return fma(acc, multiplier.reshape(shape), bias.reshape(shape))


def int8_conv2d(x, weight, bias, s_in, s_w, stride=(1, 1), pad=(0, 0), dilate=(1, 1),
                groups=1, bits=8):
    """What an int8 ncnn Convolution computes from a float input: quantize input and weights,
    integer convolution, float32 dequantize, fp32 bias. ``s_w`` is per output channel."""
    x_q = quantize(x, s_in, bits)
    w_q = quantize(weight, np.asarray(s_w, np.float32).reshape(-1, 1, 1, 1), bits)
    return dequantize(conv2d_int(x_q, w_q, stride, pad, dilate, groups), s_in, s_w, bias)


def int8_dense(x, weight, bias, s_in, s_w, bits=8):
    """ncnn int8 InnerProduct from a float input (flattened, c-major)."""
    x_q = quantize(np.asarray(x).reshape(len(x), -1), s_in, bits).astype(np.int64)
    w_q = quantize(weight, np.asarray(s_w, np.float32).reshape(-1, 1), bits).astype(np.int64)
    acc = x_q @ w_q.T
    assert np.abs(acc).max(initial=0) < 2 ** 31, "int32 accumulator overflow"
    return dequantize(acc.astype(np.int32), s_in, s_w, bias, fused=False)


def avgpool_ncnn(x, kernel, stride=(1, 1), pad=(0, 0), count_include_pad=True,
                 divide=False):
    """ncnn's fp32 average pooling of ``x`` (N, C, H, W), valid windows over the zero-padded
    input: a float32 sum from 0 over the window row by row, then times float32(1 / area)
    (``ops.avgpool_ncnn``; ncnn x86 with ``count_include_pad``, packing on and off). Area:
    kh * kw with ``count_include_pad``, else the window's elements inside the input.
    ``divide``: ``sum / area`` instead (ncnn's generic kernel without count_include_pad,
    i.e. packing off or an elempack-1 blob)."""
    x = np.asarray(x, np.float32)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out_h = (h + 2 * ph - kh) // sh + 1
    out_w = (w + 2 * pw - kw) // sw + 1
    total = np.zeros((n, c, out_h, out_w), np.float32)
    count = np.zeros((out_h, out_w), np.int64)
    rows, cols = np.arange(out_h) * sh, np.arange(out_w) * sw
    for ki in range(kh):
        for kj in range(kw):
            window = padded[:, :, ki:ki + sh * (out_h - 1) + 1:sh,
                            kj:kj + sw * (out_w - 1) + 1:sw]
            total = (total + window).astype(np.float32)
            inside_rows = (rows + ki >= ph) & (rows + ki < h + ph)
            inside_cols = (cols + kj >= pw) & (cols + kj < w + pw)
            count += inside_rows[:, None] & inside_cols[None, :]
    area = np.full((out_h, out_w), kh * kw) if count_include_pad else count
    area = area.astype(np.float32)
    if divide:
        return (total / area).astype(np.float32)
    return (total * (np.float32(1) / area).astype(np.float32)).astype(np.float32)
