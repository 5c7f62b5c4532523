"""When ncnn runs an int8 3x3 convolution with Winograd, and a proof that its result is exact.

Read from Tencent/ncnn (x86): ``src/layer/x86/convolution_x86.cpp`` (create_pipeline_int8_x86,
forward_int8_x86: the choice of kernel), ``src/layer/x86/convolution_3x3_winograd_int8.h``
(the arithmetic), ``src/layer/x86/convolutiondepthwise_x86.cpp`` (grouped convolutions run one
inner Convolution per group, which makes the same choice with the per-group channel counts).

The arithmetic of ncnn's int8 Winograd F(m, 3), per output channel o, input channel c and
(m+2)x(m+2) input tile d_c (zero padded)::

    U_oc = G g_oc G^T           int16 (kernel transform, done once at load time)
    V_c  = B^T d_c B            int16 (input transform)
    M_o  = sum_c U_oc * V_c     int32 (pmaddwd / vpdpwssd pairs, then 32-bit adds)
    Y_o  = A^T M_o A            int32 (output transform: adds and left shifts)
    F(4,3): out = trunc(float32(Y_o) * float32(1/576))   (SIMD paths; the 1-3 channels left
            over after the 16/8/4-channel blocks use the C division Y_o / 576)
    F(2,3): out = Y_o >> 2      (arithmetic shift)

The integer matrices are Lavin's scaled so that, in exact arithmetic, Y_o = SCALE * y_o with
y_o the direct convolution (SCALE = 576 = 24^2 for F(4,3): G = 24 G_Lavin except its last row,
which is 6 instead of 24 and is compensated by the 4 in A's last column; 4 = 2^2 for F(2,3)).
Every int32 step is a wrapping add, multiply or shift, so it is exact modulo 2^32: an overflow
of M_o or of the output-transform temporaries is harmless, and the result is right exactly
when the final value is. The int16 stages cannot overflow for codes in [-128, 127]
(|U| <= 144 * 128, |V| <= 100 * 128). Hence, with Y_max = max |y| over the inputs:

* F(2,3) is exact iff 4 * y fits int32: |y| <= 2^29 - 1.
* F(4,3) is exact for |y| <= 1 864 136 (float32(576 y) is exact while 9 y < 2^24, and
  float32(1/576) rounds up, so the truncation lands on y). Beyond, the |y| = 1 mod 4 in
  [1 864 137, 2 097 149] come out one closer to zero (float32 rounding before the truncation);
  from |y| >= 3 728 271 (> 2^31 / 576) Y_o wraps and the output is garbage.
  ``runtime_result`` models all of this; the tests check it bit for bit against the runtime.

Y_max = max_o max(sum w_o * (hi if w_o > 0 else lo), -sum w_o * (lo if w_o > 0 else hi))
for inputs in [lo, hi] (= 127 * sum |w_o| for [-127, 127]); it is attained by that sign
pattern in one 3x3 window, so the bound is exact, not just an upper bound.
"""
import numpy as np

F43, F23 = 'F43', 'F23'
INT16_MAX = 2 ** 15 - 1
INT32_MAX = 2 ** 31 - 1

# F(4,3): ncnn's integer kernel transform (ktm), input transform (itm) and output transform
# (A^T; the 4 in the last column is ncnn's "r5 * 4" / "tmp * 4" on the last row/column).
G43 = np.array([[6, 0, 0], [-4, -4, -4], [-4, 4, -4], [1, 2, 4], [1, -2, 4], [0, 0, 6]])
BT43 = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                 [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]])
AT43 = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                 [0, 1, -1, 8, -8, 4]])
# F(2,3)
G23 = np.array([[2, 0, 0], [1, 1, 1], [1, -1, 1], [0, 0, 2]])
BT23 = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, -1, 0, 1]])
AT23 = np.array([[1, 1, 1, 0], [0, 1, -1, 1]])

MATRICES = {F43: (G43, BT43, AT43), F23: (G23, BT23, AT23)}
SCALE = {F43: 576, F23: 4, None: 1}
# Largest |y| that every path computes exactly (see the module docstring; the F(4,3) value
# is checked by brute force against runtime_result in the tests).
SAFE_Y = {F43: 1864136, F23: 2 ** 29 - 1, None: INT32_MAX}


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def uses_winograd(kernel, stride, dilate, groups, num_input, num_output, winograd=True,
                  winograd43=True):
    """The int8 Winograd variant ncnn's x86 runtime picks for a convolution: 'F43', 'F23' or
    None (im2col GEMM / packed direct, exact in int32).

    convolution_x86.cpp: Winograd iff opt.use_winograd_convolution (per layer: ``31=64``
    clears it) and kernel 3x3, stride 1, dilation 1 and (num_input > 8 or num_output > 8);
    then F(4,3) if opt.use_winograd43_convolution (default) else F(2,3). The input size does
    not matter. A grouped layer (ConvolutionDepthWise) runs one Convolution per group, so the
    counts are per group; a depthwise one (num_input == groups == num_output) never uses it.
    ``winograd`` / ``winograd43`` are the runtime options."""
    if groups > 1:
        if num_input == groups == num_output:
            return None
        num_input, num_output = num_input // groups, num_output // groups
    if not winograd or _pair(kernel) != (3, 3) or _pair(stride) != (1, 1) \
            or _pair(dilate) != (1, 1) or not (num_input > 8 or num_output > 8):
        return None
    return F43 if winograd43 else F23


def _box_extremes(coef, lo, hi, axes):
    """(max, min) of sum(coef * x) over x in [lo, hi] elementwise, summed over ``axes``."""
    return (np.maximum(coef * lo, coef * hi).sum(axis=axes),
            np.minimum(coef * lo, coef * hi).sum(axis=axes))


def output_bounds(weight_codes, x_range=(-127, 127)):
    """(O,) int64: max |y_o| over inputs in [lo, hi], y_o = sum_{c,i,j} w[o,c,i,j] x[c,i,j]
    (one output of channel o). Exact: attained by x = hi where w > 0 and lo elsewhere (or the
    reverse) in one 3x3 window; zero padding does not matter as lo <= 0 <= hi."""
    w = np.asarray(weight_codes, np.int64)
    top, bottom = _box_extremes(w, x_range[0], x_range[1], tuple(range(1, w.ndim)))
    return np.maximum(top, -bottom)


def worst_case(weight_codes, groups=1, x_range=(-127, 127), variant=F43):
    """Exact maxima of |value| of each stage of ncnn's int8 convolution for these codes
    (O, I/groups, 3, 3) over all inputs with x in [lo, hi] (ncnn codes: [-127, 127]; after a
    ReLU [0, 127]). Every value is attained by some input (on an interior tile).

    'y':         max |y| = the true convolution output (``output_bounds``), channel 'channel'
    'output':    SCALE * y, the int32 before the final division; must fit int32
    'kernel_tm': max |U| = |G g G^T| (int16)                      [Winograd only]
    'input_tm':  max |V| = |B^T d B| over the box (int16)          [Winograd only]
    'gemm':      max |M| = max |sum_c U_oc * V_c| (int32 accumulator; it may exceed 2^31:
                 it wraps, harmlessly, since the rest is modular)  [Winograd only]
    'safe':      ``y <= SAFE_Y[variant]`` (and the int16 stages fit)
    groups does not change the math (each output sees only its group's codes)."""
    w = np.asarray(weight_codes, np.int64)
    lo, hi = x_range
    bounds = output_bounds(w, x_range)
    y = int(bounds.max())
    result = {'y': y, 'channel': int(bounds.argmax()), 'output': SCALE[variant] * y}
    if variant is not None:
        g, bt, _ = MATRICES[variant]
        coef = np.einsum('ai,bj->abij', bt, bt)  # V[a,b] = sum_ij coef[a,b,i,j] d[i,j]
        vmax, vmin = _box_extremes(coef, lo, hi, (2, 3))
        kernel_tm = gemm = 0
        for start in range(0, w.shape[0], 64):  # chunks of output channels: bounded memory
            u = np.einsum('ai,ocij,bj->ocab', g, w[start:start + 64], g)
            # each channel's V_c[a,b] independently reaches vmin or vmax: pick per sign of U
            mtop = np.maximum(u * vmax, u * vmin).sum(axis=1)
            mbottom = np.minimum(u * vmax, u * vmin).sum(axis=1)
            kernel_tm = max(kernel_tm, int(np.abs(u).max()))
            gemm = max(gemm, int(mtop.max()), int(-mbottom.min()))
        result.update(kernel_tm=kernel_tm, input_tm=int(max(vmax.max(), -vmin.min())),
                      gemm=gemm)
    result['safe'] = bool(y <= SAFE_Y[variant] and result.get('kernel_tm', 0) <= INT16_MAX
                          and result.get('input_tm', 0) <= INT16_MAX)
    return result


def is_safe(weight_codes, groups=1, x_range=(-127, 127), variant=F43):
    """True iff ncnn's ``variant`` path ('F43', 'F23', or None = plain int32 GEMM) computes
    every output of this layer exactly for all inputs in x_range: max |y| <= SAFE_Y[variant].
    The int16 stages need no check: |U| <= 144 |w| and |V| <= 100 |x| fit for 8-bit codes."""
    w = np.asarray(weight_codes)
    if w.size == 0:
        return True
    assert np.abs(w).max() <= 128 and max(abs(x_range[0]), abs(x_range[1])) <= 128
    return bool(output_bounds(w, x_range).max() <= SAFE_Y[variant])


def wrap_int32(value):
    """Two's-complement int32 wrap of integers (int64 arithmetic)."""
    value = np.asarray(value, np.int64)
    return (value + 2 ** 31) % 2 ** 32 - 2 ** 31


def runtime_result(y, variant=F43):
    """What ncnn outputs (the int32 before dequantization) where the exact convolution is y:
    F43 (SIMD output transform): trunc(float32(wrap(576 y)) * float32(1/576));
    F23: wrap(4 y) >> 2; None (GEMM): wrap(y)."""
    v = wrap_int32(np.asarray(y, np.int64) * SCALE[variant])
    if variant == F43:
        return np.trunc(v.astype(np.float32) * np.float32(1.0 / 576)).astype(np.int64)
    if variant == F23:
        return v >> 2
    return v


def adversarial_input(weight_codes, groups=1, x_range=(-127, 127), variant=F43,
                      shape=(8, 8)):
    """An input (C, H, W), int64 in x_range, for the output channel with the largest bound:
    its 3x3 window around (H // 2, W // 2) gets the sign pattern that attains max |y|.

    If that extreme y is computed exactly by ncnn (``runtime_result``) but the layer is not
    safe, the window is scaled down (all taps to m instead of the range end) and one tap
    moved by t, largest |y| first, until ncnn's result is wrong: an unsafe layer gets an
    input that really breaks it whenever one such y is reachable this way."""
    w = np.asarray(weight_codes, np.int64)
    lo, hi = x_range
    o = int(output_bounds(w, x_range).argmax())
    k = w[o].ravel()
    window = np.where(k > 0, hi, lo)
    if -(k * np.where(k > 0, lo, hi)).sum() > (k * window).sum():
        window = np.where(k > 0, lo, hi)
    best = window
    reach = max(abs(lo), abs(hi))
    if output_bounds(w, x_range)[o] > SAFE_Y[variant]:
        for m in range(reach, 0, -1):
            base = np.trunc(window * m / reach).astype(np.int64)
            y0 = int((k * base).sum())
            sign = 1 if y0 >= 0 else -1
            # moving tap i by -sign*sign(k_i)*t (staying in range) lowers |y| by |k_i| * t
            room = np.where(sign * k > 0, base - lo, hi - base)
            # taps with the same (|k|, room) give the same values: try one of each
            _, taps = np.unique(np.abs(k) * (2 * reach + 1) + room, return_index=True)
            t = np.arange(int(room.max()) + 1)
            ys = sign * (abs(y0) - np.abs(k[taps])[:, None] * t[None, :])
            bad = (runtime_result(ys, variant) != ys) & (t[None, :] <= room[taps, None])
            if bad.any():
                row, step = np.argwhere(bad)[np.argmax(np.abs(ys)[bad])]
                tap = taps[row]
                best = base.copy()
                best[tap] -= sign * np.sign(k[tap]) * step
                break
    out_per_group = w.shape[0] // groups
    first = (o // out_per_group) * w.shape[1]
    x = np.zeros((w.shape[1] * groups,) + tuple(shape), np.int64)
    r, c = shape[0] // 2, shape[1] // 2
    x[first:first + w.shape[1], r - 1:r + 2, c - 1:c + 2] = best.reshape(w.shape[1:])
    return x
