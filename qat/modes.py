"""Modes: explicit state of every quantized block (saved in its ``qmode`` parameter), the
functions that set them on a whole net, and the one context manager that changes them for a
while.

MXNet caches a hybridized graph per block; a mode change rebuilds every cached graph of the
net (a parent keeps its own cache otherwise).
"""
import contextlib
import logging

from mxnet.gluon import HybridBlock

from .errors import UserError
from .nn import mode_blocks, quant_blocks, walk
from .ops import MAX_THRESHOLD, MIN_THRESHOLD

log = logging.getLogger(__name__)

# What the exported model computes: BN folded with its running statistics, the tracked input
# ranges, no tracker updates.
DEPLOYED = {'bn_frozen': True, 'ranges_frozen': True, 'online': False}


def clear_cached_graphs(net):
    """Drop the cached hybridized graph of ``net`` and of every block inside it."""
    for block in [net] + [child for *_, child in walk(net)]:
        if isinstance(block, HybridBlock):
            block._clear_cached_op()


def _blocks(net):
    """Every block with mode flags (``mode_blocks``: the quantized blocks and the stand-alone
    BatchNorms); an error if ``net`` has no quantized block."""
    if not quant_blocks(net):
        raise UserError(f"{net.name} has no quantized blocks: call convert_model first")
    return [block for _, block in mode_blocks(net)]


@contextlib.contextmanager
def temporary_mode(net, imperative=False, **flags):
    """Set mode flags on every quantized block (and stand-alone BatchNorm: ``mode_blocks``,
    each taking the flags it carries) for the duration of a ``with`` block, then give each
    block back its own values of those flags.

    A flag's value is a bool, or a function ``block -> bool`` (e.g. quantize only some
    blocks). ``imperative``: the net also runs block by block instead of its hybridized
    graph, so forward hooks fire; the hybridization is restored afterwards. Mode changes made
    inside to other flags persist."""
    blocks = [block for _, block in mode_blocks(net)]
    saved = [{flag: block.mode[flag] for flag in flags if flag in block.mode}
             for block in blocks]
    active = {}
    if imperative:
        active = {block: block._active for block in [net] + [c for *_, c in walk(net)]
                  if hasattr(block, '_active')}
    try:
        for block in blocks:
            block.set_mode(**{flag: value(block) if callable(value) else value
                              for flag, value in flags.items()})
        for block in active:
            block._active = False
        clear_cached_graphs(net)
        yield net
    finally:
        for block, values in zip(blocks, saved):
            block.set_mode(**values)
        for block, was_active in active.items():
            block._active = was_active
        clear_cached_graphs(net)


def deployed(net, imperative=True):
    """``temporary_mode`` in which every quantized block computes what the export runs
    (``DEPLOYED``); imperative by default, for probes with forward hooks."""
    _blocks(net)
    return temporary_mode(net, imperative=imperative, **DEPLOYED)


def quantized_only(net, enabled):
    """``temporary_mode`` with quantization on for the blocks in ``enabled`` and off for every
    other quantized block."""
    return temporary_mode(net, quantize=lambda block: block in enabled)


def _set_mode(net, **flags):
    for block in _blocks(net):
        block.set_mode(**flags)
    clear_cached_graphs(net)
    return net


def enable_quantize(net):
    """Quantize weights (and inputs, if input quantization is on) of every converted block."""
    return _set_mode(net, quantize=True)


def disable_quantize(net):
    """Compute exactly what the float network computed."""
    return _set_mode(net, quantize=False)


def quantize_input(net, enable=True, online=False):
    """Turn input quantization on/off; ``online`` uses each batch's own range, otherwise the
    tracked range (falling back to the batch range while none has been tracked)."""
    return _set_mode(net, quantize_input=enable, online=online)


def freeze_bn(net, frozen=True):
    """Fake-BN blocks use running statistics (and stop updating them), as the device does."""
    return _set_mode(net, bn_frozen=frozen)


def freeze_ranges(net, frozen=True):
    """Stop updating the input range trackers. Warns about layers without a usable range."""
    if frozen:
        check_ranges(net)
    return _set_mode(net, ranges_frozen=frozen)


def init_learned_thresholds(net, force=False):
    """Start the learned ranges (LSQ, ``range_tracker='lsq'``) of every block where they are
    not set (all of them with ``force``): the input range from the tracked / calibrated one,
    the weight ranges from max|w| (times ``weight_threshold_factor``). ``calibrate`` calls it.
    Returns the names of the blocks that changed."""
    return [block.name for _, block in quant_blocks(net)
            if block.init_learned_thresholds(force)]


# Bound as methods of a converted net (``net.freeze_bn()``).
MODE_FUNCTIONS = (enable_quantize, disable_quantize, quantize_input, freeze_bn, freeze_ranges)


def check_ranges(net):
    """Warn, naming the layer, about every input range that is unset, zero or not finite
    (the guard in ``ops.safe_threshold`` keeps its scale finite). Returns those layer names."""
    bad = []
    for _, block in quant_blocks(net):
        if not block.mode['quantize_input'] or block.range_ema._data is None:
            continue
        threshold = block.input_threshold()
        if threshold is None or not MIN_THRESHOLD <= threshold <= MAX_THRESHOLD:
            bad.append(block.name)
            log.warning("%s: input range is %s; its scale is clamped to a finite value "
                        "(calibrate or train with input quantization first)",
                        block.name, 'unset' if threshold is None else threshold)
    return bad


def check_calibrated(blocks):
    """Raise naming the first block whose input quantization has no range."""
    for block in blocks:
        if block.mode['quantize_input'] and block.input_threshold() is None:
            raise UserError(f"{block.name}: input range is unset; run qat.calibrate first")
