"""Calibration: set every quantized block's input range from float activations.

The net runs in float (quantization disabled, inference mode, not hybridized) while forward
pre-hooks record each quantized block's per-batch input range; the modes and hybridization
are restored afterwards. Methods are reductions of the per-batch ranges, in one registry.
"""
import logging

from mxnet import nd

from . import ops
from .convert import check_ranges, quant_blocks, walk

log = logging.getLogger(__name__)


def _ema(ranges, momentum):
    """Bias-corrected EMA of a sequence (the same estimate the in-graph tracker keeps)."""
    m_x = m_1 = 0.0
    for value in ranges:
        m_x = momentum * m_x + (1 - momentum) * value
        m_1 = momentum * m_1 + (1 - momentum)
    return m_x / m_1


# method name -> f(per-batch ranges, block config) -> threshold
METHODS = {
    'max': lambda ranges, config: max(ranges),
    'ema': lambda ranges, config: _ema(ranges, config.range_momentum),
}


def calibrate(net, data, method='ema', num_batches=None):
    """Set the input range of every quantized block of ``net`` from float activations.

    data: iterable of input batches (NDArray, or (data, label) tuples).
    method: a key of METHODS. num_batches: stop after this many batches.
    Returns {block name: threshold}."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; valid: {sorted(METHODS)}")
    blocks = [block for _, block in quant_blocks(net)]
    if not blocks:
        raise ValueError(f"{net.name} has no quantized blocks: call convert_model first")
    modes = [block.mode for block in blocks]
    active = {block: block._active for block in [net] + [b for *_, b in walk(net)]
              if hasattr(block, '_active')}
    observed = {block: [] for block in blocks}

    def record(block, inputs):
        observed[block].append(ops.batch_threshold(nd, inputs[0], block.config.input_signed))

    handles = [block.register_forward_pre_hook(record) for block in blocks]
    try:
        for block in active:
            block._active = False
            block._clear_cached_op()
        for block in blocks:
            block.set_mode(quantize=False)
        count = 0
        for batch in data:
            if num_batches is not None and count >= num_batches:
                break
            net(batch[0] if isinstance(batch, (tuple, list)) else batch)
            count += 1
            log.debug("calibration batch %d", count)
        if count == 0:
            raise ValueError("calibration data is empty")
    finally:
        for handle in handles:
            handle.detach()
        for block, mode in zip(blocks, modes):
            block.set_mode(**mode)
        for block, was_active in active.items():
            block._active = was_active
            block._clear_cached_op()
    thresholds = {}
    for block in blocks:
        ranges = [float(r.asscalar()) for r in observed[block]]
        if not ranges:
            log.warning("%s never ran during calibration: its range is left unchanged",
                        block.name)
            continue
        threshold = float(METHODS[method](ranges, block.config))
        block.set_input_threshold(threshold)
        thresholds[block.name] = threshold
    check_ranges(net)
    log.info("calibrated %d layers on %d batches (%s)", len(thresholds), count, method)
    return thresholds
