"""ONNX models (``x.onnx``, weights inside) into a GraphNet of standard Gluon layers.

Read directly with the ``onnx`` package (``pip install onnx``): each node becomes one block
named after the node (Conv -> ``nn.Conv2D``, Gemm / MatMul by a constant -> ``nn.Dense``,
BatchNormalization -> ``nn.BatchNorm``, pooling -> the ``nn`` pooling blocks, activations,
and ``Op`` blocks for Add / Concat / Reshape / Softmax and the rest; see ``NODES``). A model
with a node this reader does not know goes through MXNet's own ONNX import
(``mx.contrib.onnx.import_model``) and the symbol importer instead; when that fails too,
the error names the node this reader stopped at, its op and the file.
"""
import numpy as np
import mxnet as mx
from mxnet.gluon import nn

from ..errors import reason
from .graph import Builder, Chain, Gated, ModelFileError, Op, UnsupportedLayerError, unsupported
from .symbol import from_symbol, layer_name

SUFFIX = '.onnx'
BATCH = -(2 ** 40)  # the batch size as a Shape node reports it (kept apart from real sizes)


def _onnx():
    try:
        import onnx  # optional: only for ONNX files
    except ImportError:
        raise ModelFileError("reading ONNX files needs the onnx package: pip install onnx "
                             "(or pip install 'gluon-qat[onnx]')") from None
    return onnx


def read(path, weights=None):
    """The GraphNet of the ONNX file ``path`` (``weights`` unused: they are inside)."""
    onnx = _onnx()
    try:
        model = onnx.load(path)
    except Exception as err:  # protobuf's DecodeError: not an ONNX file
        raise ModelFileError(f"{path}: not a readable ONNX file: {err}") from None
    try:
        return _read_graph(onnx, model, path)
    except UnsupportedLayerError as first:
        try:
            symbol, args, aux = mx.contrib.onnx.import_model(path)
        except Exception as err:  # MXNet's importer raises anything on an op it lacks
            raise UnsupportedLayerError(f"{first} (MXNet's ONNX import fails too: "
                                        f"{reason(err)})") from None
        return from_symbol(symbol, {k: v.asnumpy() for k, v in {**args, **aux}.items()}, path)


def _read_graph(onnx, model, path):
    from onnx import numpy_helper
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')), 13)
    inputs = [i for i in graph.input if i.name not in constants]
    builder = Builder(path)
    # a symbolic size (the batch) is traced as 1: a Shape node sees BATCH in its place
    builder.input_shapes = {i.name: tuple(d.dim_value or 1 for d in
                                          i.type.tensor_type.shape.dim) for i in inputs}
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        name = layer_name(node.name or node.output[0])
        if node.op_type == 'Constant':
            constants[node.output[0]] = numpy_helper.to_array(attrs['value'])
            continue
        data = [i for i in node.input if i and i not in constants]
        if node.op_type == 'Shape' and len(data) == 1:
            constants[node.output[0]] = np.array(
                (BATCH,) + builder.shape(data[0], builder.input_shapes)[1:], np.int64)
            continue
        if not data and node.op_type in FOLD:  # shape arithmetic: computed here, once
            constants[node.output[0]] = FOLD[node.op_type](
                [constants[i] if i else None for i in node.input], attrs)
            continue
        if node.op_type not in NODES:
            raise unsupported(path, name, node.op_type)
        NODES[node.op_type](_Node(builder, name, node, attrs, data, constants, path, opset))
    shape = []
    if inputs:
        dims = inputs[0].type.tensor_type.shape.dim
        shape = [d.dim_value for d in dims][1:]
    return builder.net([i.name for i in inputs], [o.name for o in graph.output],
                       preprocess={'shape': tuple(shape)} if all(shape) and shape else {})


class _Node:
    """One ONNX node being read: its block name, attributes, data inputs and constants."""

    def __init__(self, builder, name, node, attrs, data, constants, path, opset):
        self.builder, self.name, self.node, self.attrs = builder, name, node, attrs
        self.data, self.constants, self.path, self.opset = data, constants, path, opset

    def const(self, k, default=None):
        """The constant input ``k`` (None / ``default`` when absent or not a constant)."""
        inputs = self.node.input
        if k < len(inputs) and inputs[k] in self.constants:
            return self.constants[inputs[k]]
        return default

    def add(self, make, weights=None, tops=None):
        return self.builder.add(self.name, make, self.data, tops or list(self.node.output),
                                weights)

    def op(self, op, attrs=None, **kwargs):
        self.add(lambda prefix: Op(op, attrs, prefix=prefix, **kwargs))

    def refuse(self, why):
        return unsupported(self.path, self.name, self.node.op_type, why)


def _pads(n, rank=2):
    """Symmetric ``pads`` [begin..., end...] as (h, w); asymmetric ones are refused."""
    pads = list(n.attrs.get('pads', [0] * 2 * rank))
    if pads[:rank] != pads[rank:] or n.attrs.get('auto_pad', 'NOTSET') != 'NOTSET':
        raise n.refuse(f"pads {pads} / auto_pad: only symmetric explicit padding")
    return tuple(pads[:rank])


def _conv(n):
    weight, bias = n.const(1), n.const(2)
    if weight is None or weight.ndim != 4:
        raise n.refuse('only 2-D convolutions with constant weights')
    groups = n.attrs.get('group', 1)
    channels, per_group, *kernel = weight.shape
    weights = {'weight': weight}
    if bias is not None:
        weights['bias'] = bias
    n.add(lambda prefix: nn.Conv2D(
        channels, tuple(kernel), strides=tuple(n.attrs.get('strides', (1, 1))),
        padding=_pads(n), dilation=tuple(n.attrs.get('dilations', (1, 1))), groups=groups,
        use_bias=bias is not None, in_channels=per_group * groups, prefix=prefix), weights)


def _gemm(n):
    weight, bias = n.const(1), n.const(2)
    if weight is None or n.attrs.get('transA', 0):
        raise n.refuse('only x @ W (+ C) with constant W')
    weight = weight * n.attrs.get('alpha', 1.0)
    if not n.attrs.get('transB', 0):
        weight = weight.T
    weights = {'weight': np.ascontiguousarray(weight)}
    if bias is not None:
        weights['bias'] = np.broadcast_to(bias * n.attrs.get('beta', 1.0),
                                          weight.shape[:1]).copy()
    units, inputs = weight.shape
    n.add(lambda prefix: nn.Dense(units, use_bias=bias is not None, in_units=inputs,
                                  prefix=prefix), weights)


def _matmul(n):
    weight = n.const(1)
    if weight is None or weight.ndim != 2:
        raise n.refuse('only x @ W with a constant 2-D W')
    inputs, units = weight.shape
    n.add(lambda prefix: nn.Dense(units, use_bias=False, flatten=False, in_units=inputs,
                                  prefix=prefix), {'weight': np.ascontiguousarray(weight.T)})


def _batchnorm(n):
    gamma, beta, mean, var = (n.const(k) for k in range(1, 5))
    if any(v is None for v in (gamma, beta, mean, var)):
        raise n.refuse('statistics that are not constants')
    n.add(lambda prefix: nn.BatchNorm(epsilon=n.attrs.get('epsilon', 1e-5),
                                      momentum=n.attrs.get('momentum', 0.9),
                                      in_channels=gamma.size, prefix=prefix),
          {'gamma': gamma, 'beta': beta, 'running_mean': mean, 'running_var': var})


def _pool(n):
    kernel = tuple(n.attrs['kernel_shape'])
    if len(kernel) != 2:
        raise n.refuse('only 2-D pooling')
    common = dict(pool_size=kernel, strides=tuple(n.attrs.get('strides', (1, 1))),
                  padding=_pads(n), ceil_mode=bool(n.attrs.get('ceil_mode', 0)))
    if n.node.op_type == 'MaxPool':
        if len(n.node.output) > 1 or n.attrs.get('dilations', [1, 1]) != [1, 1]:
            raise n.refuse('indices or dilations')
        return n.add(lambda prefix: nn.MaxPool2D(**common, prefix=prefix))
    include = bool(n.attrs.get('count_include_pad', 0))
    return n.add(lambda prefix: nn.AvgPool2D(**common, count_include_pad=include,
                                             prefix=prefix))


def _global(block):
    return lambda n: n.add(lambda prefix: block(prefix=prefix))


def _clip(n):
    low = n.const(1, np.array(n.attrs.get('min', -3.4e38)))
    high = n.const(2, np.array(n.attrs.get('max', 3.4e38)))
    n.op('clip', {'a_min': float(low), 'a_max': float(high)})


BROADCAST = {'Add': 'add', 'Sub': 'sub', 'Mul': 'mul', 'Div': 'div', 'Max': 'maximum',
             'Min': 'minimum', 'Pow': 'power'}
SCALAR = {'Add': ('_plus_scalar', '_plus_scalar'), 'Sub': ('_minus_scalar', '_rminus_scalar'),
          'Mul': ('_mul_scalar', '_mul_scalar'), 'Div': ('_div_scalar', '_rdiv_scalar'),
          'Max': ('_maximum_scalar', '_maximum_scalar'),
          'Min': ('_minimum_scalar', '_minimum_scalar'), 'Pow': ('_power_scalar', None)}


def _binary(n):
    op = n.node.op_type
    if len(n.data) == 2:
        return n.op(f"broadcast_{BROADCAST[op]}")
    if len(n.data) != 1 or len(n.node.input) != 2:
        raise n.refuse('two inputs, at least one of them data')
    constant_first = n.node.input[0] in n.constants
    value = n.const(0 if constant_first else 1)
    if value.size == 1 and SCALAR[op][constant_first]:
        return n.op(SCALAR[op][constant_first], {'scalar': float(value.ravel()[0])})
    # a tensor: rank 4 so that MXNet broadcasts it against (N, C, H, W) like numpy does
    value = value.reshape((1,) * max(0, 4 - value.ndim) + value.shape).astype(np.float32)
    order = ['c0', '#0'] if constant_first else ['#0', 'c0']
    n.add(lambda prefix: Op(f"broadcast_{BROADCAST[op]}", constants={'c0': value},
                            order=order, prefix=prefix), {'c0': value})


def _reshape(n):
    shape = n.const(1)
    if shape is None or n.attrs.get('allowzero', 0):
        raise n.refuse('a shape that is not a constant')
    # the batch size read by a Shape node: MXNet's 0 copies it
    n.op('Reshape', {'shape': tuple(0 if d == BATCH else int(d) for d in shape)})


def _softmax(n):
    axis = n.attrs.get('axis', 1 if n.opset < 13 else -1)
    n.op('softmax', {'axis': axis})


def _flatten(n):
    if n.attrs.get('axis', 1) != 1:
        raise n.refuse('axis != 1')
    n.op('Flatten')


def _identity(n):
    n.builder.alias(n.node.output[0], n.data[0])


def _prelu(n):
    slope = n.const(1)
    if slope is None:
        raise n.refuse('slopes that are not constants')
    slope = slope.ravel()
    n.add(lambda prefix: nn.PReLU(in_channels=slope.size, prefix=prefix), {'alpha': slope})


def _simple(make):
    return lambda n: n.add(lambda prefix: make(n.attrs, prefix))


def _axes(n, k=1):
    """The ``axes`` of a node: its attribute (older opsets) or its constant input ``k``."""
    axes = n.attrs.get('axes', n.const(k))
    return None if axes is None else tuple(int(a) for a in np.ravel(axes))


def _reduce(n):
    op = {'ReduceMean': 'mean', 'ReduceMax': 'max', 'ReduceSum': 'sum',
          'ReduceMin': 'min'}[n.node.op_type]
    axes = _axes(n)
    attrs = {'keepdims': bool(n.attrs.get('keepdims', 1))}
    if axes:
        attrs['axis'] = axes
    n.op(op, attrs)


def _squeeze(n):
    axes = _axes(n)
    if n.node.op_type == 'Squeeze':
        return n.op('squeeze', {'axis': axes} if axes else {})
    if axes is None or len(axes) != 1:
        raise n.refuse('one constant axis')
    n.op('expand_dims', {'axis': axes[0]})


def _pad(n):
    pads = n.attrs.get('pads', n.const(1))
    value = n.const(2, np.array(n.attrs.get('value', 0.0)))
    mode = {'constant': 'constant', 'edge': 'edge', 'reflect': 'reflect'}.get(
        n.attrs.get('mode', 'constant'))
    if pads is None or len(pads) != 8 or mode is None or any(p < 0 for p in pads) \
            or any(pads[k] or pads[k + 4] for k in (0, 1)):
        raise n.refuse('4-D constant, edge or reflect padding of H and W only')
    pads = [int(p) for p in pads]
    attrs = {'mode': mode, 'pad_width': tuple(v for k in range(4) for v in (pads[k],
                                                                           pads[k + 4]))}
    if mode == 'constant':
        attrs['constant_value'] = float(np.ravel(value)[0]) if np.size(value) else 0.0
    n.op('Pad', attrs)


def _resize(n):
    """Resize / Upsample of H and W: nearest by an integer factor (UpSampling), linear to a
    size or by factors (BilinearResize2D, corners by the coordinate mode)."""
    mode = n.attrs.get('mode', 'nearest')
    scales = n.const(2 if n.node.op_type == 'Resize' and n.opset > 10 else 1)
    sizes = n.const(3)
    if scales is not None and np.size(scales) == 0:
        scales = None
    if (scales is not None and (len(scales) != 4 or list(scales[:2]) != [1, 1])) \
            or (sizes is not None and len(sizes) != 4):
        raise n.refuse('constant scales or sizes of H and W only')
    corners = n.attrs.get('coordinate_transformation_mode', 'half_pixel')
    if mode == 'nearest' and scales is not None and scales[2] == scales[3] == int(scales[2]):
        return n.op('UpSampling', {'scale': int(scales[2]), 'sample_type': 'nearest',
                                   'num_args': 1})
    if mode in ('linear', 'bilinear') and corners in ('align_corners', 'half_pixel',
                                                       'pytorch_half_pixel'):
        attrs = {'align_corners': corners == 'align_corners'}
        if sizes is not None:
            attrs.update(height=int(sizes[2]), width=int(sizes[3]))
        else:
            attrs.update(mode='odd_scale', scale_height=float(scales[2]),
                         scale_width=float(scales[3]))
        return n.op('_contrib_BilinearResize2D', attrs)
    raise n.refuse(f"mode {mode!r} with {corners!r} coordinates")


def _slice(n):
    starts, ends, axes, steps = (n.const(k) for k in range(1, 5))
    if starts is None or ends is None or (steps is not None and any(np.ravel(steps) != 1)):
        raise n.refuse('constant starts and ends, step 1')
    axes = range(len(starts)) if axes is None else [int(a) for a in axes]
    begin, end = {}, {}
    for axis, start, stop in zip(axes, starts, ends):
        begin[axis], end[axis] = int(start), None if stop >= 2 ** 31 - 1 else int(stop)
    rank = max(max(axes) + 1, 4)
    n.op('slice', {'begin': tuple(begin.get(a) for a in range(rank)),
                   'end': tuple(end.get(a) for a in range(rank))})


def _split(n):
    parts = n.attrs.get('split', n.const(1))
    count = len(n.node.output)
    if parts is not None and len(set(np.ravel(parts))) > 1:
        raise n.refuse('parts of unequal sizes')
    n.op('split', {'num_outputs': count, 'axis': n.attrs.get('axis', 0)})


def _unary(op):
    return lambda n: n.op(op)


def _fold_axes(inputs, attrs):
    return attrs.get('axes', inputs[1] if len(inputs) > 1 else None)


def _fold_slice(inputs, attrs):
    data, starts, ends = inputs[:3]
    axes = inputs[3] if len(inputs) > 3 and inputs[3] is not None else range(len(starts))
    index = [slice(None)] * data.ndim
    for axis, start, stop in zip(axes, starts, ends):
        index[int(axis)] = slice(int(start), int(min(stop, 2 ** 62)))
    return data[tuple(index)]


# Nodes on constants only (the shape arithmetic of PyTorch exports: x.view(x.size(0), -1)),
# computed in numpy: op -> fold(inputs, attributes)
FOLD = {
    'Gather': lambda i, a: np.take(i[0], i[1], axis=a.get('axis', 0)),
    'Unsqueeze': lambda i, a: np.expand_dims(i[0], tuple(int(x) for x in _fold_axes(i, a))),
    'Squeeze': lambda i, a: np.squeeze(i[0], tuple(int(x) for x in _fold_axes(i, a))
                                       if _fold_axes(i, a) is not None else None),
    'Concat': lambda i, a: np.concatenate([np.atleast_1d(x) for x in i], axis=a['axis']),
    'Cast': lambda i, a: i[0],  # shapes stay int64; BATCH survives
    'Identity': lambda i, a: i[0],
    'Slice': _fold_slice,
}


# ONNX op -> reader(_Node)
NODES = {
    'Conv': _conv,
    'Gemm': _gemm,
    'MatMul': _matmul,
    'BatchNormalization': _batchnorm,
    'MaxPool': _pool,
    'AveragePool': _pool,
    'GlobalAveragePool': _global(nn.GlobalAvgPool2D),
    'GlobalMaxPool': _global(nn.GlobalMaxPool2D),
    'Relu': _simple(lambda a, prefix: nn.Activation('relu', prefix=prefix)),
    'Sigmoid': _simple(lambda a, prefix: nn.Activation('sigmoid', prefix=prefix)),
    'Tanh': _simple(lambda a, prefix: nn.Activation('tanh', prefix=prefix)),
    'LeakyRelu': _simple(lambda a, prefix: nn.LeakyReLU(a.get('alpha', 0.01), prefix=prefix)),
    'Elu': _simple(lambda a, prefix: nn.ELU(a.get('alpha', 1.0), prefix=prefix)),
    'PRelu': _prelu,
    'HardSigmoid': _simple(lambda a, prefix: Op('hard_sigmoid', {
        'alpha': a.get('alpha', 0.2), 'beta': a.get('beta', 0.5)}, prefix=prefix)),
    'HardSwish': _simple(lambda a, prefix: Gated('hard_sigmoid', {
        'alpha': 1 / 6, 'beta': 0.5}, prefix=prefix)),
    'Clip': _clip,
    **{op: _binary for op in BROADCAST},
    'Sum': _simple(lambda a, prefix: Chain('elemwise_add', prefix=prefix)),
    'Concat': _simple(lambda a, prefix: Op('Concat', {'dim': a['axis']}, prefix=prefix)),
    'Flatten': _flatten,
    'Reshape': _reshape,
    'Transpose': _simple(lambda a, prefix: Op('transpose', {'axes': tuple(a['perm'])},
                                              prefix=prefix)),
    'Softmax': _softmax,
    'Identity': _identity,
    'Dropout': _identity,
    **{op: _reduce for op in ('ReduceMean', 'ReduceMax', 'ReduceSum', 'ReduceMin')},
    'Squeeze': _squeeze,
    'Unsqueeze': _squeeze,
    'Pad': _pad,
    'Resize': _resize,
    'Upsample': _resize,
    'Slice': _slice,
    'Split': _split,
    'Softplus': _simple(lambda a, prefix: nn.Activation('softrelu', prefix=prefix)),
    **{op: _unary(mx_op) for op, mx_op in (
        ('Abs', 'abs'), ('Neg', 'negative'), ('Exp', 'exp'), ('Log', 'log'), ('Sqrt', 'sqrt'),
        ('Reciprocal', 'reciprocal'), ('Floor', 'floor'), ('Ceil', 'ceil'))},
}
