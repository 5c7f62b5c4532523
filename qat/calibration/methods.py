"""Calibration methods: how the float activations of a layer become its input range.

``METHODS`` is the one registry of methods (``qat.calibrate``, the recipe's
``calibrate.method`` and ``qat calibrate --method`` all read it): per-batch methods ('max',
'ema') read the data once, histogram methods ('kl', 'percentile', 'mse', ACIQ's moment and
Laplace rules) twice and ACIQ's default Gaussian range rule once (see ``observers``), and
'easyquant' starts from KL and then searches the scales (``qat.calibration.easyquant``).
"""
import logging
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

from . import engines, observers
from . import thresholds as th
from ..errors import NonFiniteError, UserError
from ..modes import check_ranges

log = logging.getLogger(__name__)


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
    ``thresholds.Histogram``. ``options``: accepted keyword options and their defaults
    (``bins`` sizes the histogram; the others go to ``reduce``). ``search``: the method is a
    scale search run after a range method (``reduce`` unused). ``counts(options)``: False
    when ``reduce`` with those options reads no bin counts, only the maximum and sizes (it then
    gets a ``thresholds.Summary`` from one pass); None: always True."""
    description: str
    reduce: Callable = None
    histogram: bool = False
    options: Mapping = field(default_factory=lambda: MappingProxyType({}))
    search: bool = False
    counts: Callable = None

    def needs_counts(self, options):
        return self.histogram and (self.counts is None or bool(self.counts(options)))

    def __call__(self, stats, config, **options):
        return self.reduce(stats, config, **options)


def _from_histogram(function):
    """A ``thresholds`` method applied with the block's input bits and signedness."""
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
                   "as ncnn2table: one pass; or moments, Laplace b: two passes)",
                   _from_histogram(th.aciq), histogram=True,
                   options=_options(distribution='gaussian', spread='range'),
                   counts=lambda o: (o['distribution'], o['spread']) != ('gaussian', 'range')),
    'percentile': Method("the given percentile of |x| read off the histogram; two passes",
                         _from_histogram(th.percentile), histogram=True,
                         options=_options(percentile=th.DEFAULT_PERCENTILE)),
    'mse': Method("threshold minimizing the expected squared error of the real rounding and "
                  "clipping over the histogram (grid search); two passes",
                  _from_histogram(th.mse), histogram=True, options=_options()),
    'easyquant': Method("KL, then EasyQuant's search of the weight and input scales layer by "
                        "layer, maximizing the cosine to float (qat.calibration.easyquant)",
                        search=True, options=MappingProxyType(dict.fromkeys((
                            'calibration', 'max_samples', 'steps', 'low', 'high', 'rounds',
                            'batch_size')))),  # defaults: easyquant.search's own
}


def method(name):
    """The registered Method ``name``; an unknown name is an error listing the valid ones."""
    if name not in METHODS:
        raise UserError(f"unknown calibration method {name!r}; valid: {sorted(METHODS)}")
    return METHODS[name]


def check_options(name, options):
    spec = method(name)
    unknown = set(options) - set(spec.options)
    if unknown:
        raise UserError(f"calibration method {name!r} has no option(s) {sorted(unknown)}; "
                         f"valid: {sorted(spec.options)}")
    return spec


def set_ranges(net, data, method='ema', num_batches=None, log_every=observers.LOG_EVERY,
               engine='mxnet', threads=None, **options):
    """Set the input range of every quantized block of ``net`` from float activations.

    data: iterable of input batches (NDArray, or (data, label) tuples); re-iterable (e.g. a
    list or a DataLoader, not a generator) for the histogram methods.
    method: a key of METHODS. num_batches: stop after this many batches (in each pass).
    log_every: log.info progress every this many batches (0: never).
    options: the method's options (see ``METHODS[method].options``), e.g. ``bins=2048``,
    ``percentile=99.99``, ``distribution='laplace'``.
    engine: what computes the float activations (``engines.ENGINES``): 'mxnet', the net
    itself, or 'ncnn', its exported fp32 ncnn model in the ncnn runtime with ``threads``
    threads (default: ncnn's own).
    Each block's bits and signedness come from its ``config``. Deterministic: the same data
    and settings give identical thresholds. Returns {block name: threshold}."""
    spec = check_options(method, options)
    engines.check_engine(engine, threads)
    if spec.search:
        raise UserError(f"{method!r} is a scale search, not a range method: use "
                         f"qat.calibrate")
    settings = {**spec.options, **options}
    bins = settings.pop('bins', None)
    blocks = observers.quantized(net)
    if spec.histogram:
        observers.check_reiterable(data, f"calibration method {method!r}")
        for config in {block.config for block in blocks}:  # bad options fail before any pass
            spec(th.Histogram(1.0, bins, config.input_signed), config, **settings)
    summary = spec.histogram and not spec.needs_counts(settings)
    ranges, histograms, count = observers.collect(net, blocks, data, num_batches, log_every,
                                                  method, bins if spec.histogram else None,
                                                  summary=summary, engine=engine,
                                                  threads=threads)
    thresholds = {}
    for block in blocks:
        if not ranges[block]:
            log.warning("%s never ran during calibration: its range is left unchanged",
                        block.name)
            continue
        if not all(math.isfinite(r) for r in ranges[block]):
            raise NonFiniteError(f"{block.name}: its input holds NaN or infinite values "
                                 f"during calibration (check the data and the layers "
                                 f"before it)")
        stats = histograms[block] if spec.histogram else ranges[block]
        threshold = float(spec(stats, block.config, **settings))
        log.debug("%s: max %g -> threshold %g (%s)", block.name, max(ranges[block]),
                  threshold, method)
        block.set_input_threshold(threshold)
        thresholds[block.name] = threshold
    check_ranges(net)
    log.info("calibrated %d layers on %d batches (%s, %s)", len(thresholds), count, method,
             engine)
    return thresholds
