"""The fake-quantized blocks, their range trackers, and the walk over a block tree."""
from .layers import (MODE_FLAGS, FoldedBatchNorm, QConv2D, QConv2DBatchNorm, QDense,
                     QuantBlock)


def walk(block, path=''):
    """Yield (path, parent, key, child) for every descendant of ``block``, depth first."""
    for key, child in list(block._children.items()):
        child_path = f"{path}.{key}" if path else key
        yield child_path, block, key, child
        yield from walk(child, child_path)


def quant_blocks(net):
    """All fake-quantized blocks of ``net`` as (path, block), in network order."""
    return [(path, child) for path, _, _, child in walk(net) if isinstance(child, QuantBlock)]


__all__ = ['MODE_FLAGS', 'FoldedBatchNorm', 'QConv2D', 'QConv2DBatchNorm', 'QDense',
           'QuantBlock', 'walk', 'quant_blocks']
