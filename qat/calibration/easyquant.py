"""EasyQuant-style scale search (Wu et al. 2020; ncnn2table ``method=eq``).

Starting from a calibration (KL by default), layer by layer in execution order, the weight
scales of a layer (one per output channel, one per group for grouped convs, one for
'tensor' granularity) and then its input scale are searched over a grid of multipliers of
their current values (100 steps over [0.5, 2], as ncnn2table's eq), maximizing the mean
per-sample cosine similarity between the layer's output in the float network and its
quantized output. The quantized layer reads its input from the already-quantized (and
already-searched) upstream network, as EasyQuant does, so each layer also absorbs the error
of the layers before it. A small sample (at most ``MAX_SAMPLES``) is enough.

Scales are changed through the block's own state, so the simulation and the export follow:
the input scale ``s -> m * s`` is ``set_input_threshold(T / m)``; a weight scale
``s_w -> m * s_w`` divides the block's ``weight_threshold_factor`` by ``m``.

Cost of the weight search: output channel ``c`` depends only on its own weight scale (the
input scale is fixed and the activation is elementwise), so a sample's cosine decomposes into
per-channel sums ``<y_float, y_q>_c`` and ``|y_q|^2_c``. One run of the layer per grid value,
with *every* scale set to that value, gives all the sums; the coordinate search over the
scales (in channel order, each given the others' current choice, as ncnn2table) is then
arithmetic: ``steps + 1`` layer runs instead of ``(steps + 1) * channels``.

The current value is candidate 0 and only a strictly better cosine replaces it, and the real
cosine after the weight search is checked against the start, so the search never lowers a
layer's cosine on its sample. Deterministic: the same net, data and settings give the same
scales.
"""
import logging

import mxnet as mx
import numpy as np

from ..batches import labeled_batches
from ..errors import UserError
from ..metrics import cosine_from_sums, cosine_similarity
from ..modes import check_calibrated, deployed, quantized_only
from ..nn import QDense
from ..probes import capture, execution_order
from ..report import format_table, progress as layer_bar
from .methods import set_ranges

log = logging.getLogger(__name__)

MAX_SAMPLES = 50                      # EasyQuant's list50 / ncnn2table eq's limit
GRID_STEPS, GRID_LOW, GRID_HIGH = 100, 0.5, 2.0


def scale_grid(steps=GRID_STEPS, low=GRID_LOW, high=GRID_HIGH):
    """Candidate multipliers of a scale, float64 (steps + 1,): 1 (the current scale; first,
    so that ties keep it) then ``steps`` values evenly spaced over [low, high]."""
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"grid steps must be a positive integer, got {steps!r}")
    if not 0 < low <= high:
        raise UserError(f"grid range must satisfy 0 < low <= high, got [{low}, {high}]")
    return np.concatenate([[1.0], np.linspace(low, high, steps)])


def channel_sums(output, target, channel_axis):
    """Per-sample, per-channel sums in float64: ``(<target, output>_c, |output|^2_c)``, each
    (N, C); ``channel_axis`` is the channel axis of ``output`` and ``target`` (N, ...)."""
    out = np.moveaxis(np.asarray(output, np.float64), channel_axis, 1)
    ref = np.moveaxis(np.asarray(target, np.float64), channel_axis, 1)
    out = out.reshape(out.shape[0], out.shape[1], -1)
    ref = ref.reshape(out.shape)
    return (ref * out).sum(2), (out * out).sum(2)


def _scale_sets(block):
    """(number of weight scales, output channels per scale); the channels of one scale are
    contiguous (see ``qat.nn.layers.shared_factor``)."""
    channels = block.weight_threshold_factor.shape[0]
    if block.config.weight_granularity == 'tensor':
        per_set = channels
    elif block.groups > 1:
        per_set = channels // block.groups
    else:
        per_set = 1
    return channels // per_set, per_set


def _mean_cosine(block, x, target):
    return float(cosine_similarity(target, block(x).asnumpy()).mean())


def _search_weights(block, x, target, grid):
    """Coordinate search of the weight scales (see the module doc); sets the block's
    ``weight_threshold_factor`` to the best found."""
    param = block.weight_threshold_factor
    sets, per_set = _scale_sets(block)
    start = param.data().asnumpy().astype(np.float64)
    base = np.repeat(start[::per_set], per_set)   # the value each scale really uses
    axis = -1 if isinstance(block, QDense) else 1
    target_power = (np.asarray(target, np.float64).reshape(len(target), -1) ** 2).sum(1)
    dots, powers = [], []
    for multiplier in grid:
        param.set_data(mx.nd.array(base / multiplier))
        dot, power = channel_sums(block(x).asnumpy(), target, axis)
        dots.append(dot.reshape(len(dot), sets, per_set).sum(2))
        powers.append(power.reshape(len(power), sets, per_set).sum(2))
    dots, powers = np.stack(dots), np.stack(powers)          # (K, N, S)
    choice = np.zeros(sets, np.int64)
    total_dot, total_power = dots[0].sum(1), powers[0].sum(1)  # (N,)
    for s in range(sets):
        candidate_dot = total_dot[None] - dots[0, :, s][None] + dots[:, :, s]
        candidate_power = total_power[None] - powers[0, :, s][None] + powers[:, :, s]
        cosines = cosine_from_sums(candidate_dot, target_power[None], candidate_power).mean(1)
        best = int(np.argmax(cosines))
        if cosines[best] > cosines[0]:
            choice[s] = best
            total_dot, total_power = candidate_dot[best], candidate_power[best]
    param.set_data(mx.nd.array(base / np.repeat(grid[choice], per_set)))


def _search_input(block, x, target, grid):
    """Grid search of the input scale; sets the best threshold (or leaves the tracker state
    exactly as it was)."""
    state = block.range_ema.data().copy()
    start = block.input_threshold()
    cosines = []
    for multiplier in grid:
        block.set_input_threshold(start / multiplier)
        cosines.append(_mean_cosine(block, x, target))
    best = int(np.argmax(cosines))
    if cosines[best] > cosines[0]:
        block.set_input_threshold(start / grid[best])
    else:
        block.range_ema.set_data(state)


def _gather(net, batches, block, output):
    return mx.nd.concat(*[capture(net, x, block, output) for x in batches], dim=0)


def search_layer(block, x, target, grid, rounds=1):
    """Search one block's scales on its input ``x`` (NDArray) against the float output
    ``target`` (numpy): ``rounds`` times the weight scales, then the input scale. The block
    must be quantized, in deployed mode. Returns (cosine before, cosine after)."""
    start = _mean_cosine(block, x, target)
    current = start
    for _ in range(rounds):
        before = block.weight_threshold_factor.data().copy()
        _search_weights(block, x, target, grid)
        searched = _mean_cosine(block, x, target)
        if searched < current:   # the decomposition is exact up to float rounding: keep safe
            block.weight_threshold_factor.set_data(before)
        else:
            current = searched
        if block.mode['quantize_input']:
            _search_input(block, x, target, grid)
            current = _mean_cosine(block, x, target)
    return start, current


def search(net, data, calibration='kl', calibration_data=None, max_samples=MAX_SAMPLES,
           steps=GRID_STEPS, low=GRID_LOW, high=GRID_HIGH, rounds=1, batch_size=MAX_SAMPLES,
           progress=None, **calibration_options):
    """EasyQuant scale search over every quantized layer of ``net`` (converted), in place.

    calibration: the starting range method (a key of ``qat.calibration.METHODS``, run on
        ``calibration_data``, default ``data``, with ``calibration_options``), or None to
        start from the ranges already set.
    data: batches (NDArray, or (data, label) tuples); the first ``max_samples`` samples are
        the search sample, run ``batch_size`` at a time through the net.
    steps, low, high: the grid of scale multipliers (``scale_grid``); rounds: alternations of
        weight and input search per layer.
    Layers with quantization off stay float (and are skipped); a layer without input
    quantization gets only the weight search.
    Returns one dict per searched layer (execution order): ``layer``, ``bits``,
    ``cosine_start``, ``cosine`` (mean per-sample cosine of the layer output vs float, with
    the start and the searched scales, on the same upstream-quantized input),
    ``input_threshold_start``, ``input_threshold``, ``weight_factor_min``/``max``."""
    grid = scale_grid(steps, low, high)
    if not isinstance(rounds, int) or rounds < 1:
        raise UserError(f"rounds must be a positive integer, got {rounds!r}")
    if calibration is not None:
        set_ranges(net, data if calibration_data is None else calibration_data, calibration,
                   **calibration_options)
    samples = mx.nd.concat(*labeled_batches(data, max_samples)[0], dim=0)
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    order = [block for block in execution_order(net, samples) if block.mode['quantize']]
    check_calibrated(order)
    results = []
    with deployed(net):
        for number, block in enumerate(layer_bar(order, label='easyquant', unit='layer'), 1):
            x = _gather(net, batches, block, output=False)
            with quantized_only(net, ()):
                target = _gather(net, batches, block, output=True).asnumpy()
            threshold = block.input_threshold() if block.mode['quantize_input'] else None
            start, cosine = search_layer(block, x, target, grid, rounds)
            factors = block.weight_threshold_factor.data().asnumpy()
            cfg = block.config
            results.append({
                'layer': block.name, 'bits': f"W{cfg.weight_bits}A{cfg.input_bits}",
                'cosine_start': start, 'cosine': cosine, 'input_threshold_start': threshold,
                'input_threshold': block.input_threshold() if threshold is not None else None,
                'weight_factor_min': float(factors.min()),
                'weight_factor_max': float(factors.max())})
            message = (f"easyquant {number}/{len(order)} {block.name}: cosine "
                       f"{start:.6f} -> {cosine:.6f}")
            log.info(message)
            if progress:
                progress(message)
    return results


def format_search(results):
    """``search`` results as a Markdown table."""
    rows = []
    for r in results:
        threshold = ('' if r['input_threshold'] is None else
                     f"{r['input_threshold_start']:.4g} -> {r['input_threshold']:.4g}")
        rows.append([r['layer'], r['bits'], f"{r['cosine_start']:.6f}", f"{r['cosine']:.6f}",
                     threshold, f"{r['weight_factor_min']:.3f}..{r['weight_factor_max']:.3f}"])
    return format_table(rows, ['layer', 'bits', 'cosine (start)', 'cosine (searched)',
                               'input threshold', 'weight threshold factors'])
