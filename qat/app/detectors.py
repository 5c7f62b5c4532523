"""GluonCV detectors made ready for quantization.

GluonCV builds the backbones of its zoo SSDs on MobileNet and ResNet (``FeatureExpander``,
``FeatureExtractor``) as SymbolBlocks: one opaque MXNet graph, which ``convert_model``
cannot enter, so every layer of the backbone would stay fp32 (exported and verified, but
not int8). ``gluon_backbone`` rebuilds each SymbolBlock of a net as a GraphNet of standard
Gluon layers (``qat.importers.symbol.from_block``): the same function, the same parameter
names and values, so ``convert_model`` quantizes it like any Gluon net. Call it after the
weights are loaded (or the net ran once), before ``convert_model``.
"""
from mxnet.gluon import SymbolBlock

from ..errors import UserError
from ..importers.symbol import from_block
from ..nn import walk


def _rebuilt(block):
    try:
        for param in block.collect_params().values():
            param.data()
    except Exception:  # deferred initialization: no shapes yet
        raise UserError(f"{block.name}: its parameters have no values yet (load the weights "
                        f"or run the net once before gluon_backbone)") from None
    inputs, _ = block._cached_graph  # (the SymbolBlock's input variables, its outputs)
    return from_block(block, tuple(variable.name for variable in inputs))


def gluon_backbone(net):
    """Replace, in place, every SymbolBlock inside ``net`` by an equivalent GraphNet; returns
    the names of the blocks replaced."""
    replaced = []
    parents = {id(b): b for b in [net] + [child for *_, child in walk(net)]}.values()
    for parent in list(parents):
        for key, child in list(parent._children.items()):
            if not isinstance(child, SymbolBlock) or child is net:
                continue
            graph = _rebuilt(child)
            parent._children[key] = graph
            # (Gluon refuses an attribute of another type: set the slot the net reads)
            if getattr(parent, key, None) is child:
                object.__setattr__(parent, key, graph)
            replaced.append(child.name)
    return replaced
