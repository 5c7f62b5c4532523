"""Calibration: set every quantized block's input range from float activations.

The net runs in float (quantization disabled, inference mode, not hybridized) while forward
pre-hooks record each quantized block's input statistics; the modes and hybridization are
restored afterwards. Methods are listed in one registry, ``METHODS``.

Everything streams, and nothing is copied to the host per element: the hooks reduce each
input on its device to a per-batch range (one scalar), and for the histogram methods to a
fixed-size histogram (``bins`` int64 counters) and its maximum, accumulated on the device.

* Per-batch methods ('max', 'ema') read the data once.
* Histogram methods ('kl', 'aciq', 'percentile', 'mse') read it twice: pass 1 finds each
  layer's largest input magnitude, pass 2 fills a histogram over [0, that maximum] (the design
  and the threshold formulas are in ``qat.thresholds``). ``data`` must then be re-iterable
  (a list, a Gluon DataLoader) and give the same batches both times.
"""
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np
from mxnet import nd

from . import ops
from . import thresholds as th
from .convert import check_ranges, quant_blocks, walk

log = logging.getLogger(__name__)

LOG_EVERY = 100  # batches between progress messages (log.info)


def _ema(ranges, momentum):
    """Bias-corrected EMA of a sequence (the same estimate the in-graph tracker keeps)."""
    m_x = m_1 = 0.0
    for value in ranges:
        m_x = momentum * m_x + (1 - momentum) * value
        m_1 = momentum * m_1 + (1 - momentum)
    return m_x / m_1


@dataclass(frozen=True, eq=False)
class Method:
    """One calibration method.

    ``reduce(stats, config, **options) -> threshold``: ``stats`` is the list of per-batch
    ranges (max |x|, or max x for unsigned inputs) or, when ``histogram`` is true, the layer's
    ``qat.thresholds.Histogram``. ``options``: accepted keyword options and their defaults
    (``bins`` sizes the histogram; the others go to ``reduce``)."""
    description: str
    reduce: Callable
    histogram: bool = False
    options: Mapping = field(default_factory=lambda: MappingProxyType({}))

    def __call__(self, stats, config, **options):
        return self.reduce(stats, config, **options)


def _from_histogram(function):
    """A ``qat.thresholds`` method applied with the block's input bits and signedness."""
    def reduce(hist, config, **options):
        return function(hist, config.input_bits, config.input_signed, **options)
    reduce.__name__ = function.__name__
    return reduce


def _options(**defaults):
    return MappingProxyType(dict(bins=th.DEFAULT_BINS, **defaults))


# method name -> how it reduces the float activations to a threshold
METHODS = {
    'max': Method("largest per-batch max |x| (max x for unsigned inputs): no clipping",
                  lambda ranges, config: max(ranges)),
    'ema': Method("bias-corrected EMA (config.range_momentum) of the per-batch max |x|, "
                  "the estimate training keeps", lambda ranges, config: _ema(
                      ranges, config.range_momentum)),
    'kl': Method("ncnn2table's KL-divergence search on a histogram of |x| (2048 bins, "
                 "qmax+1 levels; two passes)", _from_histogram(th.kl), histogram=True,
                 options=_options()),
    'aciq': Method("ACIQ analytic clipping alpha[bits] * spread (Gaussian sigma from the range "
                   "as ncnn2table, or moments; Laplace b); two passes",
                   _from_histogram(th.aciq), histogram=True,
                   options=_options(distribution='gaussian', spread='range')),
    'percentile': Method("the given percentile of |x| read off the histogram; two passes",
                         _from_histogram(th.percentile), histogram=True,
                         options=_options(percentile=th.DEFAULT_PERCENTILE)),
    'mse': Method("threshold minimizing the expected squared error of the real rounding and "
                  "clipping over the histogram (grid search); two passes",
                  _from_histogram(th.mse), histogram=True, options=_options()),
}


# ----- running the float net with hooks -----------------------------------------------------
class _FloatMode:
    """Context: every block float (quantization off) and not hybridized; restored on exit."""

    def __init__(self, net, blocks):
        self.blocks = blocks
        self.modes = [block.mode for block in blocks]
        self.active = {block: block._active for block in [net] + [b for *_, b in walk(net)]
                       if hasattr(block, '_active')}

    def __enter__(self):
        for block in self.active:
            block._active = False
            block._clear_cached_op()
        for block in self.blocks:
            block.set_mode(quantize=False)
        return self

    def __exit__(self, *exc):
        for block, mode in zip(self.blocks, self.modes):
            block.set_mode(**mode)
        for block, was_active in self.active.items():
            block._active = was_active
            block._clear_cached_op()
        return False


def _run_pass(net, data, blocks, record, num_batches, log_every, label):
    """Feed the batches of ``data`` to ``net`` with ``record(block, inputs)`` as the forward
    pre-hook of every block; returns the number of batches."""
    handles = [block.register_forward_pre_hook(record) for block in blocks]
    count = 0
    try:
        for batch in data:
            if num_batches is not None and count >= num_batches:
                break
            net(batch[0] if isinstance(batch, (tuple, list)) else batch)
            count += 1
            if log_every and count % log_every == 0:
                log.info("%s: %d batches", label, count)
            else:
                log.debug("%s: batch %d", label, count)
    finally:
        for handle in handles:
            handle.detach()
    log.info("%s: done, %d batches", label, count)
    return count


def _device_histogram(x, limit, bins, signed):
    """On x's device: (counts (bins,) int64, max magnitude (1,)) of the magnitudes of ``x``,
    binned by the rule of ``thresholds.bin_index``: ``min(floor(float32(mag / limit) * bins),
    bins - 1)``, zeros not binned. (MXNet's histogram then only counts exact integers + 1/2.)"""
    top = ops.batch_threshold(nd, x, signed)
    if not limit > 0:
        return nd.zeros((bins,), ctx=x.context, dtype='int64'), top
    mag = nd.abs(x) if signed else nd.relu(x)
    index = nd.clip(nd.floor((mag / limit) * bins), 0, bins - 1) + 0.5
    index = nd.where(mag > 0, index, nd.zeros_like(index) - 1)  # zeros fall outside the range
    counts, _ = nd.histogram(index, bins=bins, range=(0, bins))
    return counts, top


def _collect(net, blocks, data, num_batches, log_every, method, bins=None):
    """Pass 1: per-batch ranges {block: [float]}. If ``bins``: pass 2 too, histograms
    {block: Histogram} over [0, max range]. Returns (ranges, histograms or None, batches)."""
    observed = {block: [] for block in blocks}

    def record_range(block, inputs):
        observed[block].append(ops.batch_threshold(nd, inputs[0], block.config.input_signed))

    passes = 2 if bins else 1
    with _FloatMode(net, blocks):
        count = _run_pass(net, data, blocks, record_range, num_batches, log_every,
                          f"calibration ({method}) pass 1/{passes}")
        if count == 0:
            raise ValueError("calibration data is empty")
        ranges = {block: [float(r.asscalar()) for r in values]
                  for block, values in observed.items()}
        if not bins:
            return ranges, None, count
        limits = {}
        for block, values in ranges.items():
            if values:
                limits[block] = max(values)
                if not np.isfinite(limits[block]):
                    raise ValueError(f"{block.name}: non-finite input during calibration")
        state = {}

        def record_histogram(block, inputs):
            if block not in limits:
                return
            x = inputs[0]
            stats = _device_histogram(x, limits[block], bins, block.config.input_signed)
            sizes = (x.size, x.size // max(x.shape[0], 1))
            if block in state:
                (counts, top), (total, sample) = state[block]
                stats = counts + stats[0], nd.maximum(top, stats[1])
                sizes = total + sizes[0], max(sample, sizes[1])
            state[block] = stats, sizes

        second = _run_pass(net, data, blocks, record_histogram, num_batches, log_every,
                           f"calibration ({method}) pass 2/2")
    if second != count:
        raise ValueError(f"calibration data gave {count} batches in the first pass and "
                         f"{second} in the second: method {method!r} needs the same batches "
                         f"twice")
    histograms = {}
    for block, ((counts, top), (total, sample)) in state.items():
        hist = th.Histogram(limits[block], bins, block.config.input_signed)
        hist.add_counts(counts.asnumpy(), total, max(float(top.asscalar()), 0.0), sample)
        if hist.absmax > hist.limit:
            log.warning("%s: the second calibration pass saw larger inputs (%g) than the "
                        "first (%g); they are counted in the last bin. Are the batches "
                        "shuffled or augmented?", block.name, hist.absmax, hist.limit)
        histograms[block] = hist
    return ranges, histograms, count


def collect_histograms(net, data, bins=th.DEFAULT_BINS, num_batches=None,
                       log_every=LOG_EVERY):
    """{block name: ``qat.thresholds.Histogram``} of the float inputs of every quantized
    block (two passes over the re-iterable ``data``); the net is left as it was."""
    blocks = _blocks(net)
    _check_reiterable(data, 'collect_histograms')
    th.Histogram(1.0, bins)  # validates bins before any pass
    _, histograms, _ = _collect(net, blocks, data, num_batches, log_every, 'histograms', bins)
    return {block.name: hist for block, hist in histograms.items()}


def _blocks(net):
    blocks = [block for _, block in quant_blocks(net)]
    if not blocks:
        raise ValueError(f"{net.name} has no quantized blocks: call convert_model first")
    return blocks


def _check_reiterable(data, what):
    if isinstance(data, Iterator):
        raise ValueError(f"{what} reads the data twice (a max pass, then a histogram pass) "
                         f"but got a one-shot iterator ({type(data).__name__}); pass a "
                         f"re-iterable such as a list of batches or a DataLoader")


def calibrate(net, data, method='ema', num_batches=None, log_every=LOG_EVERY, **options):
    """Set the input range of every quantized block of ``net`` from float activations.

    data: iterable of input batches (NDArray, or (data, label) tuples); re-iterable (e.g. a
    list or a DataLoader, not a generator) for the histogram methods.
    method: a key of METHODS. num_batches: stop after this many batches (in each pass).
    log_every: log.info progress every this many batches (0: never).
    options: the method's options (see ``METHODS[method].options``), e.g. ``bins=2048``,
    ``percentile=99.99``, ``distribution='laplace'``.
    Each block's bits and signedness come from its ``config``. Deterministic: the same data
    and settings give identical thresholds. Returns {block name: threshold}."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; valid: {sorted(METHODS)}")
    spec = METHODS[method]
    unknown = set(options) - set(spec.options)
    if unknown:
        raise ValueError(f"calibration method {method!r} has no option(s) {sorted(unknown)}; "
                         f"valid: {sorted(spec.options)}")
    settings = {**spec.options, **options}
    bins = settings.pop('bins', None)
    blocks = _blocks(net)
    if spec.histogram:
        _check_reiterable(data, f"calibration method {method!r}")
        for config in {block.config for block in blocks}:  # bad options fail before any pass
            spec(th.Histogram(1.0, bins, config.input_signed), config, **settings)
    ranges, histograms, count = _collect(net, blocks, data, num_batches, log_every, method,
                                         bins if spec.histogram else None)
    thresholds = {}
    for block in blocks:
        if not ranges[block]:
            log.warning("%s never ran during calibration: its range is left unchanged",
                        block.name)
            continue
        stats = histograms[block] if spec.histogram else ranges[block]
        threshold = float(spec(stats, block.config, **settings))
        log.debug("%s: max %g -> threshold %g (%s)", block.name, max(ranges[block]),
                  threshold, method)
        block.set_input_threshold(threshold)
        thresholds[block.name] = threshold
    check_ranges(net)
    log.info("calibrated %d layers on %d batches (%s)", len(thresholds), count, method)
    return thresholds
