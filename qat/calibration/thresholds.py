"""Input-range (threshold) selection from a histogram: pure numpy, deterministic.

Conventions (ncnn's, see ``docs/ncnn-int8-contract.md`` §3.1 and ``qat.ops``): a range is a threshold
``T > 0``; the scale is ``s = qmax / T`` with ``qmax = 2^(bits-1) - 1`` for signed inputs
(codes in [-qmax, qmax]) and ``2^bits - 1`` for unsigned ones (codes in [0, qmax]); the
simulation quantizes ``x -> clip(round_half_away(x * s), lo, qmax) / s``.

Everything here works on *magnitudes*: ``|x|`` for signed inputs, ``max(x, 0)`` for unsigned
ones. Both quantizers are symmetric in that space (the error of ``x`` and ``-x`` is the same;
a negative input of an unsigned quantizer always becomes 0, whatever T), so one histogram of
magnitudes over [0, limit] carries everything a threshold depends on, and every method is one
function of (histogram, bits, signed).

Histogram design (two passes, fixed bins -- chosen over a single-pass histogram that doubles
its range by merging bin pairs):
  * pass 1 records the largest magnitude of each layer (``limit``); pass 2 fills ``bins`` equal
    bins over [0, limit]. This is exactly ncnn2table's histogram (2048 bins over [0, absmax],
    bin ``min(int(float32(|x| / absmax) * bins), bins - 1)``, exact zeros skipped), so the KL
    method reproduces ncnn2table's table, and the resolution is always ``limit / bins`` (a
    range-doubling histogram ends with between bins/2 and bins bins over the data, depending on
    where the maximum falls relative to a power of two);
  * memory is bounded (``bins`` int64 counters and three scalars per layer) and the counts
    are integers, so nothing depends on the batch order or size: the histogram of a
    concatenation equals the sum of the histograms of its parts, exactly, and so does every
    threshold (all of them, ACIQ's spread estimates included, are functions of the counts);
  * the cost is a second forward pass over the calibration data (which must be re-iterable).
Exact zeros (and, unsigned, values <= 0) are counted in ``zeros``, not in a bin: their
quantization error is 0 for every threshold (ncnn2table skips them the same way).

The threshold methods (``THRESHOLDS``): ``maximum`` (no clipping), ``kl`` (ncnn2table's
TensorRT-style KL search, generalized to 2..8 bits), ``aciq`` (Banner et al.'s analytic
clipping, Gaussian as ncnn2table or Laplace), ``percentile`` and ``mse`` (the threshold that
minimizes the expected squared error of the real rounding + clipping rule).
"""
import math

import numpy as np

from ..errors import UserError

DEFAULT_BINS = 2048        # ncnn2table's num_histogram_bins
KL_EPS = 1e-4              # ncnn2table's kl_eps, added to both distributions
DEFAULT_PERCENTILE = 99.99
MSE_CANDIDATES = 512       # coarse grid of the MSE search (then refined, see ``mse``)
MSE_REFINE = 64
KL_CHUNK = 1 << 16         # elements per temporary of the KL search (rows of candidates)

# ACIQ optimal clipping values alpha (in units of the Gaussian sigma / Laplace b) for M-bit
# quantization, from Banner, Nahshan, Soudry, "Post training 4-bit quantization of
# convolutional networks for rapid-deployment", NeurIPS 2019 (arXiv:1810.05723), as printed
# in the authors' code (github.com/submission2019/cnn-quantization,
# pytorch_quantizer/quantization/qtypes/int_quantizer.py) for M = 2..8 (ncnn2table's
# alpha_gaussian holds the same Gaussian values). Each is the minimizer of
#   Gaussian: (s^2 + a^2)(1 - erf(a / (s sqrt 2))) - sqrt(2/pi) a s exp(-a^2 / (2 s^2))
#             + a^2 / (3 * 4^M)
#   Laplace:  2 b^2 exp(-a / b) + a^2 / (3 * 4^M)
# (clipping noise of a two-sided distribution + rounding noise of 2^M levels over [-a, a]).
# M = 9 is the same minimizer, solved here to 8 digits (used for unsigned 8-bit inputs; ACIQ
# implementations' "positive" tables, e.g. alpha_gaus_positive[8] = 4.2 and
# alpha_laplace_positive[8] = 11.16, are this (M+1)-bit row). tests/test_thresholds.py
# re-derives every value from the formulas above.
ALPHA_GAUSSIAN = {2: 1.71063519, 3: 2.15159277, 4: 2.55913646, 5: 2.93620062,
                  6: 3.28691474, 7: 3.6151146, 8: 3.92403714, 9: 4.21632983}
ALPHA_LAPLACE = {2: 2.83068299, 3: 3.89722946, 4: 5.02864014, 5: 6.20476633,
                 6: 7.41312622, 7: 8.64561995, 8: 9.89675982, 9: 11.16268502}
# ACIQ's (and ncnn2table's) estimate of sigma from the range of N Gaussian samples:
# sigma = (max - min) * GAUSSIAN_CONST / sqrt(2 ln N), here with max - min = 2 * absmax.
GAUSSIAN_CONST = (0.5 * 0.35) * (1 + math.sqrt(math.pi * math.log(4)))


def qmax(bits, signed=True):
    """Largest code: 2^(bits-1) - 1 (signed) or 2^bits - 1 (unsigned)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise UserError(f"bits must be an integer in 2..8, got {bits!r}")
    return 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1


def magnitude(x, signed=True):
    """float32 magnitudes of ``x`` (flattened): |x| (signed) or max(x, 0) (unsigned)."""
    x = np.asarray(x, dtype=np.float32).ravel()
    return np.abs(x) if signed else np.maximum(x, np.float32(0))


def bin_index(mag, limit, bins):
    """ncnn2table's bin of each magnitude: ``min(floor(float32(mag / limit) * bins), bins-1)``
    computed in float32 (as ncnn does), and -1 for exact zeros (not binned).
    ``qat.calibrate`` computes the same on the device; the tests hold the two together."""
    mag = np.asarray(mag, dtype=np.float32)
    if not limit > 0:
        return np.full(mag.shape, -1, np.int64)
    scaled = (mag / np.float32(limit)) * np.float32(bins)
    index = np.minimum(np.floor(scaled), bins - 1).astype(np.int64)
    index[mag == 0] = -1
    return index


class Histogram:
    """Streaming histogram of input magnitudes of one layer over [0, limit] (see the module
    docstring for the design).

    Attributes: ``limit`` (float32 value, the upper edge), ``bins``, ``signed``, ``counts``
    (int64, ``bins``), ``total`` (all elements seen, zeros included), ``absmax`` (largest
    magnitude seen), ``sample_size`` (largest number of elements per sample seen: ACIQ's N).
    """

    def __init__(self, limit, bins=DEFAULT_BINS, signed=True):
        if not isinstance(bins, int) or isinstance(bins, bool) or bins < 16:
            raise UserError(f"bins must be an integer >= 16, got {bins!r}")
        limit = float(np.float32(limit))
        if not math.isfinite(limit):
            raise UserError(f"histogram limit must be finite, got {limit!r}")
        self.limit = max(limit, 0.0)
        self.bins = bins
        self.signed = bool(signed)
        self.counts = np.zeros(bins, np.int64)
        self.total = 0
        self.absmax = 0.0
        self.sample_size = 0

    # ----- filling -----------------------------------------------------------------------
    @classmethod
    def of(cls, x, bins=DEFAULT_BINS, signed=True, sample_size=None):
        """One-shot histogram of an array: limit = its largest magnitude."""
        mag = magnitude(x, signed)
        hist = cls(mag.max(initial=0.0), bins, signed)
        return hist.add(mag, sample_size=sample_size, _magnitudes=True)

    def add(self, x, sample_size=None, _magnitudes=False):
        """Add a batch of raw values (numpy; any shape). ``sample_size``: elements per sample
        (default: all of ``x``). Values above ``limit`` go to the last bin (as in ncnn2table).
        Returns self."""
        mag = np.asarray(x, np.float32).ravel() if _magnitudes else magnitude(x, self.signed)
        if not np.all(np.isfinite(mag)):
            raise UserError("cannot histogram non-finite values")
        index = bin_index(mag, self.limit, self.bins)
        counts = np.bincount(index[index >= 0], minlength=self.bins).astype(np.int64)
        return self.add_counts(counts, mag.size, float(mag.max(initial=0.0)),
                               mag.size if sample_size is None else sample_size)

    def add_counts(self, counts, total, absmax, sample_size):
        """Add counts binned elsewhere (``qat.calibrate`` bins on the device with the rule of
        ``bin_index``) and the matching statistics. Returns self."""
        counts = np.asarray(counts)
        if counts.shape != (self.bins,):
            raise UserError(f"expected {self.bins} counts, got shape {counts.shape}")
        self.counts = self.counts + counts.astype(np.int64)
        self.total += int(total)
        self.absmax = max(self.absmax, float(absmax))
        self.sample_size = max(self.sample_size, int(sample_size))
        return self

    def merge(self, other):
        """A new histogram holding both (same limit, bins and signedness)."""
        if (self.limit, self.bins, self.signed) != (other.limit, other.bins, other.signed):
            raise UserError("only histograms with the same limit, bins and signedness merge")
        merged = Histogram(self.limit, self.bins, self.signed)
        for hist in (self, other):
            merged.add_counts(hist.counts, hist.total, hist.absmax, hist.sample_size)
        return merged

    # ----- derived -----------------------------------------------------------------------
    @property
    def nonzero(self):
        """Number of binned (non-zero) magnitudes."""
        return int(self.counts.sum())

    @property
    def zeros(self):
        """Number of magnitudes that are exactly 0 (quantized without error)."""
        return self.total - self.nonzero

    @property
    def width(self):
        return self.limit / self.bins

    def moment(self, order):
        """Mean of ``magnitude ** order`` over the non-zero magnitudes, the values spread
        uniformly inside each bin: ``sum_j counts_j (b_j^(o+1) - a_j^(o+1)) / ((o+1) w)`` over
        the bins [a_j, b_j] of width w, divided by the count (exact zeros are left out)."""
        if self.nonzero == 0:
            return 0.0
        edges = self.edges
        power = order + 1
        per_bin = (edges[1:] ** power - edges[:-1] ** power) / (power * self.width)
        return float(per_bin @ self.counts) / self.nonzero

    @property
    def edges(self):
        """Bin edges, float64, bins + 1 values from 0 to limit."""
        return np.arange(self.bins + 1, dtype=np.float64) * self.width

    def __repr__(self):
        kind = '|x|' if self.signed else 'max(x, 0)'
        return (f"Histogram({kind}, {self.bins} bins over [0, {self.limit:.6g}], "
                f"{self.nonzero} binned + {self.zeros} zeros)")


class Summary:
    """What one pass knows of a layer's magnitudes without binning them: ``absmax`` (the
    largest), ``total`` (elements seen), ``sample_size`` (largest number of elements per
    sample) and ``signed``, as a ``Histogram`` holds them. ACIQ's Gaussian range rule reads
    nothing else, so it calibrates in one pass."""

    def __init__(self, absmax, total, sample_size, signed=True):
        self.absmax, self.total, self.sample_size = float(absmax), int(total), int(sample_size)
        self.signed = bool(signed)

    def __repr__(self):
        return (f"Summary({'|x|' if self.signed else 'max(x, 0)'} <= {self.absmax:.6g}, "
                f"{self.total} elements, {self.sample_size} per sample)")


def _check(hist, bits, signed):
    """The histogram's signedness (``signed`` None means "as the histogram"); validates bits."""
    if signed is not None and bool(signed) != hist.signed:
        raise UserError(f"histogram is of {'|x|' if hist.signed else 'max(x, 0)'} but a "
                         f"{'signed' if signed else 'unsigned'} threshold was asked for")
    qmax(bits, hist.signed)
    return hist.signed


# ----- the methods -------------------------------------------------------------------------
def maximum(hist, bits=8, signed=None):
    """No clipping: ``T = max |x|`` (``max x`` unsigned), whatever the bit width."""
    _check(hist, bits, signed)
    return float(hist.absmax)


def kl_divergences(hist, bits=8, signed=None, eps=KL_EPS):
    """ncnn2table's KL divergence for every candidate threshold bin; returns (t, kl) arrays.

    With ``h`` the histogram normalized to sum 1 over the non-zero magnitudes and
    ``L = qmax + 1`` quantization levels of a magnitude (128 for signed 8 bits, as ncnn; 2^bits
    unsigned; always a power of two), for each ``t`` in [L, bins):
      * P (t bins): ``P[j] = h[j] + eps``, with the tail ``sum(h[t:])`` folded into P[t-1];
      * Q (L levels): level ``i`` covers the fractional bins [i t/L, (i+1) t/L) and holds the
        mean density of ``h`` there (partial bins weighted by their overlap; the tail is *not*
        folded into Q, empty bins are *not* excluded -- both as ncnn2table);
      * E (t bins): Q expanded back, each bin receiving the density of the levels overlapping
        it times the overlap, plus eps;
      * ``KL(P || E) = sum P log(P / E)`` (P and E are not renormalized, as ncnn2table).
    Computed in float64 (ncnn2table uses float32: its chosen bin can differ only where two
    divergences agree to float32 precision)."""
    signed = _check(hist, bits, signed)
    levels = qmax(bits, signed) + 1
    bins = hist.bins
    if hist.nonzero == 0 or levels >= bins:
        return np.zeros(0, np.int64), np.zeros(0)
    h = hist.counts / float(hist.nonzero)
    cum = np.concatenate([[0.0], np.cumsum(h)])        # cum[k] = sum(h[:k])
    ts = np.arange(levels, bins)
    divergences = np.empty(len(ts))
    rows = max(1, KL_CHUNK // bins)
    for start in range(0, len(ts), rows):
        chunk = ts[start:start + rows]
        divergences[start:start + len(chunk)] = _kl_rows(h, cum, chunk, levels, eps)
    return ts, divergences


def _kl_rows(h, cum, ts, levels, eps):
    """The divergences of the candidates ``ts``, one row each, computed element by element as
    one candidate alone would be (the same float64 operations on the same values; columns past
    a row's ``t`` are padding, never summed) and summed over each row's own ``t`` values, so
    the result equals a loop over the candidates bit for bit."""
    bins = len(h)
    width = int(ts[-1])
    per_level = (ts / levels)[:, None]                  # exact: levels is a power of two
    bounds = np.arange(levels + 1) * per_level          # level boundaries, in bins
    whole = np.floor(bounds).astype(np.int64)
    # cumulative mass of the piecewise-uniform histogram at the level boundaries
    mass = cum[whole] + (bounds - whole) * h[np.minimum(whole, bins - 1)]
    density = np.diff(mass, axis=1) / per_level         # Q, per original bin
    k = np.arange(width + 1)
    owner = np.minimum(k * levels // ts[:, None], levels - 1)  # level holding position k
    rows = np.arange(len(ts))[:, None]
    with np.errstate(all='ignore'):                     # the padding may be anything
        expanded = np.diff(np.take(mass, owner + rows * (levels + 1)) + (k - owner * per_level)
                           * np.take(density, owner + rows * levels), axis=1) + eps
        clipped = np.repeat((h[:width] + eps)[None, :], len(ts), axis=0)
        clipped[rows[:, 0], ts - 1] += cum[bins] - cum[ts]
        terms = clipped * np.log(clipped / expanded)
    return [np.add.reduce(terms[row, :t]) for row, t in enumerate(ts)]  # = np.sum, leaner


def kl(hist, bits=8, signed=None, eps=KL_EPS):
    """ncnn2table's / TensorRT's entropy calibration, generalized to 2..8 bits and unsigned.

    The bin ``t`` of smallest ``kl_divergences`` (first one on ties) gives
    ``T = (t + 0.5) * limit / bins``, exactly ncnn2table's rule (2048 bins, 128 levels for
    signed 8 bits). Note the search starts at ``t = qmax + 1``: T is never below
    ``(qmax + 1.5) / bins`` of the largest magnitude (1/16 with ncnn's defaults). Returns the
    limit (no clipping) when there are fewer bins than levels, 0.0 for an all-zero histogram.
    """
    ts, divergences = kl_divergences(hist, bits, signed, eps)
    if hist.nonzero == 0:
        return 0.0
    if len(ts) == 0:
        return float(hist.limit)
    best = int(ts[int(np.argmin(divergences))])
    return float((best + 0.5) * hist.limit / hist.bins)


def aciq(hist, bits=8, signed=None, distribution='gaussian', spread='range'):
    """ACIQ analytic clipping (Banner et al. 2019): ``T = alpha * sigma`` (Gaussian) or
    ``T = alpha * b`` (Laplace), capped at the largest magnitude (as the authors' code does;
    ncnn2table does not cap -- the two agree whenever alpha * sigma <= max).

    alpha comes from ALPHA_GAUSSIAN / ALPHA_LAPLACE. The row is ``bits`` for a signed input
    (2^(bits-1) levels per side of zero, which is what ACIQ's two-sided M-bit alpha assumes
    for |x|) and ``bits + 1`` for an unsigned input (2^bits levels on one side, ACIQ's
    "positive" rule). ACIQ's noise model counts 2^M levels where ncnn's signed grid has
    2^M - 1, so at 2..3 bits ``mse`` is the better choice; this is the published rule.

    spread (Gaussian only): 'range' = ncnn2table's estimate from the range of N samples,
    ``sigma = 2 * max * GAUSSIAN_CONST / sqrt(2 ln N)``, N = elements per sample;
    'moments' = ``sqrt(mean of the squared non-zero magnitudes)``.
    Laplace: ``b = mean of the non-zero magnitudes`` (the maximum-likelihood b of a zero-mean
    Laplace). Both moments are read off the histogram (``Histogram.moment``; relative error
    of order (bin width / spread)^2). Exact zeros (e.g. ReLU outputs) are left out of them:
    they are quantized exactly and say nothing about the spread of the rest.
    """
    signed = _check(hist, bits, signed)
    if distribution not in ('gaussian', 'laplace'):
        raise UserError(f"distribution must be 'gaussian' or 'laplace', got {distribution!r}")
    if spread not in ('range', 'moments'):
        raise UserError(f"spread must be 'range' or 'moments', got {spread!r}")
    row = bits if signed else bits + 1
    if distribution == 'gaussian' and spread == 'range':  # no counts needed: a Summary will do
        n = max(hist.sample_size, 2)
        sigma = 2 * hist.absmax * GAUSSIAN_CONST / math.sqrt(2 * math.log(n))
        return float(min(ALPHA_GAUSSIAN[row] * sigma, hist.absmax))  # 0 when all are 0
    if hist.nonzero == 0:
        return 0.0
    if distribution == 'laplace':
        threshold = ALPHA_LAPLACE[row] * hist.moment(1)
    else:
        threshold = ALPHA_GAUSSIAN[row] * math.sqrt(hist.moment(2))
    return float(min(threshold, hist.absmax))


def percentile(hist, bits=8, signed=None, percentile=DEFAULT_PERCENTILE):
    """The ``percentile``-th percentile of the magnitudes (zeros included), read off the
    histogram with the values spread uniformly inside each bin: the smallest ``T`` with
    ``zeros + (mass of the bins below T) >= percentile / 100 * total``. Within one bin width of
    ``np.percentile`` of the raw magnitudes. Capped at the largest magnitude; when the
    percentile falls on the zeros (almost all inputs 0) the largest magnitude is returned."""
    _check(hist, bits, signed)
    if not 0 < percentile <= 100:
        raise UserError(f"percentile must be in (0, 100], got {percentile!r}")
    if hist.nonzero == 0:
        return 0.0
    rank = percentile / 100.0 * hist.total - hist.zeros
    if rank <= 0:
        return float(hist.absmax)
    cum = np.cumsum(hist.counts)
    j = int(np.searchsorted(cum, rank, side='left'))
    j = min(j, hist.bins - 1)
    below = cum[j - 1] if j > 0 else 0
    fraction = (rank - below) / hist.counts[j] if hist.counts[j] else 1.0
    return float(min((j + fraction) * hist.width, hist.absmax))


def _cumulative_sq_error(u, step, top):
    """``∫_0^u (x - Q(x))^2 dx`` for ``Q(x) = step * min(round(x / step), top)``, elementwise
    (broadcasting u against step).

    Below the saturation point ``c = (top + 1/2) step``: with ``w = u/step + 1/2``,
    ``k = floor(w)``, ``f = w - k``, the integral is
    ``step^3 (k/12 - 1/24 + ((f - 1/2)^3 + 1/8) / 3)`` (k - 1/2 whole periods of 1/12 each
    plus the partial one); above it the clipping error adds ``((u - T)^3 - (step/2)^3) / 3``
    with ``T = top * step``."""
    v = u / step
    w = np.minimum(v, top + 0.5) + 0.5
    k = np.floor(w)
    f = w - k
    rounding = k / 12 - 1 / 24 + ((f - 0.5) ** 3 + 0.125) / 3
    clipping = (np.maximum(v - top, 0.5) ** 3 - 0.125) / 3
    return step ** 3 * (rounding + clipping)


def expected_mse(hist, thresholds, bits=8, signed=None):
    """Mean squared quantization error per element (zeros included, they cost 0) of the
    histogram's data for each threshold, under the real rule ``clip(round_half_away(x s))/s``
    with ``s = qmax / T``, the values spread uniformly inside each bin:
    ``sum_j counts_j (E(b_j) - E(a_j)) / (b_j - a_j) / total`` with E the closed-form
    ``_cumulative_sq_error``. ``thresholds``: scalar or 1-D array (> 0). Returns an array."""
    signed = _check(hist, bits, signed)
    top = qmax(bits, signed)
    thresholds = np.atleast_1d(np.asarray(thresholds, np.float64))
    if hist.nonzero == 0:
        return np.zeros(len(thresholds))
    used = np.flatnonzero(hist.counts)
    low = used * hist.width
    high = (used + 1) * hist.width
    weight = hist.counts[used] / (hist.width * hist.total)
    errors = np.empty(len(thresholds))
    chunk = max(1, (1 << 21) // len(used))             # bound the temporaries (~16 MB)
    for start in range(0, len(thresholds), chunk):
        step = (thresholds[start:start + chunk] / top)[:, None]
        spans = (_cumulative_sq_error(high[None, :], step, top)
                 - _cumulative_sq_error(low[None, :], step, top))
        errors[start:start + chunk] = spans @ weight
    return errors


def mse(hist, bits=8, signed=None, candidates=MSE_CANDIDATES, refine=MSE_REFINE):
    """The threshold minimizing ``expected_mse`` by search: a grid of ``candidates`` values
    ``k * max / candidates`` (k = 1..candidates), then ``refine + 1`` values evenly over one
    grid step either side of the best; the first minimum wins (deterministic)."""
    signed = _check(hist, bits, signed)
    if hist.nonzero == 0:
        return 0.0
    top = float(hist.absmax)
    grid = np.arange(1, candidates + 1) / candidates * top
    best = grid[int(np.argmin(expected_mse(hist, grid, bits, signed)))]
    step = top / candidates
    fine = np.linspace(max(best - step, step / refine), min(best + step, top), refine + 1)
    return float(fine[int(np.argmin(expected_mse(hist, fine, bits, signed)))])


# name -> f(histogram, bits, signed, **options) -> threshold
THRESHOLDS = {
    'max': maximum,
    'kl': kl,
    'aciq': aciq,
    'percentile': percentile,
    'mse': mse,
}
