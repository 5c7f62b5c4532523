"""Elementwise arithmetic between tensors and with scalars.

Inputs of one shape: ncnn Eltwise (sum, prod, max), Caffe Eltwise. Inputs of different
shapes (MXNet's ``broadcast_*``, e.g. an SE block's ``x * w`` with w of shape (N, C, 1, 1)),
or another op (sub, div, min): ncnn BinaryOp; a product with a (1, C, 1, 1) parameter: ncnn
Scale, which broadcasts the same way. A scalar
operand: BinaryOp with ``with_scalar``. abs, negative, floor, ceil, square: ncnn UnaryOp. Add, subtract, multiply, max and min round the same
in MXNet and ncnn (exact); ncnn's division is a reciprocal estimate refined once (GCC's
fast-math), so a division can differ from MXNet's in the last bit.
"""
import numpy as np

from .base import caffe_layer, refuse

ELTWISE_OPS = {'elemwise_add': 'sum', '_Plus': 'sum', '_plus': 'sum', 'broadcast_add': 'sum',
               'broadcast_plus': 'sum', 'add_n': 'sum', 'ElementWiseSum': 'sum',
               'elemwise_mul': 'prod', '_Mul': 'prod', '_mul': 'prod', 'broadcast_mul': 'prod',
               '_maximum': 'max', '_Maximum': 'max', 'broadcast_maximum': 'max'}
EQUAL_SHAPE_AS_BINARY = {'sum': 'add', 'prod': 'mul', 'max': 'max'}
BINARY_OPS = {'elemwise_sub': 'sub', '_Minus': 'sub', '_minus': 'sub', '_sub': 'sub',
              'broadcast_sub': 'sub', 'broadcast_minus': 'sub',
              'elemwise_div': 'div', '_Div': 'div', '_div': 'div', 'broadcast_div': 'div',
              '_minimum': 'min', '_Minimum': 'min', 'broadcast_minimum': 'min'}
SCALAR_OPS = {'_plus_scalar': 'add', '_PlusScalar': 'add', '_minus_scalar': 'sub',
              '_MinusScalar': 'sub', '_rminus_scalar': 'rsub', '_RMinusScalar': 'rsub',
              '_mul_scalar': 'mul', '_MulScalar': 'mul', '_div_scalar': 'div',
              '_DivScalar': 'div', '_rdiv_scalar': 'rdiv', '_RDivScalar': 'rdiv',
              '_maximum_scalar': 'max', '_MaximumScalar': 'max', '_minimum_scalar': 'min',
              '_MinimumScalar': 'min'}
# exact unary ops -> ncnn UnaryOp operation ids (0=)
UNARY_OPS = {'abs': 0, 'negative': 1, '_np_negative': 1, 'floor': 2, 'ceil': 3, 'square': 4}
# ncnn BinaryOp operation ids (0=)
NCNN_BINARY = {'add': 0, 'sub': 1, 'mul': 2, 'div': 3, 'max': 4, 'min': 5, 'rsub': 7, 'rdiv': 8}
CAFFE_ELTWISE = {'sum': 'SUM', 'prod': 'PROD', 'max': 'MAX'}


CONSTANT_LIKE = {'ones_like': 1.0, 'zeros_like': 0.0}  # tensors of one value, x's shape


def trace_constant_like(t, index, node):
    """``ones_like(x)`` / ``zeros_like(x)``: no layer; the elementwise op reading it takes
    its value as a scalar operand (residual attention's ``1 + mask``)."""


def _channel_constant(t, node, sources):
    """The (C,) values of a multiply's parameter operand shaped (1, C, 1, 1) or (1,) (VGG-SSD's
    ``x * init_scale``), or None."""
    params = [source for source, *_ in node['inputs'] if source not in sources]
    if node['op'] not in ('broadcast_mul', 'elemwise_mul', '_mul') or len(sources) != 1 \
            or len(params) != 1 or t.nodes[params[0]]['name'] not in t.values:
        return None
    value = t.values[t.nodes[params[0]]['name']].asnumpy().astype(np.float32)
    channels = t.shape(sources[0])[1]
    if value.size == 1:
        return np.full(channels, value.reshape(-1)[0], np.float32)
    return value.reshape(-1) if value.shape == (1, channels, 1, 1) else None


def trace_elementwise(t, index, node):
    sources = t.data_inputs(node)
    scale = _channel_constant(t, node, sources)
    if scale is not None:  # a per-channel product: exact
        t.add('Scale', index, sources, {}, {'scale': scale})
        return
    constants = [s for s in sources if t.nodes[s]['op'] in CONSTANT_LIKE]
    if len(sources) == 2 and len(constants) == 1:
        (tensor,) = [s for s in sources if s not in constants]
        op = BINARY_OPS.get(node['op']) or EQUAL_SHAPE_AS_BINARY.get(ELTWISE_OPS.get(node['op']))
        if op is None or t.shape(tensor) != t.shape(index):
            raise refuse(t, node, "only add, sub, mul, max, min of a tensor and a same-shaped "
                                  "constant")
        if op in ('sub', 'div') and sources[0] in constants:
            op = 'r' + op
        t.add('BinaryOp', index, [tensor],
              {'op': op, 'scalar': CONSTANT_LIKE[t.nodes[constants[0]]['op']]})
        return
    shapes = {t.shape(s) for s in sources}
    if len(sources) < 2:
        raise refuse(t, node, "an elementwise op needs two or more tensor inputs")
    op = ELTWISE_OPS.get(node['op'])
    if len(shapes) == 1 and op is not None:
        t.add('Eltwise', index, sources, {'op': op})
        return
    if len(sources) != 2:
        raise refuse(t, node, f"an elementwise op on {len(sources)} inputs of different "
                              f"shapes {sorted(shapes)}")
    a, b = (t.shape(s) for s in sources)
    if len(a) != len(b) or any(x != y and 1 not in (x, y) for x, y in zip(a, b)) \
            or a[0] != b[0]:
        raise refuse(t, node, f"shapes {a} and {b} do not broadcast per sample")
    binary = EQUAL_SHAPE_AS_BINARY[op] if op is not None else BINARY_OPS[node['op']]
    t.add('BinaryOp', index, sources, {'op': binary})


def trace_scalar(t, index, node):
    t.add('BinaryOp', index, t.data_inputs(node)[:1],
          {'op': SCALAR_OPS[node['op']], 'scalar': float(node['attrs']['scalar'])})


def trace_unary(t, index, node):
    t.add('UnaryOp', index, t.data_inputs(node)[:1], {'op': node['op']})


def ncnn_unary(layer, graph, int8, guarded, out):
    return 'UnaryOp', [(0, UNARY_OPS[layer.params['op']])]


def ncnn_scale(layer, graph, int8, guarded, out):
    scale = layer.weights['scale']
    out.raw(scale)  # Scale reads raw float32 (no tag)
    return 'Scale', [(0, int(scale.size)), (1, 0)]


def ncnn_binary(layer, graph, int8, guarded, out):
    p = layer.params
    pairs = [(0, NCNN_BINARY[p['op']])]
    if 'scalar' in p:
        pairs += [(1, 1), (2, float(p['scalar']))]
    return 'BinaryOp', pairs


def caffe_eltwise(layer, inputs, taken):
    return [caffe_layer(layer.name, 'Eltwise', layer.inputs, layer.name,
                        eltwise_param={'operation': CAFFE_ELTWISE[layer.params['op']]})]
