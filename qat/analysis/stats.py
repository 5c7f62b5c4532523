"""Per-layer statistics of a converted net on one batch (logged to TensorBoard by the
trainer): input range, mean weight scale, fraction of clipped inputs."""
from mxnet import nd

from ..modes import temporary_mode
from ..nn import quant_blocks
from ..ops import qrange
from ..probes import inputs_of


def clipped_fraction(x, threshold, bits=8, signed=True):
    """Fraction of the elements of ``x`` whose code the clip changes: beyond the last code's
    rounding interval, ``|x| > T (qmax + 1/2) / qmax`` (signed), or ``x`` above it or below
    -1/2 step (unsigned). A value past ``T`` by less than half a step keeps the code it would
    round to anyway (an MSE range just under the max clips many such values, harmlessly)."""
    _, high = qrange(bits, signed)
    limit = threshold * (high + 0.5) / high
    if signed:
        outside = nd.abs(x) > limit
    else:
        outside = (x > limit) + (x < -0.5 * threshold / high)
    return float(outside.mean().asscalar())


def layer_stats(net, x):
    """{tag: value} per quantized block on one batch ``x``: input range, mean weight scale
    (the scales the net quantizes with, searched factors included) and fraction of clipped
    inputs."""
    blocks = [block for _, block in quant_blocks(net)]
    with temporary_mode(net, imperative=True):
        seen, _ = inputs_of(net, x, blocks)
    stats = {}
    for block in blocks:
        _, scales = block.weight_codes(block.folded_weight(x.context)[0])
        stats[f'weight_scale/{block.name}'] = float(scales.mean().asscalar())
        tracked = block.input_threshold()
        if tracked is not None:
            stats[f'input_range/{block.name}'] = tracked
            if block in seen:
                stats[f'clipped/{block.name}'] = clipped_fraction(seen[block], tracked,
                                                                  block.config.input_bits,
                                                                  block.config.input_signed)
    return stats
