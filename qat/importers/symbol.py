"""MXNet symbol files (``x-symbol.json`` + ``x-0000.params``, what ``HybridBlock.export``
writes) into a GraphNet of standard Gluon layers.

The graph is read with ``qat.symbol.SymbolGraph`` (the package's one symbol walker). Each
op node becomes one block named after the node (a Gluon export's ``<block>_fwd`` loses its
``_fwd``, so the blocks and parameters keep their original names): Convolution ->
``nn.Conv2D``, Deconvolution -> ``nn.Conv2DTranspose``, FullyConnected -> ``nn.Dense``,
BatchNorm -> ``nn.BatchNorm``, Activation ->
``nn.Activation``, LeakyReLU -> ``nn.LeakyReLU`` / ``nn.PReLU`` / ``nn.ELU`` / ``nn.SELU`` /
``nn.GELU``, 2-D max / average / global pooling -> the ``nn`` pooling blocks; any other
operator MXNet has becomes an ``Op`` block calling it with the node's attributes (tensors it
reads from the params file are held as constants). An op MXNet does not know, or a weighted
op not listed, is an UnsupportedLayerError naming the node, its op and the file.
"""
import ast
import glob
import json
import os

import mxnet as mx
from mxnet.gluon import nn

from ..errors import reason
from ..symbol import SymbolGraph, trace_symbol
from .graph import Builder, ModelFileError, Op, files_there, resolve_op, unsupported

SUFFIX = '-symbol.json'


def weights_next_to(path):
    """``x-0000.params`` for ``x-symbol.json`` (the highest epoch when there are several)."""
    stem = path[:-len(SUFFIX)] if path.endswith(SUFFIX) else os.path.splitext(path)[0]
    found = sorted(glob.glob(glob.escape(stem) + '-[0-9][0-9][0-9][0-9].params'))
    return found[-1] if found else stem + '-0000.params'


def read(path, weights=None):
    """The GraphNet of the symbol file ``path`` with the parameters ``weights`` (default:
    next to it)."""
    weights = files_there(path, weights or weights_next_to(path))
    try:
        symbol = mx.sym.load(path)
    except (mx.base.MXNetError, ValueError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path}: not an MXNet symbol file: {reason(err)}") from None
    try:
        loaded = mx.nd.load(weights)
    except mx.base.MXNetError as err:
        raise ModelFileError(f"{weights}: not an MXNet parameter file: {reason(err)}") from None
    params = {key.split(':', 1)[1] if key.startswith(('arg:', 'aux:')) else key:
              value.asnumpy() for key, value in loaded.items()}
    return from_symbol(symbol, params, path)


def from_block(block, input_names=('data',)):
    """The GraphNet of a Gluon block that has no convertible children, such as a
    ``SymbolBlock`` (``SymbolBlock.imports``): its traced graph with its parameters."""
    params = {p.name: p.data().asnumpy() for p in block.collect_params().values()}
    return from_symbol(trace_symbol(block, input_names), params, f"<{block.name}>")


def _value(text):
    """A symbol attribute as a Python value: '(3, 3)' -> (3, 3), 'True' -> True, '64' -> 64;
    other strings stay strings."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {'true': True, 'false': False}.get(text.lower(), text)


def _pair(attrs, key, default):
    value = _value(attrs[key]) if key in attrs else default
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return value if len(value) != 1 else value * 2


def _flag(attrs, key, default):
    return bool(_value(attrs[key])) if key in attrs else default


def _convolution(attrs, w, path, name):
    if len(w['weight'].shape) != 4 or attrs.get('layout', 'NCHW') != 'NCHW':
        raise unsupported(path, name, 'Convolution', 'only 2-D NCHW convolutions')
    groups = int(attrs.get('num_group', 1))
    channels, per_group, *kernel = w['weight'].shape
    return lambda prefix: nn.Conv2D(
        channels, tuple(kernel), strides=_pair(attrs, 'stride', 1),
        padding=_pair(attrs, 'pad', 0), dilation=_pair(attrs, 'dilate', 1), groups=groups,
        use_bias='bias' in w, in_channels=per_group * groups, prefix=prefix)


def _deconvolution(attrs, w, path, name):
    if len(w['weight'].shape) != 4 or attrs.get('layout', 'NCHW') != 'NCHW' \
            or attrs.get('target_shape', '()') not in ('()', '(0, 0)', '[]'):
        raise unsupported(path, name, 'Deconvolution', 'only 2-D NCHW, without target_shape')
    groups = int(attrs.get('num_group', 1))
    inputs, per_group, *kernel = w['weight'].shape
    return lambda prefix: nn.Conv2DTranspose(
        per_group * groups, tuple(kernel), strides=_pair(attrs, 'stride', 1),
        padding=_pair(attrs, 'pad', 0), output_padding=_pair(attrs, 'adj', 0),
        dilation=_pair(attrs, 'dilate', 1), groups=groups,
        use_bias='bias' in w and not _flag(attrs, 'no_bias', False), in_channels=inputs,
        prefix=prefix)


def _fully_connected(attrs, w, path, name):
    units, inputs = w['weight'].shape
    return lambda prefix: nn.Dense(units, use_bias='bias' in w,
                                   flatten=_flag(attrs, 'flatten', True), in_units=inputs,
                                   prefix=prefix)


def _batchnorm(attrs, w, path, name):
    return lambda prefix: nn.BatchNorm(
        axis=int(attrs.get('axis', 1)), momentum=float(attrs.get('momentum', 0.9)),
        epsilon=float(attrs.get('eps', 1e-3)), scale=not _flag(attrs, 'fix_gamma', True),
        use_global_stats=_flag(attrs, 'use_global_stats', False),
        in_channels=w['gamma'].shape[0], prefix=prefix)


def _activation(attrs, w, path, name):
    return lambda prefix: nn.Activation(attrs['act_type'], prefix=prefix)


def _leaky(attrs, w, path, name):
    kind, slope = attrs.get('act_type', 'leaky'), float(attrs.get('slope', 0.25))
    makers = {'leaky': lambda prefix: nn.LeakyReLU(slope, prefix=prefix),
              'prelu': lambda prefix: nn.PReLU(in_channels=w['gamma'].size, prefix=prefix),
              'elu': lambda prefix: nn.ELU(slope, prefix=prefix),
              'selu': lambda prefix: nn.SELU(prefix=prefix),
              'gelu': lambda prefix: nn.GELU(prefix=prefix)}
    if kind not in makers:
        raise unsupported(path, name, 'LeakyReLU', f"act_type {kind!r}")
    return makers[kind]


def _pooling(attrs, w, path, name):
    kind = attrs.get('pool_type', 'max')
    convention = attrs.get('pooling_convention', 'valid')
    if kind not in ('max', 'avg') or convention not in ('valid', 'full') \
            or attrs.get('layout', 'NCHW') != 'NCHW' \
            or (not _flag(attrs, 'global_pool', False) and len(_pair(attrs, 'kernel', 1)) != 2):
        return None  # computed by the operator itself
    if _flag(attrs, 'global_pool', False):
        block = nn.GlobalMaxPool2D if kind == 'max' else nn.GlobalAvgPool2D
        return lambda prefix: block(prefix=prefix)
    common = dict(pool_size=_pair(attrs, 'kernel', 1), strides=_pair(attrs, 'stride', 1),
                  padding=_pair(attrs, 'pad', 0), ceil_mode=convention == 'full')
    if kind == 'max':
        return lambda prefix: nn.MaxPool2D(**common, prefix=prefix)
    include = _flag(attrs, 'count_include_pad', True)
    return lambda prefix: nn.AvgPool2D(**common, count_include_pad=include, prefix=prefix)


# op -> (the names of its weight inputs after the data, maker(attrs, weights, path, node
# name) -> block maker(prefix), or None: the op itself, as an Op block)
LAYERS = {
    'Convolution': (('weight', 'bias'), _convolution),
    'Deconvolution': (('weight', 'bias'), _deconvolution),
    'FullyConnected': (('weight', 'bias'), _fully_connected),
    'BatchNorm': (('gamma', 'beta', 'running_mean', 'running_var'), _batchnorm),
    'Activation': ((), _activation),
    'LeakyReLU': (('gamma',), _leaky),
    'Pooling': ((), _pooling),
}
# ops with state or subgraphs, which one fixed operator call does not express
NOT_AT_INFERENCE = ('RNN', 'Custom', '_foreach', '_while_loop', '_cond')
# ops whose non-data inputs are labels, dropped at inference
LOSS_OUTPUTS = {'SoftmaxOutput': 'softmax', 'LinearRegressionOutput': '_copy',
                'LogisticRegressionOutput': 'sigmoid'}


def layer_name(node_name):
    """A Gluon export names a block's op ``<block prefix>fwd``: the block is ``<block>``."""
    return node_name[:-len('_fwd')] if node_name.endswith('_fwd') else node_name


def from_symbol(symbol, params, path):
    """The GraphNet of ``symbol`` with ``params`` ({name: numpy array}); ``path`` names the
    source in errors."""
    nodes = json.loads(symbol.tojson())['nodes']
    labels = {src for node in nodes if node['op'] in LOSS_OUTPUTS
              for src, *_ in node['inputs'][1:]}
    inputs = [node['name'] for index, node in enumerate(nodes) if node['op'] == 'null'
              and node['name'] not in params and index not in labels]
    graph = SymbolGraph(symbol, input_names=inputs)
    builder = Builder(path)
    for index, node in enumerate(graph.nodes):
        if node['op'] == 'null':
            continue
        _add_node(builder, graph, index, node, params, path)
    heads = json.loads(symbol.tojson())['heads']
    outputs = [_blob(graph, source, output) for source, output, *_ in heads]
    return builder.net(inputs, outputs)


def _blob(graph, index, output=0):
    node = graph.nodes[index]
    return node['name'] if node['op'] == 'null' else f"{node['name']}:{output}"


def _add_node(builder, graph, index, node, params, path):
    op, name = node['op'], node['name']
    attrs = {k: v for k, v in node.get('attrs', {}).items() if not k.startswith('__')}
    data = graph.data_inputs(node)
    weight_inputs = [graph.nodes[s]['name'] for s, *_ in node['inputs']
                     if graph.nodes[s]['op'] == 'null' and graph.nodes[s]['name'] in params]
    bottoms = [_blob(graph, s, o) for s, o, *_ in node['inputs'] if s in data]
    outputs = int(_value(attrs['num_outputs'])) if op in ('SliceChannel', 'split') \
        and 'num_outputs' in attrs else 1
    tops = [f"{name}:{k}" for k in range(outputs)]
    maker = None
    if op in LAYERS:
        slots, rule = LAYERS[op]
        weights = dict(zip(slots, (params[n] for n in weight_inputs)))
        maker = rule(attrs, weights, path, name)
        if maker is not None:
            if op == 'LeakyReLU' and 'gamma' in weights:
                weights = {'alpha': weights['gamma']}
            builder.add(layer_name(name), maker, bottoms, tops, weights)
            return
    if op in LOSS_OUTPUTS:
        op, attrs, bottoms = LOSS_OUTPUTS[op], {}, bottoms[:1]
    if resolve_op(mx.sym, op) is None or op in NOT_AT_INFERENCE:
        raise unsupported(path, name, op)
    constants = {f"c{k}": params[n] for k, n in enumerate(weight_inputs)}
    order = []
    for source, *_ in node['inputs']:
        source_name = graph.nodes[source]['name']
        if source_name in weight_inputs:
            order.append(f"c{weight_inputs.index(source_name)}")
        elif source in data:
            order.append(f"#{len([o for o in order if o.startswith('#')])}")
    builder.add(layer_name(name), lambda prefix: Op(op, attrs, constants, order or None,
                                                     prefix=prefix),
                bottoms, tops, constants)
