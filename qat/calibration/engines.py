"""Calibration engines: what computes the float activations the statistics are taken from.

``'mxnet'`` (the default): the converted net itself in float, as one hybridized graph
(``observers._Taps``). ``'ncnn'``: the exported fp32 ncnn model of the converted net, run by
the real ncnn runtime (``NcnnTaps``): the very activations the int8 model's layers read, and
on a CPU ncnn's fp32 runtime is faster than MXNet's.

The ncnn model is the exporter's own (``qat.deploy.graph.trace`` of the net in float mode,
rendered by ``qat.deploy.ncnn.render`` as ``export`` writes the fp32 ``.param`` / ``.bin``;
BN folded, activations fused). Each quantized block's call is the exporter's Convolution /
InnerProduct layer traced at that call's op node (``Layer.origin``; the block found through
``qat.deploy.graph.block_index``, as verify finds it), and its input blob is that layer's
input (``Layer.inputs[0]``, the blob name the manifest and the table give that layer's input
too). ncnn's batch is 1: every image runs in its own extractor, and a batch's per-batch range
of a layer is the largest of its images' ranges (a maximum: exact), so 'ema' sees the same
sequence of per-batch values as with MXNet; histogram counts and sizes are sums over the
images (integers: exact). ncnn's blobs are (C, H, W) (an InnerProduct's input may be the
flat (C,)): the statistics read only the values and their number, which is checked against
MXNet's shape of the same input.

The activations differ from MXNet's by float rounding (ncnn's own convolution kernels,
Winograd, its fused BN): the ranges typically by ~1e-6 relative, and a histogram method's
threshold may move to a neighbouring bin (``tests/test_calibration_engine.py`` holds the
tolerances).
"""
import logging
import os
import sys
import tempfile

import numpy as np
from mxnet import nd

from . import kernels
from ..deploy import ncnn as ncnn_files
from ..deploy.graph import block_index, trace
from ..deploy.verify import EXACT_OPTIONS
from ..errors import UserError

log = logging.getLogger(__name__)

ENGINES = {
    'mxnet': "the converted net in float, one hybridized MXNet graph (block by block when it "
             "cannot be traced)",
    'ncnn': "the exported fp32 ncnn model of the converted net, run by the ncnn runtime "
            "(one image per extractor)",
}
NCNN_ENGINE_FALLBACK = "calibrate with engine 'mxnet' (qat calibrate --engine mxnet)"


def check_engine(engine, threads=None):
    """The engine name, validated (an unknown one lists the valid ones); ``threads`` (ncnn
    threads) must be None or a positive integer."""
    if engine not in ENGINES:
        raise UserError(f"unknown calibration engine {engine!r}; valid: "
                        f"{', '.join(sorted(ENGINES))}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                or threads < 1):
        raise UserError(f"calibration threads must be a positive integer, got {threads!r}")
    return engine


# ncnn's wheel bundles its own libgomp (MXNet links the system's), which reads the wait policy
# when it is loaded: the first ``import ncnn`` of the process. Its default, spinning at every
# barrier, makes a 2-thread ncnn run 2-25x slower when another process takes a core (measured:
# resnet18_v1 at 224, 2 threads, one core busy: 2-25 img/s spinning, 51 passive, 55 on one
# thread); passive waiting costs little on an idle machine.
NCNN_WAIT_POLICY = 'PASSIVE'


def import_ncnn():
    """The ``ncnn`` module; when this imports it first, its OpenMP threads wait passively
    (``OMP_WAIT_POLICY``, unless the environment sets it: then the user's choice holds).
    The environment is left as it was (MXNet's OpenMP, already loaded, is not affected)."""
    if 'ncnn' in sys.modules or 'OMP_WAIT_POLICY' in os.environ:
        import ncnn
        return ncnn
    os.environ['OMP_WAIT_POLICY'] = NCNN_WAIT_POLICY
    try:
        import ncnn
    finally:
        del os.environ['OMP_WAIT_POLICY']
    return ncnn


def _ncnn_options():
    """ncnn options of the calibration model: verify's exact-comparison options (fp16
    storage and arithmetic off: fp32 activations), packing layout on (the runtime's fast
    path; it does not change fp32 values beyond rounding)."""
    return dict(EXACT_OPTIONS, use_packing_layout=True)


class NcnnTaps:
    """The inputs of every call of each of ``blocks`` from the fp32 ncnn model of ``net``,
    built at the first batch (whose sample shape the model is traced for), inside
    ``observers.collect``'s float mode. Same interface as ``observers._Taps``: ``usable``,
    ``run_ranges``, ``run_histograms`` and ``run_sizes``.

    calls: [(block, occurrence, blob)], each block's calls in graph order (the order of the
    per-batch values in ``observers.collect``), blocks in ``blocks`` order."""

    usable, reason = True, None

    def __init__(self, net, blocks, threads=None):
        self.net, self.blocks, self.threads = net, list(blocks), threads
        self.model = self.calls = self.shape = None
        self.blobs = []  # the blobs to extract, in the order of their producers
        self.sizes = {}  # blob -> elements per sample (MXNet's shape of that input)
        self.checked = False

    # ----- the model ---------------------------------------------------------------------
    def _build(self, shape):
        ncnn = import_ncnn()
        try:
            graph = trace(self.net, tuple(int(d) for d in shape)).float_graph()
            param, weights = ncnn_files.render(graph, int8=False)
        except UserError as err:  # ExportError: an op, a layer the exporter cannot write
            raise UserError(f"calibration engine 'ncnn' needs the fp32 ncnn model, but the "
                            f"net cannot be exported to ncnn: {' '.join(str(err).split())}; "
                            f"{NCNN_ENGINE_FALLBACK}") from None
        index = block_index(self.net)
        position = {layer.name: k for k, layer in enumerate(graph.layers)}
        by_name = {layer.name: layer for layer in graph.layers}
        calls = []
        for layer in graph.layers:
            name, _, occurrence = layer.origin.partition('#')
            block, role = index.get(name, (None, None))
            if role == 'layer' and layer.kind in ('Convolution', 'InnerProduct'):
                calls.append((block, int(occurrence or 0), layer.inputs[0]))
        order = {id(block): k for k, block in enumerate(self.blocks)}
        missing = [block.name for block in self.blocks
                   if not any(b is block for b, _, _ in calls)]
        if missing:
            raise UserError(f"calibration engine 'ncnn': no layer of the ncnn model computes "
                            f"{', '.join(missing)}; {NCNN_ENGINE_FALLBACK}")
        self.calls = sorted((call for call in calls if id(call[0]) in order),
                            key=lambda call: (order[id(call[0])], call[1]))
        self.blobs = sorted({blob for _, _, blob in self.calls}, key=position.get)
        self.sizes = {blob: int(np.prod(by_name[blob].shape if by_name[blob].kind != 'Input'
                                        else by_name[blob].params['shape']))
                      for blob in self.blobs}
        net = ncnn.Net()
        for key, value in _ncnn_options().items():
            setattr(net.opt, key, value)
        if self.threads:
            net.opt.num_threads = self.threads
        with tempfile.TemporaryDirectory(prefix='qat-calibration-') as folder:
            paths = os.path.join(folder, 'model.param'), os.path.join(folder, 'model.bin')
            with open(paths[0], 'w') as handle:
                handle.write(param)
            with open(paths[1], 'wb') as handle:
                handle.write(weights)
            if net.load_param(paths[0]) != 0 or net.load_model(paths[1]) != 0:
                raise RuntimeError("ncnn could not load the calibration model")
        self.model, self.shape, self._ncnn = net, tuple(shape), ncnn
        log.info("calibration runs the fp32 ncnn model (%d layers, %d blobs read, %s "
                 "threads)", len(graph.layers), len(self.blobs), self.threads or 'default')

    def _batches(self, passing):
        """Per batch of ``passing``: an iterator over its images, each {blob: (mat,
        array)} (the ncnn Mat kept alive with the array viewing it), computed one by one."""
        for x in passing:
            samples = x.asnumpy() if isinstance(x, nd.NDArray) else np.asarray(x)
            if samples.ndim != 4:
                raise UserError(f"calibration engine 'ncnn' takes (N, C, H, W) image batches, "
                                f"got shape {samples.shape}; {NCNN_ENGINE_FALLBACK}")
            if self.model is None:
                self._build(samples.shape[1:])
            elif samples.shape[1:] != self.shape:
                raise UserError(f"calibration engine 'ncnn': a batch of samples "
                                f"{samples.shape[1:]} after samples {self.shape} (one ncnn "
                                f"model, one input shape); {NCNN_ENGINE_FALLBACK}")
            yield (self._run(sample) for sample in samples)

    def _run(self, sample):
        mat = self._ncnn.Mat(np.ascontiguousarray(sample, np.float32)).clone()
        extractor = self.model.create_extractor()
        extractor.input('data', mat)
        values = {}
        for blob in self.blobs:  # producers in order: lightmode frees only what was read
            status, out = extractor.extract(blob)
            if status != 0:
                raise RuntimeError(f"ncnn could not compute blob {blob!r} (status {status})")
            values[blob] = out, np.asarray(out, dtype=np.float32)
        if not self.checked:
            wrong = [f"{blob} ({values[blob][1].size} elements, MXNet {self.sizes[blob]})"
                     for blob in self.blobs if values[blob][1].size != self.sizes[blob]]
            if wrong:
                raise UserError(f"calibration engine 'ncnn': ncnn's blobs differ from the "
                                f"net's layer inputs: {', '.join(wrong)}; "
                                f"{NCNN_ENGINE_FALLBACK}")
            self.checked = True
        return values

    # ----- the statistics (observers' interface) ------------------------------------------
    def run_sizes(self, passing, observed):
        """``run_ranges``, returning {block: [elements seen, largest elements per sample]}
        too (ACIQ's one-pass statistics)."""
        sizes = {block: [0, 0] for block in self.blocks}
        self.run_ranges(passing, observed, sizes)
        return sizes

    def run_ranges(self, passing, observed, sizes=None):
        """Append every call's per-batch range (max |x|, or max x unsigned, over the batch's
        images) to ``observed[block]``."""
        for images in self._batches(passing):
            top = {}
            for values in images:
                seen = {}
                for block, _, blob in self.calls:
                    array, signed = values[blob][1], block.config.input_signed
                    if (blob, signed) not in seen:  # (a blob read by several layers)
                        seen[blob, signed] = float(np.abs(array).max() if signed
                                                   else array.max())
                    key = (id(block), blob)
                    top[key] = max(top.get(key, -np.inf), seen[blob, signed])
                    if sizes is not None:
                        sizes[block][0] += array.size
                        sizes[block][1] = max(sizes[block][1], array.size)
            for block, _, blob in self.calls:
                observed[block].append(top[(id(block), blob)])

    def run_histograms(self, passing, histograms):
        """Add every call's input to ``histograms[block]`` (blocks not in it are skipped)."""
        for images in self._batches(passing):
            for values in images:
                for block, _, blob in self.calls:
                    if block not in histograms:
                        continue
                    hist, array = histograms[block], values[blob][1]
                    counts, top = kernels.counts(array, hist.limit, hist.bins, hist.signed)
                    hist.add_counts(counts, array.size, top, array.size)
