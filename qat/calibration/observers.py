"""Observers: the float inputs of every quantized block, reduced on the device.

The net runs in float (quantization disabled, inference mode, block by block) while forward
pre-hooks record each quantized block's input statistics; the modes and hybridization are
restored afterwards (``qat.modes.temporary_mode``).

Nothing is copied to the host per element: the hooks reduce each input on its device to a
per-batch range (one scalar), and for the histogram methods to a fixed-size histogram
(``bins`` int64 counters) and its maximum, accumulated on the device. Histograms take two
passes: pass 1 finds each layer's largest input magnitude, pass 2 fills a histogram over
[0, that maximum] (the design and the threshold formulas are in ``thresholds``), so ``data``
must then be re-iterable and give the same batches both times.
"""
import logging
from collections.abc import Iterator

import numpy as np
from mxnet import nd

from . import thresholds as th
from .. import ops
from ..errors import UserError
from ..modes import temporary_mode
from ..nn import quant_blocks
from ..report import progress

log = logging.getLogger(__name__)

LOG_EVERY = 100  # batches between progress messages (log.info)


def _run_pass(net, data, blocks, record, num_batches, log_every, label):
    """Feed the batches of ``data`` to ``net`` with ``record(block, inputs)`` as the forward
    pre-hook of every block; returns the number of batches."""
    handles = [block.register_forward_pre_hook(record) for block in blocks]
    count = 0
    total = len(data) if hasattr(data, '__len__') else None
    bar = progress(label=label, total=min(filter(None, (total, num_batches)), default=None),
                   unit='batch')
    try:
        for batch in data:
            if num_batches is not None and count >= num_batches:
                break
            net(batch[0] if isinstance(batch, (tuple, list)) else batch)
            count += 1
            bar.update(1)
            if log_every and count % log_every == 0:
                log.info("%s: %d batches", label, count)
            else:
                log.debug("%s: batch %d", label, count)
    finally:
        bar.close()
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


def collect(net, blocks, data, num_batches, log_every, method, bins=None):
    """Pass 1: per-batch ranges {block: [float]}. If ``bins``: pass 2 too, histograms
    {block: Histogram} over [0, max range]. Returns (ranges, histograms or None, batches)."""
    observed = {block: [] for block in blocks}

    def record_range(block, inputs):
        observed[block].append(ops.batch_threshold(nd, inputs[0], block.config.input_signed))

    passes = 2 if bins else 1
    with temporary_mode(net, imperative=True, quantize=False):
        count = _run_pass(net, data, blocks, record_range, num_batches, log_every,
                          f"calibration ({method}) pass 1/{passes}")
        if count == 0:
            raise UserError("calibration data is empty")
        ranges = {block: [float(r.asscalar()) for r in values]
                  for block, values in observed.items()}
        if not bins:
            return ranges, None, count
        limits = {}
        for block, values in ranges.items():
            if values:
                limits[block] = max(values)
                if not np.isfinite(limits[block]):
                    raise UserError(f"{block.name}: non-finite input during calibration")
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
        raise UserError(f"calibration data gave {count} batches in the first pass and "
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
    """{block name: ``thresholds.Histogram``} of the float inputs of every quantized
    block (two passes over the re-iterable ``data``); the net is left as it was."""
    blocks = quantized(net)
    check_reiterable(data, 'collect_histograms')
    th.Histogram(1.0, bins)  # validates bins before any pass
    _, histograms, _ = collect(net, blocks, data, num_batches, log_every, 'histograms', bins)
    return {block.name: hist for block, hist in histograms.items()}


def quantized(net):
    blocks = [block for _, block in quant_blocks(net)]
    if not blocks:
        raise UserError(f"{net.name} has no quantized blocks: call convert_model first")
    return blocks


def check_reiterable(data, what):
    if isinstance(data, Iterator):
        raise UserError(f"{what} reads the data twice (a max pass, then a histogram pass) "
                         f"but got a one-shot iterator ({type(data).__name__}); pass a "
                         f"re-iterable such as a list of batches or a DataLoader")


