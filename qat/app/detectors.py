"""GluonCV detectors made ready for quantization.

GluonCV builds the backbones of its zoo SSDs on MobileNet and ResNet (``FeatureExpander``,
``FeatureExtractor``) as SymbolBlocks: one opaque MXNet graph, which ``convert_model``
cannot enter, so every layer of the backbone would stay fp32 (exported and verified, but
not int8). ``gluon_backbone`` rebuilds each SymbolBlock of a net as a GraphNet of standard
Gluon layers (``qat.importers.symbol.from_block``): the same function, the same parameter
names and values, so ``convert_model`` quantizes it like any Gluon net. Call it after the
weights are loaded (or the net ran once), before ``convert_model``.

``small_ssd`` and ``small_yolo3`` are the small detectors of the detection recipes: GluonCV's
own ``SSD`` and ``YOLOV3`` classes on a few conv-BN-activation stages, for inputs of 64-96
pixels (what trains in minutes on a CPU).
"""
from mxnet.gluon import HybridBlock, SymbolBlock, nn

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


# ----- small detectors -----------------------------------------------------------------------
def _stage(channels, activation):
    stage = nn.HybridSequential(prefix='')
    stage.add(nn.Conv2D(channels, 3, strides=2, padding=1, use_bias=False), nn.BatchNorm(),
              nn.LeakyReLU(0.1) if activation == 'leaky' else nn.Activation('relu'))
    return stage


class SmallFeatures(HybridBlock):
    """Conv-BN-ReLU stages of stride 2 (``widths``), the last ``outputs`` of them returned:
    the feature maps ``SSD(network=None)`` takes."""

    def __init__(self, widths=(16, 32, 48, 64, 64), outputs=3, **kwargs):
        super().__init__(prefix=kwargs.pop('prefix', None))
        self._first = len(widths) - outputs
        with self.name_scope():
            self.stages = nn.HybridSequential()
            for channels in widths:
                self.stages.add(_stage(channels, 'relu'))

    def hybrid_forward(self, F, x):
        outputs = []
        for k, stage in enumerate(self.stages):
            x = stage(x)
            if k >= self._first:
                outputs.append(x)
        return outputs


def small_ssd(classes, base_size=64, sizes=(10, 20, 34, 56), ratios=(1, 2, 0.5), **kwargs):
    """GluonCV's SSD on ``SmallFeatures`` (maps at strides 8, 16, 32): anchors of ``sizes``
    pixels (of a ``base_size`` input) with aspect ``ratios``."""
    from gluoncv.model_zoo.ssd import SSD
    steps = [8, 16, 32]
    return SSD(None, base_size, SmallFeatures, None, sizes=list(sizes),
               ratios=[list(ratios)] * len(steps), steps=steps, classes=classes,
               pretrained=False, **kwargs)


def small_yolo3(classes, widths=(16, 32, 48, 64, 64), channels=(32, 32, 32),
                anchors=((6, 10, 10, 14, 14, 18), (14, 22, 20, 26, 26, 20),
                         (26, 32, 32, 26, 40, 44)), **kwargs):
    """GluonCV's YOLOV3 on stride-2 conv-BN-leaky stages (outputs at strides 8, 16, 32),
    ``anchors`` in input pixels per output."""
    from gluoncv.model_zoo.yolo import YOLOV3
    stem = nn.HybridSequential(prefix='')
    for width in widths[:3]:
        stem.add(_stage(width, 'leaky'))
    stages = [stem, _stage(widths[3], 'leaky'), _stage(widths[4], 'leaky')]
    return YOLOV3(stages, list(channels), [list(a) for a in anchors], [8, 16, 32], classes,
                  **kwargs)
