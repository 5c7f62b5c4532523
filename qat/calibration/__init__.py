"""Calibration: every quantized block's input range (and, for EasyQuant, weight scales) from
the float activations of a few batches.

``calibrate`` runs any method of the one registry ``METHODS`` (``methods``); the statistics
are collected by ``observers`` (from MXNet, or from the exported fp32 ncnn model:
``engines``) and reduced by the pure numpy functions of ``thresholds``; ``easyquant`` is the
scale search.
"""
from . import easyquant, thresholds
from ..modes import init_learned_thresholds
from ..nn import quant_blocks
from .engines import ENGINES, check_engine
from .methods import METHODS, Method, check_options, set_ranges
from .observers import LOG_EVERY, collect_histograms


def calibrate(net, data, method='ema', num_batches=None, log_every=LOG_EVERY, progress=None,
              engine='mxnet', threads=None, **options):
    """Set the input range of every quantized block of ``net`` from float activations.

    data: iterable of input batches (NDArray, or (data, label) tuples); re-iterable (e.g. a
    list or a DataLoader, not a generator) for the histogram methods and EasyQuant.
    method: a key of METHODS. num_batches: stop after this many batches (in each pass).
    log_every: log.info progress every this many batches (0: never); progress: a function
    taking one progress line (EasyQuant's per-layer results).
    options: the method's options (``METHODS[method].options``), e.g. ``bins=2048``,
    ``percentile=99.99``, ``distribution='laplace'``, EasyQuant's ``max_samples``.
    engine: what computes the float activations (``ENGINES``): 'mxnet' (default), the net
    itself; 'ncnn', its exported fp32 ncnn model run by the ncnn runtime with ``threads``
    threads (default: ncnn's own), one image at a time; a net the exporter cannot write is
    an error then. EasyQuant's starting ranges use the engine, its search runs in MXNet.
    Each block's bits and signedness come from its ``config``; blocks with learned ranges
    (LSQ) start them here (``init_learned_thresholds``). Deterministic: the same data
    and settings give identical thresholds. Returns {block name: threshold}."""
    spec = check_options(method, options)
    check_engine(engine, threads)
    if not spec.search:
        found = set_ranges(net, data, method, num_batches, log_every, engine=engine,
                           threads=threads, **options)
    else:
        start = {} if engine == 'mxnet' else {'engine': engine, 'threads': threads}
        easyquant.search(net, data, progress=progress, **start,
                         **{k: v for k, v in options.items() if v is not None})
        found = {block.name: block.input_threshold() for _, block in quant_blocks(net)
                 if block.input_threshold() is not None}
    init_learned_thresholds(net)  # LSQ starts from the calibrated ranges
    return found


__all__ = ['ENGINES', 'METHODS', 'Method', 'calibrate', 'collect_histograms', 'easyquant',
           'set_ranges', 'thresholds']
