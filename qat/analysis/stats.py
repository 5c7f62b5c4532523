"""Per-layer statistics of a converted net on one batch (logged to TensorBoard by the
trainer): input range, mean weight scale, fraction of clipped inputs."""
from mxnet import nd

from ..modes import temporary_mode
from ..nn import quant_blocks
from ..probes import inputs_of


def clipped_fraction(x, threshold, signed=True):
    """Fraction of the elements of ``x`` outside the quantization range: ``|x| > T`` (signed)
    or ``x > T or x < 0`` (unsigned)."""
    outside = (nd.abs(x) > threshold) if signed else ((x > threshold) + (x < 0))
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
                                                                  block.config.input_signed)
    return stats
