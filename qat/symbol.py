"""symbol: the one walker of a Gluon net's MXNet symbol graph.

Conv -> BatchNorm pairing (``qat.convert``), export tracing (``qat.deploy.graph``) and the
verifier's lookup of simulated nodes (``qat.deploy.verify``) all read the same dataflow, so
they share one reading of it: the ``tojson()`` nodes, who consumes what, which node is the
only consumer of another, and which block an op node belongs to (Gluon names a block's op
``<prefix>fwd`` and every node inside it ``<prefix>...``).

A block called more than once (DLA's one ``global_avg_pool`` after every level, Xception's
and DLA's shared ``relu``) gives several nodes one name. Such a node is named by its *key*:
the name, or ``<name>#<k>`` for the k-th node of that name in graph order (k from 0) when the
name is not unique. The float and the quantized traces of a net order their nodes alike
(a quantized block's extra nodes hang off its own input), so a key found in one names the
same node in the other.
"""
import json
import warnings
from collections import Counter

import mxnet as mx

from .nn import walk


def trace_symbol(net, input_names=('data',)):
    """The symbol of ``net`` called on ``mx.sym.var`` inputs; several outputs become one
    ``Group`` so that the graph's heads list them all. A net that cannot be traced raises
    whatever it raises (the callers word the error for their purpose)."""
    out = net(*[mx.sym.var(name) for name in input_names])
    if isinstance(out, (list, tuple)):
        out = mx.sym.Group(list(out))
    return out


def outputs_block(net, outputs, input_name='data'):
    """A ``SymbolBlock`` computing the symbols ``outputs`` (a list, usually nodes of
    ``trace_symbol(net)``) from the one input ``input_name``, with ``net``'s own parameters
    (shared, not copied): one graph call gives them all."""
    with warnings.catch_warnings():  # MXNet cannot infer the input's type before a call
        warnings.simplefilter('ignore', UserWarning)
        return mx.gluon.SymbolBlock(mx.sym.Group(list(outputs)), mx.sym.var(input_name),
                                    params=net.collect_params())


# Ops whose output is >= 0 (``SymbolGraph.non_negative``), and those that keep their data
# inputs' sign (every input >= 0 gives an output >= 0).
NON_NEGATIVE_ACTS = ('relu', 'sigmoid', 'softrelu')
NON_NEGATIVE_OPS = ('relu', 'sigmoid', 'hard_sigmoid', 'softmax', 'square', 'abs', 'exp')
KEEPS_SIGN = ('Pooling', 'Flatten', 'Reshape', 'reshape', 'transpose', 'expand_dims',
              'squeeze', 'Dropout', 'Concat', 'concat', 'elemwise_add', 'broadcast_add',
              '_plus', 'add_n', 'ElementWiseSum', 'elemwise_mul', 'broadcast_mul', '_mul',
              'identity', '_copy', 'BlockGrad', 'slice', 'slice_axis', 'SliceChannel',
              'split', 'UpSampling', 'Crop', 'max', 'mean', 'sum', 'broadcast_like', 'tile',
              'repeat', 'SwapAxis', 'swapaxes', 'Cast', 'amp_cast')
# keep the sign when their scalar is >= 0
SCALAR_KEEPS_SIGN = ('_plus_scalar', '_mul_scalar', '_div_scalar', '_maximum_scalar')


class SymbolGraph:
    """The parsed graph of ``symbol`` (usually ``trace_symbol(net, input_names)``).

    nodes: the ``tojson()`` node dicts, in topological order; heads: indices of the graph
    outputs; consumers: {node index: [indices of the nodes reading it]}; outputs: the names of
    all internal outputs (``<name>_output`` for an op, a variable's own name); shapes:
    {output name: shape}, inferred once for ``input_shapes`` ({input name: full shape}), or
    None without them. ``net`` (optional) answers which block a node belongs to.
    """

    def __init__(self, symbol, net=None, input_names=('data',), input_shapes=None):
        graph = json.loads(symbol.tojson())
        self.net, self.input_names = net, tuple(input_names)
        self.nodes = graph['nodes']
        self.heads = [head[0] for head in graph['heads']]
        self.consumers = {}
        for index, node in enumerate(self.nodes):
            for source, *_ in node.get('inputs', []):
                self.consumers.setdefault(source, []).append(index)
        self._counts = Counter(node['name'] for node in self.nodes)
        seen = Counter()
        self._occurrence = []  # per node: how many earlier nodes have its name
        for node in self.nodes:
            self._occurrence.append(seen[node['name']])
            seen[node['name']] += 1
        self.internals = symbol.get_internals()
        self.outputs = self.internals.list_outputs()
        self._positions = {}  # output name -> its positions in ``outputs``, in graph order
        for position, output in enumerate(self.outputs):
            self._positions.setdefault(output, []).append(position)
        self.shapes = None
        if input_shapes is not None:
            _, out_shapes, _ = self.internals.infer_shape(**input_shapes)
            self.shapes = dict(zip(self.outputs, out_shapes))
        # [net] + its descendants, in network order (the tie-break of ``owner``), each once
        # (a block registered in several slots is still one block).
        self._blocks = list({id(b): b for b in [net] + [child for *_, child in walk(net)]}
                            .values()) if net is not None else []
        self._by_op_name = {}
        for block in self._blocks[1:]:
            self._by_op_name.setdefault(block.prefix + 'fwd', []).append(block)

    def only_consumer(self, index):
        """The index of the one node reading node ``index``, or None if more or none read it
        or it is a graph output (then its value is needed as it is, so it cannot be folded
        into its consumer)."""
        users = self.consumers.get(index, [])
        if len(users) == 1 and index not in self.heads:
            return users[0]
        return None

    def data_inputs(self, node):
        """Indices of the inputs of ``node`` that carry data: op outputs and the net's inputs,
        not parameters."""
        return [source for source, *_ in node['inputs'] if self.nodes[source]['op'] != 'null'
                or self.nodes[source]['name'] in self.input_names]

    def unique(self, index):
        """True if no other node has node ``index``'s name (a name then identifies it)."""
        return self._counts[self.nodes[index]['name']] == 1

    def output_name(self, index):
        """The internal output name of node ``index`` (a key of ``shapes``)."""
        node = self.nodes[index]
        return node['name'] + ('' if node['op'] == 'null' else '_output')

    def shape(self, index):
        """The inferred output shape of node ``index`` (needs ``input_shapes``)."""
        return self.shapes[self.output_name(index)]

    def key(self, index):
        """The key of node ``index``: its name when no other node has it, else
        ``<name>#<k>``, k the number of earlier nodes with that name."""
        name = self.nodes[index]['name']
        return name if self.unique(index) else f"{name}#{self._occurrence[index]}"

    def _position(self, key):
        """Position in ``outputs`` of the single output of the op with key ``key``, or None."""
        name, _, occurrence = key.partition('#')
        positions = self._positions.get(name + '_output', [])
        k = int(occurrence or 0)
        return positions[k] if k < len(positions) else None

    def has_op(self, key):
        """True if the graph has an op with key ``key`` (a name, or ``<name>#<k>``) with the
        single output ``<name>_output``."""
        return self._position(key) is not None

    def op_output(self, key):
        """The symbol of the output of the op with key ``key``, to compute it on its own."""
        return self.internals[self._position(key)]

    def owner(self, name):
        """The innermost block whose prefix node ``name`` starts with (None if none does)."""
        owners = [b for b in self._blocks if b.prefix and name.startswith(b.prefix)]
        return max(owners, key=lambda b: len(b.prefix), default=None)

    def non_negative(self):
        """The indices of the nodes whose output is >= 0 whatever the input: a ReLU, a
        sigmoid, a clip from >= 0, and the ops in ``KEEPS_SIGN`` whose data inputs all are."""
        found = set()
        for index, node in enumerate(self.nodes):  # topological: inputs come first
            op, attrs = node['op'], node.get('attrs', {})
            if op == 'Activation':
                positive = attrs.get('act_type') in NON_NEGATIVE_ACTS
            elif op == 'clip':
                positive = float(attrs.get('a_min', '-1')) >= 0
            elif op == 'LeakyReLU':
                positive = attrs.get('act_type') in ('leaky', None) and \
                    float(attrs.get('slope', '0.25')) == 0
            else:
                positive = op in NON_NEGATIVE_OPS
            keeps = op in KEEPS_SIGN or (op in SCALAR_KEEPS_SIGN
                                         and float(attrs.get('scalar', '-1')) >= 0)
            if not positive and keeps:
                sources = self.data_inputs(node)
                positive = bool(sources) and all(source in found for source in sources)
            if positive:
                found.add(index)
        return found

    def blocks_of(self, name):
        """The descendant blocks whose op is named exactly ``name`` (``<prefix>fwd``); more
        than one when blocks share a prefix."""
        return self._by_op_name.get(name, [])
