"""The fake-quantized blocks (``layers``), the fp32 layers computed as ncnn once deployed
(``deployed``), their range trackers (``ranges``), and the walk over a block tree."""
from .deployed import BN_MODE_FLAGS, DeployedFloatBlock, QAvgPool2D, QBatchNorm
from .layers import MODE_FLAGS, FoldedBatchNorm, QConv2D, QConv2DBatchNorm, QDense, QuantBlock


def walk(block, path=''):
    """Yield (path, parent, key, child) for every descendant of ``block``, depth first."""
    for key, child in list(block._children.items()):
        child_path = f"{path}.{key}" if path else key
        yield child_path, block, key, child
        yield from walk(child, child_path)


def quant_blocks(net):
    """All fake-quantized blocks of ``net`` as (path, block), in network order, each once (a
    block registered in several places, such as GoogLeNet's ``output`` that is also
    ``head.2``, is listed at its first path)."""
    seen, blocks = set(), []
    for path, _, _, child in walk(net):
        if isinstance(child, QuantBlock) and id(child) not in seen:
            seen.add(id(child))
            blocks.append((path, child))
    return blocks


def mode_blocks(net):
    """Every block with mode flags as (path, block), in network order, each once: the
    fake-quantized blocks and the ``DeployedFloatBlock``s (stand-alone BatchNorms, average
    poolings), which the mode functions of ``qat.modes`` set."""
    seen, blocks = set(), []
    for path, _, _, child in walk(net):
        if isinstance(child, (QuantBlock, DeployedFloatBlock)) and id(child) not in seen:
            seen.add(id(child))
            blocks.append((path, child))
    return blocks


__all__ = ['BN_MODE_FLAGS', 'MODE_FLAGS', 'DeployedFloatBlock', 'FoldedBatchNorm', 'QAvgPool2D',
           'QBatchNorm', 'QConv2D', 'QConv2DBatchNorm', 'QDense', 'QuantBlock', 'walk',
           'quant_blocks', 'mode_blocks']
