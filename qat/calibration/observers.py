"""Observers: the float inputs of every quantized block, reduced as they stream.

The net runs in float (quantization disabled, inference mode); the modes and hybridization
are restored afterwards (``qat.modes.temporary_mode``). It runs as one hybridized graph
(``_Taps``): the net's float symbol whose outputs are the inputs of every call of every
quantized block (the data input of the block's ``<prefix>fwd`` op), so one forward gives all
layers' inputs without per-block Python dispatch. A net the graph cannot stand for (not
traceable, parameters not initialized yet, a block whose op is not found) runs block by block
instead, imperatively with forward pre-hooks; both give the same values.

Per-batch ranges (max |x|, max x unsigned) are reduced inside the graph, one (n,) vector per
batch reaching the host. Histograms take two passes: pass 1 finds each layer's largest input
magnitude, pass 2 fills ``bins`` counters over [0, that maximum] (the design and the
threshold formulas are in ``thresholds``; the counting in ``kernels``, one read per layer
input, in threads while the graph computes the next batch), so ``data`` must then be
re-iterable and give the same batches both times. A method that reads only the maximum and
the sizes (ACIQ's Gaussian range rule) takes one pass (``summary``).

With ``engine='ncnn'`` the activations come from the exported fp32 ncnn model run by the
ncnn runtime instead (``engines.NcnnTaps``, the same interface); the reductions are the same.
"""
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import mxnet as mx
import numpy as np
from mxnet import nd

from . import engines, kernels
from . import thresholds as th
from .. import ops
from ..errors import UserError
from ..modes import temporary_mode
from ..nn import quant_blocks
from ..report import progress
from ..symbol import SymbolGraph, outputs_block, trace_symbol

log = logging.getLogger(__name__)

LOG_EVERY = 100  # batches between progress messages (log.info)
COUNTING_THREADS = 2  # histogram threads (the kernel releases the GIL); counts are exact


class _Pass:
    """The inputs of the batches of one pass over ``data`` (at most ``num_batches``), with a
    progress bar and log lines; ``count`` is the number of batches given."""

    def __init__(self, data, num_batches, log_every, label):
        self.data, self.num_batches, self.log_every, self.label = \
            data, num_batches, log_every, label
        self.count = 0

    def __iter__(self):
        total = len(self.data) if hasattr(self.data, '__len__') else None
        bar = progress(label=self.label, unit='batch',
                       total=min(filter(None, (total, self.num_batches)), default=None))
        try:
            for batch in self.data:
                if self.num_batches is not None and self.count >= self.num_batches:
                    break
                yield batch[0] if isinstance(batch, (tuple, list)) else batch
                self.count += 1
                bar.update(1)
                if self.log_every and self.count % self.log_every == 0:
                    log.info("%s: %d batches", self.label, self.count)
                else:
                    log.debug("%s: batch %d", self.label, self.count)
        finally:
            bar.close()
        log.info("%s: done, %d batches", self.label, self.count)


class _Taps:
    """The float graph of ``net`` with the input of every call of each of ``blocks`` as an
    output: ``calls`` lists (block, input symbol) in graph order, which is the order of the
    calls. ``usable`` is False (with ``reason``) when the net must run imperatively."""

    def __init__(self, net, blocks):
        self.net, self.calls, self.reason = net, [], None
        # (Gluon has no public test; a deferred parameter gets its shape from a first call)
        if any(param._data is None for param in net.collect_params().values()):
            self.reason = 'parameters not initialized yet'
            return
        try:
            with temporary_mode(net, quantize=False):
                graph = SymbolGraph(trace_symbol(net), net)
        except Exception as err:  # a net that cannot be traced still calibrates imperatively
            self.reason = f"not traceable ({type(err).__name__})"
            return
        for block in blocks:
            name = block.prefix + 'fwd'
            keys = [f"{name}#{k}" for k in range(len(graph.nodes))
                    if graph.has_op(f"{name}#{k}")]
            if not keys or graph.blocks_of(name) != [block]:
                self.reason = f"{block.name}'s op not found alone in the graph"
                self.calls = []
                return
            self.calls += [(block, graph.op_output(key).get_children()[0]) for key in keys]

    @property
    def usable(self):
        return self.reason is None

    def graph(self, outputs):
        """A hybridized block computing the symbols ``outputs`` from the net's input."""
        block = outputs_block(self.net, outputs)
        block.hybridize(static_alloc=True)
        return block

    def run_ranges(self, passing, observed):
        """Append every call's per-batch range to ``observed[block]``; one graph output (a
        vector over the calls) per batch, read when the pass is over."""
        graph = self.graph([mx.sym.concat(*[
            ops.batch_threshold(mx.sym, x, block.config.input_signed) for block, x in self.calls],
            dim=0)])
        vectors = [graph(x) for x in passing]
        for vector in vectors:
            for (block, _), value in zip(self.calls, vector.asnumpy().tolist()):
                observed[block].append(value)

    def run_sizes(self, passing, observed):
        """``run_ranges``, returning {block: [elements seen, largest elements per sample]}
        too (ACIQ's one-pass statistics). The graph's input shapes are inferred once per
        batch shape."""
        sizes = {block: [0, 0] for block, _ in self.calls}
        shapes = {}

        def measured(batches):
            for x in batches:
                if x.shape not in shapes:
                    _, out, _ = mx.sym.Group([s for _, s in self.calls]).infer_shape(
                        data=x.shape)
                    shapes[x.shape] = out
                for (block, _), shape in zip(self.calls, shapes[x.shape]):
                    size = int(np.prod(shape))
                    sizes[block][0] += size
                    sizes[block][1] = max(sizes[block][1], size // max(shape[0], 1))
                yield x

        self.run_ranges(measured(passing), observed)
        return sizes

    def run_histograms(self, passing, histograms):
        """Add every call's input to ``histograms[block]`` (blocks not in it are skipped)."""
        calls = [(block, x) for block, x in self.calls if block in histograms]
        if not calls:  # nothing to count; the pass still counts its batches
            for _ in passing:
                pass
            return
        graph = self.graph([x for _, x in calls])
        with ThreadPoolExecutor(COUNTING_THREADS) as pool:
            pending = None
            for x in passing:
                outputs = graph(x)  # queued: the engine computes it while the last one counts
                if pending is not None:
                    _count(pool, pending, histograms)
                pending = list(zip([block for block, _ in calls], outputs))
            if pending is not None:
                _count(pool, pending, histograms)


def _counts_of(value, hist):
    """(counts, largest magnitude) of one NDArray over ``hist``'s bins; in a pool thread (the
    copy to numpy, a layout reorder for MKLDNN arrays, releases the GIL too)."""
    return kernels.counts(value.asnumpy(), hist.limit, hist.bins, hist.signed)


def _count(pool, outputs, histograms):
    """Count one batch's (block, NDArray input) pairs into ``histograms``, in ``pool``; the
    counts are integers, so the order of the additions does not matter."""
    jobs = [(block, value, pool.submit(_counts_of, value, histograms[block]))
            for block, value in outputs]
    for block, value, job in jobs:
        counts, top = job.result()
        histograms[block].add_counts(counts, value.size, top,
                                     value.size // max(value.shape[0], 1))


def _imperative_pass(net, blocks, passing, record):
    """Feed the batches to ``net`` block by block with ``record(block, inputs)`` as the forward
    pre-hook of every block."""
    handles = [block.register_forward_pre_hook(record) for block in blocks]
    try:
        for x in passing:
            net(x)
    finally:
        for handle in handles:
            handle.detach()


def _imperative_histograms(net, blocks, passing, histograms):
    """The imperative pass 2: each block's input binned on its device, as ``kernels.counts``
    bins it; the counts reach the host once, at the end."""
    state = {}

    def record(block, inputs):
        if block not in histograms:
            return
        x, hist = inputs[0], histograms[block]
        stats = _device_histogram(x, hist.limit, hist.bins, hist.signed)
        sizes = (x.size, x.size // max(x.shape[0], 1))
        if block in state:
            (counts, top), (total, sample) = state[block]
            stats = counts + stats[0], nd.maximum(top, stats[1])
            sizes = total + sizes[0], max(sample, sizes[1])
        state[block] = stats, sizes

    _imperative_pass(net, blocks, passing, record)
    for block, ((counts, top), (total, sample)) in state.items():
        histograms[block].add_counts(counts.asnumpy(), total, max(float(top.asscalar()), 0.0),
                                     sample)


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


def collect(net, blocks, data, num_batches, log_every, method, bins=None, summary=False,
            engine='mxnet', threads=None):
    """Pass 1: per-batch ranges {block: [float]}. If ``bins``: pass 2 too, histograms
    {block: Histogram} over [0, max range]; with ``summary`` instead of pass 2, {block:
    ``thresholds.Summary``} (the maximum and the sizes, no counts). ``engine``: what computes
    the activations (``engines.ENGINES``: 'mxnet', or 'ncnn' with ``threads``). Returns
    (ranges, histograms or summaries or None, batches)."""
    observed = {block: [] for block in blocks}
    engines.check_engine(engine, threads)
    taps = _Taps(net, blocks) if engine == 'mxnet' else \
        engines.NcnnTaps(net, blocks, threads)
    if not taps.usable:
        log.info("calibration runs the net block by block: %s", taps.reason)
    passes = 2 if bins and not summary else 1
    sizes = {block: [0, 0] for block in blocks}
    with temporary_mode(net, imperative=not taps.usable, quantize=False):
        first = _Pass(data, num_batches, log_every, f"calibration ({method}) pass 1/{passes}")
        if taps.usable and summary:
            sizes.update(taps.run_sizes(first, observed))
        elif taps.usable:
            taps.run_ranges(first, observed)
        else:
            def record_range(block, inputs):
                x = inputs[0]
                observed[block].append(ops.batch_threshold(nd, x, block.config.input_signed))
                sizes[block][0] += x.size
                sizes[block][1] = max(sizes[block][1], x.size // max(x.shape[0], 1))

            _imperative_pass(net, blocks, first, record_range)
        count = first.count
        if count == 0:
            raise UserError("calibration data is empty")
        ranges = {block: [float(r.asscalar()) if isinstance(r, nd.NDArray) else r
                          for r in values] for block, values in observed.items()}
        if not bins:
            return ranges, None, count
        limits = {}
        for block, values in ranges.items():
            if values:
                limits[block] = max(values)
                if not np.isfinite(limits[block]):
                    raise UserError(f"{block.name}: non-finite input during calibration")
        if summary:
            return ranges, {block: th.Summary(max(limit, 0.0), *sizes[block],
                                              block.config.input_signed)
                            for block, limit in limits.items()}, count
        histograms = {block: th.Histogram(limit, bins, block.config.input_signed)
                      for block, limit in limits.items()}
        second = _Pass(data, num_batches, log_every, f"calibration ({method}) pass 2/2")
        if taps.usable:
            taps.run_histograms(second, histograms)
        else:
            _imperative_histograms(net, blocks, second, histograms)
    if second.count != count:
        raise UserError(f"calibration data gave {count} batches in the first pass and "
                         f"{second.count} in the second: method {method!r} needs the same "
                         f"batches twice")
    for block, hist in histograms.items():
        if hist.absmax > hist.limit:
            log.warning("%s: the second calibration pass saw larger inputs (%g) than the "
                        "first (%g); they are counted in the last bin. Are the batches "
                        "shuffled or augmented?", block.name, hist.absmax, hist.limit)
    return ranges, histograms, count


def collect_histograms(net, data, bins=th.DEFAULT_BINS, num_batches=None,
                       log_every=LOG_EVERY, engine='mxnet', threads=None):
    """{block name: ``thresholds.Histogram``} of the float inputs of every quantized
    block (two passes over the re-iterable ``data``; ``engine`` as in ``collect``); the net
    is left as it was."""
    blocks = quantized(net)
    engines.check_engine(engine, threads)
    check_reiterable(data, 'collect_histograms')
    th.Histogram(1.0, bins)  # validates bins before any pass
    _, histograms, _ = collect(net, blocks, data, num_batches, log_every, 'histograms', bins,
                               engine=engine, threads=threads)
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


