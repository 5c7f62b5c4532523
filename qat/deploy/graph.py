"""trace: a converted Gluon net -> the deployment graph (``qat.deploy.ir``).

The net is traced symbolically in float mode, where every quantized block computes exactly
its float op under the float block's name (``<prefix>fwd``); each Convolution/FullyConnected
node is then matched to its quantized block by that name and gets the block's integer
weight codes and scales, computed by the same functions the training graph uses. Patterns
folded on the way: Convolution -> BatchNorm (the fold of ``qat.ops.fold_bn``), and a
Convolution/InnerProduct's only consumer being an activation (fused, as ncnn runs it).
Dropout and identities disappear. Any other op is an error naming the op and its block.
"""
import re

import numpy as np
from mxnet import nd

from .. import ops
from ..errors import UserError
from ..modes import temporary_mode
from ..nn import QConv2DBatchNorm, quant_blocks
from ..symbol import SymbolGraph, trace_symbol
from .ir import Graph, Layer, Quant

# MXNet op -> how it maps (the one table of supported ops; the handlers are below).
ELTWISE_OPS = {'elemwise_add': 'sum', '_Plus': 'sum', '_plus': 'sum', 'broadcast_add': 'sum',
               'add_n': 'sum', 'ElementWiseSum': 'sum', 'elemwise_mul': 'prod', '_Mul': 'prod',
               '_mul': 'prod', 'broadcast_mul': 'prod', '_maximum': 'max',
               'broadcast_maximum': 'max'}
PASS_THROUGH_OPS = ('Dropout', '_copy', 'identity')
PAD_MODES = ('constant', 'edge', 'reflect')  # MXNet Pad modes, all exact in ncnn Padding
SOFTMAX_OPS = ('softmax', 'SoftmaxActivation', 'SoftmaxOutput')


class ExportError(UserError):
    """The net cannot be exported as it is; the message names the op, layer or value."""


def _tuple(text, default):
    if text is None:
        return default
    return tuple(int(v) for v in re.findall(r'-?\d+', text))


def _bool(text, default=False):
    return default if text is None else text.strip() in ('True', 'true', '1')


def _activation(node):
    """The fused-activation tuple for an activation node, or None if it is not one."""
    op, attrs = node['op'], node.get('attrs', {})
    if op == 'Activation' and attrs.get('act_type') == 'relu':
        return ('relu',)
    if op == 'Activation' and attrs.get('act_type') == 'sigmoid':
        return ('sigmoid',)
    if op == 'sigmoid':
        return ('sigmoid',)
    if op == 'relu':
        return ('relu',)
    if op == 'LeakyReLU' and attrs.get('act_type', 'leaky') == 'leaky':
        return ('leaky', float(attrs.get('slope', 0.25)))
    if op == 'clip':
        return ('clip', float(attrs['a_min']), float(attrs['a_max']))
    return None


def _standalone_activation(act):
    """IR kind and params of an activation that stands alone."""
    kind = act[0]
    if kind == 'relu':
        return 'ReLU', {'slope': 0.0}
    if kind == 'leaky':
        return 'ReLU', {'slope': act[1]}
    if kind == 'clip':
        return 'Clip', {'low': act[1], 'high': act[2]}
    return 'Sigmoid', {}


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


def _quant(block, weight, bias):
    """Integer codes and scales of a quantized block for its (folded) float weight, computed
    with the training graph's own functions. Returns (Quant or None, weight, bias) where
    weight/bias are what the simulation computes with in float for a layer that ncnn runs
    in fp32."""
    mode, cfg = block.mode, block.config
    if not mode['quantize']:
        return None, weight, bias
    codes, s_w = block.weight_codes(weight)
    if not mode['quantize_input']:
        # Weight-only quantization: ncnn runs it in fp32 with the dequantized weights.
        return Quant(None, s_w.asnumpy().astype(np.float32), codes.asnumpy().astype(np.int8),
                     None, cfg.weight_bits), weight, bias
    if not cfg.input_signed:
        raise ExportError(f"{block.name}: unsigned input quantization cannot run in ncnn "
                          f"(int8 is signed, -127..127); use QuantConfig(input_signed=True)")
    s_in = block.input_scale()
    if s_in is None:
        raise ExportError(f"{block.name}: input range is unset (never calibrated or trained "
                          f"with input quantization); run qat.calibrate first")
    quant = Quant(input_scale=s_in,
                  weight_scales=s_w.asnumpy().astype(np.float32),
                  weight_codes=codes.asnumpy().astype(np.int8),
                  input_bits=cfg.input_bits, weight_bits=cfg.weight_bits)
    return quant, weight, bias


def _fold_real_bn(quant, weight, bias, bn_params, bn_attrs, groups, name):
    """Fold a BatchNorm the converter left in place (``bn_params`` = gamma, beta, mean, var)
    into the preceding conv (same fold function). The int8 codes stay as trained; their
    scales absorb the BN factor."""
    gamma, beta, mean, var = bn_params
    eps, fix_gamma = float(bn_attrs.get('eps', 1e-3)), _bool(bn_attrs.get('fix_gamma'), True)
    if bias is None:
        bias = nd.zeros((weight.shape[0],))
    folded_w, folded_b = ops.fold_bn(nd, weight, bias, gamma, beta, mean, var, eps, fix_gamma)
    if quant is not None:
        factor = ops.bn_factor(nd, gamma, var, eps, fix_gamma).asnumpy()
        if groups > 1 and weight.shape[0] != groups:
            raise ExportError(f"{name}: a BatchNorm after a grouped int8 conv needs fake BN "
                              f"(ncnn keeps one weight scale per group)")
        sign = np.where(factor < 0, -1, 1).astype(np.int8)
        magnitude = np.where(factor == 0, 1, np.abs(factor)).astype(np.float32)
        codes = quant.weight_codes * np.where(factor == 0, 0, sign).reshape(-1, 1, 1, 1)
        quant.weight_codes = codes.astype(np.int8)
        quant.weight_scales = (quant.weight_scales / magnitude).astype(np.float32)
    return quant, folded_w, folded_b


class _Tracer(SymbolGraph):
    """One pass over the float-mode graph of ``net`` (nodes, consumers, shapes: the
    ``SymbolGraph``), building the IR layers."""

    def __init__(self, net, input_shape, input_names):
        super().__init__(_float_trace(net, input_names), net, input_names,
                         {name: (1,) + tuple(input_shape) for name in input_names})
        self.input_shape = tuple(input_shape)
        self.blocks = block_index(net)
        self.values = _values(net)
        self.blob = {}        # node index -> IR layer name holding its output
        self.absorbed = set()  # node indices folded into an earlier layer
        self.layers, self.taken = [], set()

    # ----- helpers -----------------------------------------------------------------------
    def param(self, node, position):
        return self.values[self.nodes[node['inputs'][position][0]]['name']]

    def describe(self, node):
        """'op X (node N in block B)', B the block that owns N (``SymbolGraph.owner``)."""
        owner = self.owner(node['name'])
        where = f" in block {owner.name}" if owner is not None else ''
        return f"op {node['op']!r} (node {node['name']!r}{where})"

    def add(self, kind, index, inputs, params=None, weights=None, quant=None, name=None,
            source=None):
        node = self.nodes[index]
        layer = Layer(kind, _layer_name(name or node['name'], self.taken),
                      [self.blob[i] for i in inputs], params or {},
                      {k: v for k, v in (weights or {}).items() if v is not None}, quant,
                      source or self.key(index))
        self.layers.append(layer)
        self.blob[index] = layer.name
        return layer

    def fuse_activation(self, index, layer):
        """Absorb the only consumer of node ``index`` into ``layer`` if it is an activation."""
        user = self.only_consumer(index)
        if user is None:
            return index
        act = _activation(self.nodes[user])
        if act is None:
            return index
        layer.params['activation'] = act
        layer.source = self.key(user)
        self.absorbed.add(user)
        self.blob[user] = layer.name
        return user

    # ----- the ops -----------------------------------------------------------------------
    def run(self):
        for index, node in enumerate(self.nodes):
            if index in self.absorbed:
                continue
            op = node['op']
            if op == 'null':
                if node['name'] in self.input_names:
                    self.add('Input', index, [], {'shape': self.input_shape})
                continue
            handler = getattr(self, 'op_' + op, None)
            if handler is not None:
                handler(index, node)
            elif op in ELTWISE_OPS:
                self.op_eltwise(index, node)
            elif op in PASS_THROUGH_OPS:
                self.blob[index] = self.blob[self.data_inputs(node)[0]]
            elif op in SOFTMAX_OPS:
                self.op_softmax(index, node)
            elif _activation(node) is not None:
                kind, params = _standalone_activation(_activation(node))
                self.add(kind, index, self.data_inputs(node)[:1], params)
            else:
                raise ExportError(f"cannot export {self.describe(node)}: not supported by the "
                                  f"exporter (see qat.deploy.ir for the supported layers)")
        outputs = [self.blob[index] for index in self.heads]
        return Graph(self.layers, outputs)

    def _weighted(self, index, node, kind, params):
        """Convolution / FullyConnected with its quantized block, BN fold and activation."""
        attrs = node.get('attrs', {})
        no_bias = _bool(attrs.get('no_bias'))
        weight = self.param(node, 1)
        bias = None if no_bias else self.param(node, 2)
        block, _ = self.blocks.get(node['name'], (None, None))
        groups = params.get('groups', 1)
        end, name = index, (block.name if block is not None else node['name'])
        quant = None
        user = self.only_consumer(index) if kind == 'Convolution' else None
        bn_node = self.nodes[user] if user is not None else None
        folds_bn = bn_node is not None and bn_node['op'] == 'BatchNorm' \
            and int(bn_node.get('attrs', {}).get('axis', 1)) == 1
        bn_params = [self.param(bn_node, i) for i in range(1, 5)] if folds_bn else None
        if isinstance(block, QConv2DBatchNorm):
            weight, bias = block.folded_weight()
            quant, weight, bias = _quant(block, weight, bias)
            end = user
        else:
            if block is not None:
                quant, weight, bias = _quant(block, weight, bias)
            if folds_bn:
                quant, weight, bias = _fold_real_bn(quant, weight, bias, bn_params,
                                                    bn_node.get('attrs', {}), groups, name)
                end = user
        if end != index:
            self.absorbed.add(end)
        params['bias_term'] = bias is not None
        params['activation'] = None
        layer = self.add(kind, index, self.data_inputs(node)[:1], params,
                         {'weight': weight.asnumpy().astype(np.float32),
                          'bias': None if bias is None else bias.asnumpy().astype(np.float32)},
                         quant, name=name, source=self.key(end))
        self.blob[end] = layer.name
        self.fuse_activation(end, layer)
        return layer

    def op_Convolution(self, index, node):
        attrs = node.get('attrs', {})
        if attrs.get('layout', 'NCHW') != 'NCHW' or len(_tuple(attrs['kernel'], ())) != 2:
            raise ExportError(f"cannot export {self.describe(node)}: only 2-D NCHW "
                              f"convolutions are supported")
        params = {'num_output': int(attrs['num_filter']),
                  'kernel': _tuple(attrs['kernel'], None),
                  'stride': _tuple(attrs.get('stride'), (1, 1)) or (1, 1),
                  'pad': _tuple(attrs.get('pad'), (0, 0)) or (0, 0),
                  'dilate': _tuple(attrs.get('dilate'), (1, 1)) or (1, 1),
                  'groups': int(attrs.get('num_group', 1))}
        self._weighted(index, node, 'Convolution', params)

    def op_FullyConnected(self, index, node):
        attrs = node.get('attrs', {})
        source = self.data_inputs(node)[0]
        if not _bool(attrs.get('flatten'), True) and len(self.shape(source)) > 2:
            raise ExportError(f"cannot export {self.describe(node)}: Dense(flatten=False) on "
                              f"a {len(self.shape(source))}-D input")
        self._weighted(index, node, 'InnerProduct', {'num_output': int(attrs['num_hidden'])})

    def op_BatchNorm(self, index, node):
        """A BatchNorm not folded into a conv: ncnn's fp32 BatchNorm layer, the same
        parameters. The simulation computes it as ncnn does (``QBatchNorm`` with BN frozen:
        ``ops.batchnorm_ncnn``, docs/ncnn-int8-contract.md §3.6)."""
        attrs = node.get('attrs', {})
        if int(attrs.get('axis', 1)) != 1:
            raise ExportError(f"cannot export {self.describe(node)}: BatchNorm axis must be 1")
        gamma, beta, mean, var = (self.param(node, i).asnumpy() for i in range(1, 5))
        if _bool(attrs.get('fix_gamma'), True):
            gamma = np.ones_like(gamma)
        self.add('BatchNorm', index, self.data_inputs(node)[:1],
                 {'channels': len(mean), 'eps': float(attrs.get('eps', 1e-3))},
                 {'gamma': gamma, 'beta': beta, 'mean': mean, 'var': var})

    def op_Pooling(self, index, node):
        attrs = node.get('attrs', {})
        pool = attrs.get('pool_type', 'max')
        if pool not in ('max', 'avg') or attrs.get('layout', 'NCHW') != 'NCHW':
            raise ExportError(f"cannot export {self.describe(node)}: pool_type {pool!r} "
                              f"(only max and avg, NCHW)")
        params = {'pool': pool, 'kernel': _tuple(attrs.get('kernel'), (1, 1)),
                  'stride': _tuple(attrs.get('stride'), (1, 1)) or (1, 1),
                  'pad': _tuple(attrs.get('pad'), (0, 0)) or (0, 0),
                  'global_pool': _bool(attrs.get('global_pool')),
                  'full': attrs.get('pooling_convention', 'valid') == 'full',
                  'count_include_pad': _bool(attrs.get('count_include_pad'), True)}
        source = self.data_inputs(node)[0]
        if pool == 'avg' and params['full'] and not params['global_pool'] \
                and any(params['pad']) and _has_tail(self.shape(source), params):
            raise ExportError(f"cannot export {self.describe(node)}: average pooling with "
                              f"padding and a ceil-mode tail has no exact ncnn equivalent")
        self.add('Pooling', index, [source], params)

    def op_eltwise(self, index, node):
        sources = self.data_inputs(node)
        shapes = {self.shape(s) for s in sources}
        if len(sources) < 2 or len(shapes) != 1:
            raise ExportError(f"cannot export {self.describe(node)}: elementwise ops need "
                              f"inputs of one shape, got {sorted(shapes)}")
        self.add('Eltwise', index, sources, {'op': ELTWISE_OPS[node['op']]})

    def op_Concat(self, index, node):
        attrs = node.get('attrs', {})
        self.add('Concat', index, self.data_inputs(node), {'axis': int(attrs.get('dim', 1))})

    op_concat = op_Concat

    def op_Reshape(self, index, node):
        """Only as the first node of a channel shuffle (ShuffleNet's ``reshape(0, -4, g, -1,
        -2)``, ``swapaxes(1, 2)``, ``reshape(0, -3, -2)``), which becomes one ShuffleChannel."""
        shape = _tuple(node.get('attrs', {}).get('shape'), ())
        swap = self.only_consumer(index)
        back = self.only_consumer(swap) if swap is not None else None
        if not (len(shape) == 5 and shape[:2] == (0, -4) and shape[3:] == (-1, -2)
                and swap is not None and self.nodes[swap]['op'] == 'SwapAxis'
                and {int(self.nodes[swap]['attrs'].get(d, 0)) for d in ('dim1', 'dim2')}
                == {1, 2} and back is not None and self.nodes[back]['op'] == 'Reshape'
                and _tuple(self.nodes[back]['attrs'].get('shape'), ()) == (0, -3, -2)):
            raise ExportError(f"cannot export {self.describe(node)}: a Reshape is exported "
                              f"only as part of a channel shuffle (reshape, swapaxes(1, 2), "
                              f"reshape)")
        layer = self.add('ShuffleChannel', index, self.data_inputs(node)[:1],
                         {'group': shape[2]}, source=self.key(back))
        for absorbed in (swap, back):
            self.absorbed.add(absorbed)
            self.blob[absorbed] = layer.name

    def op_Pad(self, index, node):
        attrs = node.get('attrs', {})
        widths = _tuple(attrs.get('pad_width'), ())
        mode = attrs.get('mode', 'constant')
        if len(widths) != 8 or any(widths[:4]) or mode not in PAD_MODES:
            raise ExportError(f"cannot export {self.describe(node)}: only padding of the "
                              f"height and width of an NCHW tensor ({sorted(PAD_MODES)}), "
                              f"got pad_width {widths} mode {mode!r}")
        top, bottom, left, right = widths[4:]
        self.add('Padding', index, self.data_inputs(node)[:1],
                 {'top': top, 'bottom': bottom, 'left': left, 'right': right, 'mode': mode,
                  'value': float(attrs.get('constant_value', 0.0))})

    def op_Flatten(self, index, node):
        self.add('Flatten', index, self.data_inputs(node)[:1])

    op_flatten = op_Flatten

    def op_softmax(self, index, node):
        attrs = node.get('attrs', {})
        ndim = len(self.shape(index))
        if node['op'] == 'softmax':
            axis = int(attrs.get('axis', -1)) % ndim
        else:  # SoftmaxActivation / SoftmaxOutput: over the channel axis
            axis = 1
        self.add('Softmax', index, self.data_inputs(node)[:1], {'axis': axis})


def _has_tail(shape, params):
    """True if the 'full' (ceil) convention gives a larger output than 'valid' (floor)."""
    for size, k, s, p in zip(shape[2:], params['kernel'], params['stride'], params['pad']):
        if (size + 2 * p - k) % s:
            return True
    return False


def trace(net, input_shape, input_names=('data',)):
    """The deployment graph of a converted (calibrated or trained) net.

    input_shape: (C, H, W) of one sample. Raises ExportError naming the op and block for
    anything that cannot be exported, and for an int8 layer whose input range is unset."""
    if len(input_shape) != 3:
        raise ExportError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if not quant_blocks(net):
        raise ExportError(f"{net.name} has no quantized blocks: call qat.convert_model first")
    graph = _Tracer(net, input_shape, tuple(input_names)).run()
    _clip_narrow_inputs(graph)
    return graph


def _clip_narrow_inputs(graph):
    """ncnn saturates every int8 input at +-127; a layer simulated with fewer input bits
    saturates at qmax, so it gets a Clip to [-qmax/s_in, qmax/s_in] in front (exact: the
    clipped value times s_in rounds to qmax)."""
    for position in range(len(graph.layers) - 1, -1, -1):
        layer = graph.layers[position]
        quant = layer.quant
        if quant is None or quant.input_scale is None or quant.input_bits == 8:
            continue
        _, high = ops.qrange(quant.input_bits)
        limit = float(np.float32(high) / quant.input_scale)
        clip = Layer('Clip', layer.name + '_clip_input', [layer.inputs[0]],
                     {'low': -limit, 'high': limit, 'int8_only': True})
        layer.inputs = [clip.name] + layer.inputs[1:]
        graph.layers.insert(position, clip)

