"""The quantization formulas, each written once as a pure function.

Every function takes the array namespace ``F`` first (``mx.nd`` or ``mx.sym``), so the same
code runs imperatively and inside a hybridized graph. ``qat.reference`` is the numpy oracle of
the same math; tests hold the two against each other.

Conventions (ncnn's, see ``docs/ncnn-int8-contract.md`` §3.1, §3.3):
  * a range is a threshold ``T > 0``; the scale is the multiplier ``s = qmax / T``;
  * codes are ``q = saturate(round_half_away_from_zero(float32(x * s)))``;
  * signed codes lie in ``[-qmax, qmax]`` with ``qmax = 2^(bits-1) - 1`` (-128 is never used).
"""
import numpy as np

from . import native

# Ranges are clamped into [MIN_THRESHOLD, MAX_THRESHOLD] so that a zero, tiny, huge or NaN
# range still gives a finite, non-zero scale (and products of two scales stay finite).
MIN_THRESHOLD = 1e-12
MAX_THRESHOLD = 1e12


def qrange(bits, signed=True):
    """(lowest, highest) integer code for ``bits``: signed (-(2^(b-1)-1), 2^(b-1)-1), or
    unsigned (0, 2^b - 1)."""
    if signed:
        high = 2 ** (bits - 1) - 1
        return -high, high
    return 0, 2 ** bits - 1


def safe_threshold(F, threshold):
    """``threshold`` with NaN replaced by MIN_THRESHOLD and clamped into
    [MIN_THRESHOLD, MAX_THRESHOLD]; same shape."""
    not_nan = threshold == threshold
    threshold = F.where(not_nan, threshold, F.ones_like(threshold) * MIN_THRESHOLD)
    return F.clip(threshold, MIN_THRESHOLD, MAX_THRESHOLD)


def native_threshold_bounds():
    """MIN_THRESHOLD and MAX_THRESHOLD as the native operators' attributes: the float32 values
    MXNet's clip uses, written exactly."""
    return {name: repr(float(np.float32(value))) for name, value in
            (('min_threshold', MIN_THRESHOLD), ('max_threshold', MAX_THRESHOLD))}


def scale_from_threshold(F, threshold, bits, signed=True, learned=False):
    """Multiplier ``s = qmax / T`` (float32) for a range ``T`` of any shape; no gradient,
    unless the range is ``learned`` (LSQ)."""
    _, high = qrange(bits, signed)
    scale = high / safe_threshold(F, threshold)
    return scale if learned else F.BlockGrad(scale)


def lsq_gradient_factor(F, count, bits, signed=True):
    """How much the gradient of a learned threshold ``T`` is scaled (LSQ, Esser et al. 2020).

    LSQ learns the step ``d = T / qmax`` with its gradient scaled by ``1/sqrt(count * qmax)``
    (``count``: the values that one step quantizes, a (1,) float32 tensor). The parameter here
    is ``T = qmax * d`` (the range ncnn's ``qmax / T`` exports); its gradient is scaled by
    ``qmax^2 / sqrt(count * qmax)`` so that SGD moves it exactly as LSQ moves ``d``
    (``dL/dT = dL/dd / qmax`` and ``dT = qmax * dd``)."""
    _, high = qrange(bits, signed)
    return float(high) ** 2 * F.rsqrt(count * float(high))


def scaled_gradient(F, value, factor):
    """``value`` in the forward pass, exactly (``v + (v - v) * f`` adds an exact 0), with its
    gradient multiplied by ``factor`` (broadcast against it)."""
    frozen = F.BlockGrad(value)
    return frozen + F.broadcast_mul(value - frozen, factor)


def lsq_quantize(F, x, scale, bits, signed=True):
    """Integer codes of ``x`` for a learned ``scale`` (broadcast against ``x``, same rank):
    the codes of ``quantize`` (``round(clip(y)) == clip(round(y))`` for integer bounds), with
    LSQ's gradients: ``scale`` towards ``x`` and ``x`` towards ``scale`` where
    ``lo <= x * scale <= hi``, 0 where the value is clipped."""
    low, high = qrange(bits, signed)
    y = F.clip(F.elemwise_mul(x, F.broadcast_like(scale, x)), low, high)
    return y + F.BlockGrad(round_half_away(F, y) - y)


def round_half_away(F, v):
    """ncnn's float2int8 rounding (x86 SIMD form): ``trunc(v + copysign(0.5, v))`` in float32.
    Ties go away from zero (0.5 -> 1, 2.5 -> 3, -2.5 -> -3). No gradient."""
    return F.trunc(v + 0.5 * F.sign(v))


def quantize(F, x, scale, bits, signed=True):
    """Integer codes of ``x`` (as float32), exactly ncnn's rule, identity gradient.

    ``q = clip(round_half_away(x * scale), lo, hi)``; ``scale`` broadcasts against ``x``.
    ``scale`` must have the same number of dimensions as ``x``. The gradient is ``scale``
    everywhere (straight through, no clipping mask): used for weights, whose range is their
    own max, so nothing is clipped by more than rounding. The forward value is exactly the
    integer code: ``q + (y - y)`` adds an exact 0 (for finite y).
    """
    low, high = qrange(bits, signed)
    # Elementwise (not broadcast) ops, so MXNet can infer a deferred weight's shape backwards
    # from the convolution.
    y = F.elemwise_mul(x, F.broadcast_like(scale, x))
    codes = F.BlockGrad(F.clip(round_half_away(F, y), low, high))
    return codes + (y - F.BlockGrad(y))


def quantize_weight_per_channel(F, weight, factor, bits):
    """(codes, scales (O,)) of ``weight`` (O, ...) with one range per output channel, max|w[c]|
    times ``factor[c]``: ``quantize(weight, scale_from_threshold(weight_threshold(...) *
    factor))`` (one group), as one native operator when it could be compiled (else None)."""
    if not native.available():
        return None
    low, high = qrange(bits)
    scale = F.BlockGrad(F.qat_weight_scale(F.BlockGrad(weight), factor, high=high,
                                           **native_threshold_bounds()))
    return F.qat_quantize_weight(weight, scale, low=low, high=high), scale


def quantize_activation(F, x, scale, bits, signed=True, learned=False):
    """Integer codes of an activation ``x`` (any shape) for a scalar ``scale`` of shape (1,).

    The same codes as ``quantize``, but the gradient is ``scale`` inside [lo, hi] and 0 outside
    (a clipped input cannot move its code); with a ``learned`` scale (LSQ) also ``x`` towards
    the scale there. Runs as one fused operator (``qat.native``) when it could be compiled,
    else as the equivalent MXNet ops (which give the scale its gradient anyway).
    """
    low, high = qrange(bits, signed)
    if native.available():
        return F.qat_quantize_act(x, scale, low=low, high=high, scale_grad=int(learned))
    y = F.clip(F.broadcast_mul(x, scale), low, high)
    return y + F.BlockGrad(round_half_away(F, y) - y)


def dequantize(F, acc, multiplier, bias=None, ndim=4, name=None, fused=True):
    """ncnn's output of an int8 layer, per channel ``c`` (axis 1): ``acc`` (N, C, ...),
    ``multiplier``, ``bias`` (C,); ``ndim`` = acc's rank (2 or 4).

    fused=True (ncnn's Convolution / ConvolutionDepthWise): ``fma(acc, multiplier[c],
    bias[c])``, one rounding; a separate multiply and add would differ from ncnn in the last
    bit of ~1/4 of the values. Native operator, else computed in float64, then float32.
    fused=False (ncnn's InnerProduct): ``float32(acc * multiplier[c]) + bias[c]``.
    ``name`` names the resulting graph node."""
    shape = (1, -1, 1, 1) if ndim == 4 else (1, -1)
    if not fused:
        out = F.broadcast_mul(acc, F.reshape(multiplier, shape))
        if bias is None:
            return F.identity(out, name=name)
        return F.broadcast_add(out, F.reshape(bias, shape), name=name)
    if bias is None:
        bias = F.zeros_like(multiplier)
    if native.available():
        return F.qat_dequantize(acc, multiplier, bias, name=name)
    wide = F.broadcast_mul(F.Cast(acc, 'float64'), F.reshape(F.Cast(multiplier, 'float64'), shape))
    wide = F.broadcast_add(wide, F.reshape(F.Cast(bias, 'float64'), shape))
    return F.Cast(wide, 'float32', name=name)


def batch_threshold(F, x, signed=True):
    """Per-batch range of ``x``: max |x| (signed) or max x (unsigned), shape (1,), no gradient."""
    if signed and native.available():
        return F.BlockGrad(F.qat_absmax(x))
    reduced = F.max(F.abs(x)) if signed else F.max(x)
    return F.BlockGrad(F.reshape(reduced, (1,)))


def weight_threshold(F, weight, channels, groups, granularity):
    """Range of a weight (O, ...) expanded to one value per output channel, shape (O,).

    'channel': max |w| per output channel when ``groups == 1``, per group otherwise (ncnn
    keeps one scale per group in ConvolutionDepthWise); 'tensor': one max for all."""
    magnitude = F.abs(F.BlockGrad(weight))
    if granularity == 'tensor':
        return F.broadcast_to(F.reshape(F.max(magnitude), (1,)), (channels,))
    if groups == 1:
        return F.max(F.reshape(magnitude, (0, -1)), axis=1)
    per_group = F.max(F.reshape(magnitude, (groups, -1)), axis=1)
    return F.repeat(per_group, repeats=channels // groups)


def bn_factor(F, gamma, var, eps, fix_gamma=False):
    """Per-channel BN multiplier ``gamma / sqrt(var + eps)`` (gamma taken as 1 if fixed)."""
    inv_std = F.rsqrt(var + eps)
    return inv_std if fix_gamma else gamma * inv_std


def fold_bn(F, weight, bias, gamma, beta, mean, var, eps, fix_gamma=False):
    """Fold ``BN(conv(x, w) + b)`` (running statistics) into one conv, with the BN's own eps.

    ``w' = w * f`` per output channel, ``b' = beta + (b - mean) * f``, ``f = gamma/sqrt(var+eps)``.
    ``weight`` is (O, I/g, kh, kw); ``bias`` may be None. Returns (w', b')."""
    factor = bn_factor(F, gamma, var, eps, fix_gamma)
    factor_full = F.broadcast_like(F.reshape(factor, (-1, 1, 1, 1)), weight)
    folded_weight = F.elemwise_mul(weight, factor_full)  # elementwise: shape-inferable
    centered = -mean if bias is None else bias - mean
    return folded_weight, beta + centered * factor


def batchnorm_ncnn(F, x, gamma, beta, mean, var, eps, fix_gamma=False, name=None):
    """ncnn's stand-alone (fp32) BatchNorm, bit for bit (docs/ncnn-int8-contract.md §3.6):
    per channel ``c`` (axis 1 of ``x``, any rank >= 2), with the running statistics,

        s = sqrtf(var + eps)
        b = gamma / s,  a = beta - (gamma * mean) / s       (float32, gamma = 1 if fixed)
        y = fma(x, b[c], a[c])    (one rounding: ``dequantize``'s fused form)

    ``F.sqrt`` and the divisions are correctly rounded IEEE float32, as C's ``sqrtf`` and
    ``/``. MXNet's own BatchNorm op rounds differently in the last bit. Where ``s == 0``
    ncnn takes ``s = 0.0001f``, and its compiled code then multiplies by the folded
    reciprocal 10000 instead of dividing (measured), so here too. ``name`` names the
    result's graph node. Gradients reach ``x``, ``gamma`` and ``beta``."""
    if fix_gamma:
        gamma = F.ones_like(gamma)  # still an input of the graph (no unused-parameter notice)
    s = F.sqrt(var + eps)
    zero = s == 0
    s = F.where(zero, F.ones_like(s), s)

    def over_s(v):
        return F.where(zero, v * 10000.0, v / s)
    b = over_s(gamma)
    a = beta - over_s(gamma * mean)
    out = dequantize(F, F.reshape(x, (0, 0, -1, 1)), b, a, 4)
    return F.reshape_like(out, x, name=name)


def avgpool_ncnn(F, x, kernel, stride=(1, 1), pad=(0, 0), name=None):
    """ncnn's fp32 average pooling (x86, ``Pooling`` with ``avgpool_count_include_pad=1``,
    ``pad_mode`` valid), bit for bit, packing on and off (measured): per output element,

        sum = 0; for ki in 0..kh-1: for kj in 0..kw-1: sum += xpad[sy + ki, sx + kj]
        y = sum * float32(1 / (kh * kw))

    ``xpad`` is ``x`` (N, C, H, W) zero-padded by ``pad``; the padded zeros count in the
    area. The sum runs in float32 from 0, the window row by row (ncnn's ``space_ofs``), and
    is multiplied by the float32 reciprocal of the area: ncnn's generic kernel is compiled
    with the division folded into that multiply, its packed kernels write it so. MXNet's
    Pooling divides, and differs in the last bit. Shifted strided slices of ``xpad``, added
    in ncnn's order, give each output element the same additions. ``name`` names the
    result's graph node. Gradients reach ``x``."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    if ph or pw:
        x = F.pad(x, mode='constant', constant_value=0,
                  pad_width=(0, 0, 0, 0, ph, ph, pw, pw))
    total = None
    for ki in range(kh):
        for kj in range(kw):
            # rows ki, ki + sh, ... up to the last window's row: (Hp - kh) // sh + 1 of them
            tap = F.slice(x, begin=(None, None, ki, kj),
                          end=(None, None, ki - kh + 1 or None, kj - kw + 1 or None),
                          step=(1, 1, sh, sw))
            total = F.zeros_like(tap) + tap if total is None else total + tap
    inv_area = float(np.float32(1) / np.float32(kh * kw))
    return F.identity(total * inv_area, name=name)
