"""trace: a converted Gluon net -> the deployment graph (``qat.deploy.ir``).

The net is traced symbolically in float mode, where every quantized block computes exactly
its float op under the float block's name (``<prefix>fwd``). One pass over the nodes in graph
order: the op table (``qat.deploy.optable``) first tries its patterns (runs of nodes that are
one layer), then the node's op entry, which adds the IR layers and may fold later nodes into
them (a Convolution's BatchNorm and activation). Dropout and identities disappear. Any other
op is an error naming the op and its block.
"""
import re

import numpy as np

from .. import ops
from ..modes import temporary_mode
from ..nn import QConv2DBatchNorm, quant_blocks
from ..symbol import SymbolGraph, trace_symbol
from .ir import ExportError, Graph, Layer
from .optable import OPS, PATTERNS, activations

def _layer_name(node_name, taken):
    """Readable, unique layer name: the node name without MXNet's op suffix."""
    name = re.sub(r'_(fwd|output)$', '', node_name) or node_name
    base, k = name, 1
    while name in taken:
        name = f"{base}_{k}"
        k += 1
    taken.add(name)
    return name


def _float_trace(net, input_names):
    """Symbol of ``net`` computed in float mode (modes restored afterwards)."""
    with temporary_mode(net, quantize=False):
        try:
            return trace_symbol(net, input_names)
        except Exception as err:
            raise ExportError(f"{net.name} cannot be traced symbolically ({type(err).__name__}: "
                              f"{err}); only HybridBlocks can be exported") from err


def block_index(net):
    """{float op node name: (quantized block, role)} for every quantized block."""
    index = {}
    for _, block in quant_blocks(net):
        index[block.prefix + 'fwd'] = (block, 'layer')
        if isinstance(block, QConv2DBatchNorm):
            index[block.float_blocks[1].prefix + 'fwd'] = (block, 'bn')
    return index


def _values(net):
    return {name: param.data(param.list_ctx()[0])
            for name, param in net.collect_params().items() if param._data is not None}


class _Tracer(SymbolGraph):
    """One pass over the float-mode graph of ``net`` (nodes, consumers, shapes: the
    ``SymbolGraph``), building the IR layers. The op table's trace functions get it as ``t``
    and use the methods below."""

    def __init__(self, net, input_shape, input_names, detection=None):
        super().__init__(_float_trace(net, input_names), net, input_names,
                         {name: (1,) + tuple(input_shape) for name in input_names})
        self.input_shape = tuple(input_shape)
        self.blocks = block_index(net)
        self.values = _values(net)
        self.blob = {}        # node index (or (index, output k)) -> IR layer name
        self.absorbed = set()  # node indices folded into an earlier layer
        self.layers, self.taken = [], set()
        self.detection_options = detection  # export(detection=...): decoder overrides
        self.memo = {}  # what a pattern found once per graph (the detector's decoding)

    # ----- what the op table's trace functions use ------------------------------------------
    def param(self, node, position):
        """The value (NDArray) of the parameter that is input ``position`` of ``node``."""
        return self.values[self.nodes[node['inputs'][position][0]]['name']]

    def describe(self, node):
        """'op X (node N in block B)', B the block that owns N (``SymbolGraph.owner``)."""
        owner = self.owner(node['name'])
        where = f" in block {owner.name}" if owner is not None else ''
        return f"op {node['op']!r} (node {node['name']!r}{where})"

    def shape(self, index, output=None):
        """Inferred output shape of node ``index`` (its output ``output`` for an op with
        several)."""
        if output is None:
            return super().shape(index)
        return self.shapes[f"{self.nodes[index]['name']}_output{output}"]

    def _input_blobs(self, index, sources):
        """The blobs node ``index`` reads from the nodes ``sources`` (for a node with several
        outputs, the one each of its input entries names, in order)."""
        entries = list(self.nodes[index].get('inputs', []))
        blobs = []
        for source in sources:
            entry = next((e for e in entries if e[0] == source), None)
            if entry is not None:
                entries.remove(entry)
            output = (source, entry[1]) if entry is not None else None
            if output not in self.blob and source not in self.blob:
                raise ExportError(f"cannot export {self.describe(self.nodes[index])}: its input "
                                  f"{self.nodes[source]['name']!r} has no ncnn layer (a "
                                  f"constant only elementwise arithmetic can take)")
            blobs.append(self.blob[output] if output in self.blob else self.blob[source])
        return blobs

    def add(self, kind, index, inputs, params=None, weights=None, quant=None, name=None,
            source=None, output=None):
        """Add a layer computed at node ``index`` from the nodes ``inputs``; its blob stands
        for that node (for its output ``output`` if it has several)."""
        node = self.nodes[index]
        layer = Layer(kind, _layer_name(name or node['name'], self.taken),
                      self._input_blobs(index, inputs), params or {},
                      {k: v for k, v in (weights or {}).items() if v is not None}, quant,
                      self.key(index) if source is None else source,
                      tuple(self.shape(index, output)[1:]) if node['op'] != 'null'
                      else self.input_shape,
                      [self.key(i) for i in inputs], self.key(index))
        self.layers.append(layer)
        self.blob[index if output is None else (index, output)] = layer.name
        return layer

    def absorb(self, indices, into):
        """Nodes ``indices`` are computed by the layer of node ``into``."""
        for index in indices:
            self.absorbed.add(index)
            self.blob[index] = self.blob[into]

    def fuse_activation(self, index, layer):
        """Absorb the only consumer of node ``index`` into ``layer`` if it is an activation
        ncnn can fuse."""
        user = self.only_consumer(index)
        act = activations.fused(self.nodes[user]) if user is not None else None
        if act is None:
            return
        layer.params['activation'] = act
        layer.source = self.key(user)
        layer.sim_inputs = [self.key(index)]
        self.absorb([user], index)

    # ----- the pass ------------------------------------------------------------------------
    def run(self):
        for index, node in enumerate(self.nodes):
            if index in self.absorbed:
                continue
            if node['op'] == 'null' and node['name'] not in self.input_names:
                continue  # a parameter
            if any(match(self, index, node) for match in PATTERNS):
                continue
            trace_op = OPS.get(node['op'])
            if trace_op is None:
                raise ExportError(f"cannot export {self.describe(node)}: not supported by the "
                                  f"exporter (the supported ops: qat.deploy.optable.OPS)")
            trace_op(self, index, node)
        # (a detector's outputs are all one detection blob)
        outputs = list(dict.fromkeys(self.blob[index] for index in self.heads))
        return Graph(self.layers, outputs)


def trace(net, input_shape, input_names=('data',), detection=None):
    """The deployment graph of a converted (calibrated or trained) net.

    input_shape: (C, H, W) of one sample. detection: overrides of a detector's decoding
    (``optable.detection.DETECTION_OPTIONS``). Raises ExportError naming the op and block for
    anything that cannot be exported, and for an int8 layer whose input range is unset."""
    if len(input_shape) != 3:
        raise ExportError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if not quant_blocks(net):
        raise ExportError(f"{net.name} has no quantized blocks: call qat.convert_model first")
    graph = _Tracer(net, input_shape, tuple(input_names), detection).run()
    _clip_narrow_inputs(graph)
    return graph


def _clip_narrow_inputs(graph):
    """ncnn saturates every int8 input at +-127; a layer simulated with fewer input bits
    saturates at its codes' bounds, so it gets a Clip to [lo/s_in, hi/s_in] in front (exact:
    the clipped value times s_in rounds to the bound; unsigned codes: lo = 0)."""
    for position in range(len(graph.layers) - 1, -1, -1):
        layer = graph.layers[position]
        quant = layer.quant
        if quant is None or quant.input_scale is None or \
                (quant.input_bits == 8 and quant.input_signed):
            continue
        low, high = ops.qrange(quant.input_bits, quant.input_signed)
        limits = [float(np.float32(bound) / quant.input_scale) for bound in (low, high)]
        clip = Layer('Clip', layer.name + '_clip_input', [layer.inputs[0]],
                     {'low': limits[0], 'high': limits[1], 'int8_only': True})
        layer.inputs = [clip.name] + layer.inputs[1:]
        graph.layers.insert(position, clip)

