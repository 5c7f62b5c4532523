"""Range trackers: a bias-corrected EMA of the per-batch range, kept inside the graph.

The state of one tracker is a pair ``ema = [m_x, m_1]``: the EMA of the batch ranges and the
EMA of a constant 1, both started at 0. ``m_1 = 1 - momentum^n`` after n updates, so
``m_x / m_1`` is the bias-corrected average (Adam-style warm-up: the first value is the first
batch range, never 0), and ``m_1 == 0`` means "never updated".

The update runs in the training graph with no host synchronisation: MXNet's own BatchNorm op
keeps running means as auxiliary states and updates them in training mode only; fed the
(1, 2) tensor ``[batch_range, 1]`` it performs exactly ``ema <- momentum*ema + (1-momentum)*v``.
MXNet 1.9 performs that update in BatchNorm's *backward* pass, so the op must sit on a
gradient path: its input is tied to an ``anchor`` that receives gradients (the layer's
weight) and its output, times 0, is added back onto that anchor's path.
A second auxiliary array (the running variance BatchNorm insists on) is carried unused.
"""
from .. import native, ops


def ema_update(F, batch_range, ema, ema_var, momentum, anchor):
    """Push ``batch_range`` (shape (1,)) into the tracker in training mode (nothing in
    inference). ``anchor`` is a tensor that gets a gradient. Returns a (1,) zero that must be
    added to something on ``anchor``'s gradient path, so the update runs in backward.
    With the native operators the ops around the BatchNorm are two (the same values)."""
    if native.available():
        stats = F.qat_range_stats(batch_range, anchor)
    else:
        tie = F.reshape(F.sum(anchor), (1,)) * 0
        stats = F.reshape(F.concat(batch_range + tie, F.ones_like(batch_range), dim=0), (1, 2))
    normalized = F.BatchNorm(stats, F.ones_like(ema), F.zeros_like(ema), ema, ema_var,
                             momentum=momentum, fix_gamma=True, eps=1e-5, axis=1)
    if native.available():
        return F.qat_zero_token(normalized)
    return F.reshape(F.sum(normalized), (1,)) * 0


def ema_value(F, ema, fallback):
    """Bias-corrected tracked range ``m_x / m_1``, or ``fallback`` (1,) if never updated."""
    m_x = F.slice_axis(ema, axis=0, begin=0, end=1)
    m_1 = F.slice_axis(ema, axis=0, begin=1, end=2)
    updated = m_1 > 0
    return F.where(updated, m_x / F.where(updated, m_1, F.ones_like(m_1)), fallback)


def tracked_scale(F, ema, batch_range, bits, signed=True):
    """``ops.scale_from_threshold`` of ``ema_value(ema, batch_range)`` (``batch_range`` (1,), or
    None for 0), no gradient: one native op with the same float32 arithmetic, else those ops."""
    if native.available():
        bounds = ops.native_threshold_bounds()
        high = ops.qrange(bits, signed)[1]
        if batch_range is None:
            scale = F.qat_tracked_scale(ema, high=high, fallback=0, **bounds)
        else:
            scale = F.qat_tracked_scale(ema, batch_range, high=high, **bounds)
        return F.BlockGrad(scale)
    fallback = batch_range if batch_range is not None else F.slice_axis(
        F.zeros_like(ema), 0, 0, 1)
    return ops.scale_from_threshold(F, ema_value(F, ema, fallback), bits, signed)
