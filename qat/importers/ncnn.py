"""ncnn fp32 models (``x.param`` + ``x.bin``) into a GraphNet of standard Gluon layers.

The files are read by ``qat.deploy.ncnn.read_param`` / ``read_weights`` (the package's one
reader of ncnn files). ncnn blobs are per sample (c, h, w) with axes counted from c; the
Gluon net keeps MXNet's (N, C, H, W), so an ncnn axis ``a >= 0`` is MXNet's ``a + 1``, and a
blob ncnn makes 1-D (global pooling) stays (N, C, 1, 1). A fused activation (``9=``) of a
Convolution / InnerProduct becomes its own block ``<layer>_act``. Split, Dropout and Noop are
other names of their input blob. Each reader in ``LAYERS`` turns one layer into a block, or
raises UnsupportedLayerError naming the layer, its type and the file.
"""
import os

import numpy as np
from mxnet.gluon import nn

from ..deploy.ncnn import read_param, read_weights
from ..deploy.optable.shape import PERMUTE_ORDERS
from ..errors import UserError
from .graph import (Builder, Chain, ChannelShuffle, Gated, ModelFileError, Op, files_there,
                    unsupported)

SUFFIX = '.param'
NOT_SET = -233  # ncnn's "parameter not given"


def weights_next_to(path):
    return os.path.splitext(path)[0] + '.bin'


def read(path, weights=None):
    """The GraphNet of the ncnn model ``path`` with weights ``weights`` (default ``x.bin``)."""
    weights = files_there(path, weights or weights_next_to(path))
    try:
        layers = read_param(path)
    except (ValueError, IndexError) as err:
        raise ModelFileError(f"{path}: not a readable ncnn .param: {err}") from None
    for kind, name, _, _, p in layers:
        if kind not in LAYERS:
            raise unsupported(path, name, kind, f"supported: {', '.join(sorted(LAYERS))}")
        if p.get(8, 0):
            raise unsupported(path, name, kind, 'an int8 layer (import the fp32 model)')
    try:
        blobs = read_weights(path, weights)
    except UserError as err:
        raise ModelFileError(str(err)) from None
    except ValueError:  # numpy: fewer bytes than the layers need
        raise ModelFileError(f"{weights}: too short for the layers of {path} (truncated, or "
                             f"not its weights?)") from None
    builder, inputs, shapes = Builder(path), [], {}
    builder.input_shapes = {}  # for the layers that need their input's size
    for kind, name, bottoms, tops, p in layers:
        if kind == 'Input':
            inputs += tops
            if all(p.get(k, 0) > 0 for k in (0, 1, 2)):  # pnnx writes no size
                shapes = {'shape': (p[2], p[1], p[0])}
                builder.input_shapes[tops[0]] = (1,) + shapes['shape']
        elif kind in ('Split', 'Dropout', 'Noop'):
            for top in tops:
                builder.alias(top, bottoms[0])
        else:
            LAYERS[kind](builder, name, bottoms, tops, p, blobs.get(name, {}), path)
    return builder.net(inputs, preprocess=shapes)


def _two(p, first, second, default):
    """ncnn's (x, y) pair: ids ``first`` (w) and ``second`` (h, defaulting to w)."""
    x = p.get(first, default)
    return p.get(second, x), x


def _activation(builder, name, bottoms, tops, p, path, kind):
    """The block of a fused ``9=`` activation reading blob ``bottoms``, writing ``tops``."""
    act, args = p.get(9, 0), list(p.get(10, []))
    makers = {1: lambda prefix: nn.Activation('relu', prefix=prefix),
              2: lambda prefix: nn.LeakyReLU(args[0], prefix=prefix),
              3: lambda prefix: Op('clip', {'a_min': args[0], 'a_max': args[1]},
                                   prefix=prefix),
              4: lambda prefix: nn.Activation('sigmoid', prefix=prefix),
              6: lambda prefix: Gated('hard_sigmoid', {'alpha': args[0], 'beta': args[1]},
                                      prefix=prefix)}
    if act not in makers:
        raise unsupported(path, name, kind, f"fused activation type {act}")
    builder.add(name + '_act', makers[act], bottoms, tops)


def _weighted(builder, name, bottoms, tops, p, path, kind, make, weights):
    """A conv / inner product, then its fused activation (if any) as its own block."""
    act = p.get(9, 0)
    out = [tops[0] + '/pre_act'] if act else tops
    builder.add(name, make, bottoms, out, weights)
    if act:
        _activation(builder, name, out, tops, p, path, kind)


def _convolution(builder, name, bottoms, tops, p, w, path, kind='Convolution'):
    channels, groups = p[0], p.get(7, 1) if kind == 'ConvolutionDepthWise' else 1
    kernel, dilation, stride = _two(p, 1, 11, 0), _two(p, 2, 12, 1), _two(p, 3, 13, 1)
    left = p.get(4, 0)
    top, right = p.get(14, left), p.get(15, left)
    bottom = p.get(16, top)
    if min(left, top) < 0 or (left, top) != (right, bottom) or p.get(18, 0.0) != 0:
        raise unsupported(path, name, kind, f"padding (left, right, top, bottom) = "
                          f"{(left, right, top, bottom)} (value {p.get(18, 0.0)}): only "
                          f"symmetric zero padding")
    in_channels = p[6] // (channels * kernel[0] * kernel[1]) * groups
    weights = {'weight': np.asarray(w['weight'], np.float32).reshape(
        channels, in_channels // groups, *kernel)}
    if p.get(5, 0):
        weights['bias'] = w['bias']
    _weighted(builder, name, bottoms, tops, p, path, kind, lambda prefix: nn.Conv2D(
        channels, kernel, strides=stride, padding=(top, left), dilation=dilation,
        groups=groups, use_bias=bool(p.get(5, 0)), in_channels=in_channels, prefix=prefix),
        weights)


def _deconvolution(builder, name, bottoms, tops, p, w, path):
    """ncnn's weight is (outputs, inputs, kh, kw); Gluon's (inputs, outputs, kh, kw)."""
    channels = p[0]
    kernel, dilation, stride = _two(p, 1, 11, 0), _two(p, 2, 12, 1), _two(p, 3, 13, 1)
    left = p.get(4, 0)
    top, right = p.get(14, left), p.get(15, left)
    bottom, extra = p.get(16, top), (p.get(19, 0), p.get(18, 0))
    if min(left, top) < 0 or (left, top) != (right, bottom) or p.get(20, 0) or p.get(21, 0):
        raise unsupported(path, name, 'Deconvolution', 'only symmetric padding, no output '
                          'size')
    inputs = p[6] // (channels * kernel[0] * kernel[1])
    weights = {'weight': np.ascontiguousarray(np.asarray(w['weight'], np.float32).reshape(
        channels, inputs, *kernel).transpose(1, 0, 2, 3))}
    if p.get(5, 0):
        weights['bias'] = w['bias']
    _weighted(builder, name, bottoms, tops, p, path, 'Deconvolution', lambda prefix:
              nn.Conv2DTranspose(channels, kernel, strides=stride, padding=(top, left),
                                 output_padding=extra, dilation=dilation,
                                 use_bias=bool(p.get(5, 0)), in_channels=inputs,
                                 prefix=prefix), weights)


def _depthwise(builder, name, bottoms, tops, p, w, path):
    _convolution(builder, name, bottoms, tops, p, w, path, 'ConvolutionDepthWise')


def _inner_product(builder, name, bottoms, tops, p, w, path):
    units, inputs = p[0], p[2] // p[0]
    weights = {'weight': np.asarray(w['weight'], np.float32).reshape(units, inputs)}
    if p.get(1, 0):
        weights['bias'] = w['bias']
    _weighted(builder, name, bottoms, tops, p, path, 'InnerProduct', lambda prefix: nn.Dense(
        units, use_bias=bool(p.get(1, 0)), in_units=inputs, prefix=prefix), weights)


def _batchnorm(builder, name, bottoms, tops, p, w, path):
    builder.add(name, lambda prefix: nn.BatchNorm(epsilon=p.get(1, 0.0), in_channels=p[0],
                                                  prefix=prefix), bottoms, tops,
                {'gamma': w['slope'], 'beta': w['bias'], 'running_mean': w['mean'],
                 'running_var': w['var']})


def _pooling(builder, name, bottoms, tops, p, w, path):
    kind = 'max' if p.get(0, 0) == 0 else 'avg'
    if p.get(4, 0):
        block = nn.GlobalMaxPool2D if kind == 'max' else nn.GlobalAvgPool2D
        return builder.add(name, lambda prefix: block(prefix=prefix), bottoms, tops)
    kernel, stride = _two(p, 1, 11, 0), _two(p, 2, 12, 1)
    left = p.get(3, 0)
    right, top = p.get(14, left), p.get(13, left)
    bottom, mode = p.get(15, top), p.get(5, 0)
    if p.get(7, 0) or mode not in (0, 1) or (left, top) != (right, bottom):
        raise unsupported(path, name, 'Pooling', "adaptive, 'same' or asymmetric padding")
    common = dict(pool_size=kernel, strides=stride, padding=(top, left), ceil_mode=mode == 0)
    if kind == 'max':
        return builder.add(name, lambda prefix: nn.MaxPool2D(**common, prefix=prefix),
                           bottoms, tops)
    include = bool(p.get(6, 0))
    return builder.add(name, lambda prefix: nn.AvgPool2D(**common, count_include_pad=include,
                                                         prefix=prefix), bottoms, tops)


def _op(op, attrs=lambda p: {}):
    """A reader for a layer that is one MXNet operator with attributes from the params."""
    def reader(builder, name, bottoms, tops, p, w, path):
        builder.add(name, lambda prefix: Op(op, attrs(p), prefix=prefix), bottoms, tops)
    return reader


def _block(make):
    """A reader for a layer that is one Gluon block ``make(params, prefix)``."""
    def reader(builder, name, bottoms, tops, p, w, path):
        builder.add(name, lambda prefix: make(p, prefix), bottoms, tops)
    return reader


def _axis(p, key=0):
    axis = p.get(key, 0)
    return axis + 1 if axis >= 0 else axis


def _eltwise(builder, name, bottoms, tops, p, w, path):
    op = {0: 'elemwise_mul', 1: 'elemwise_add', 2: '_maximum'}[p.get(0, 1)]
    coeffs = p.get(1, [])
    builder.add(name, lambda prefix: Chain(op, coeffs if any(c != 1 for c in coeffs)
                                           else None, prefix=prefix), bottoms, tops)


BINARY = ('add', 'sub', 'mul', 'div', 'maximum', 'minimum', 'power', 'rsub', 'rdiv')
SCALAR = ('_plus_scalar', '_minus_scalar', '_mul_scalar', '_div_scalar', '_maximum_scalar',
          '_minimum_scalar', '_power_scalar', '_rminus_scalar', '_rdiv_scalar')


def _binary(builder, name, bottoms, tops, p, w, path):
    kind = p.get(0, 0)
    if kind >= len(BINARY):
        raise unsupported(path, name, 'BinaryOp', f"operation {kind}")
    if p.get(1, 0):
        return builder.add(name, lambda prefix: Op(SCALAR[kind], {'scalar': p.get(2, 0.0)},
                                                   prefix=prefix), bottoms, tops)
    op, order = BINARY[kind], None
    if op.startswith('r'):  # b - a, b / a
        op, order = op[1:], ['#1', '#0']
    return builder.add(name, lambda prefix: Op(f"broadcast_{op}", order=order, prefix=prefix),
                       bottoms, tops)


UNARY = ('abs', 'negative', 'floor', 'ceil', 'square', 'sqrt', 'rsqrt', 'exp', 'log', 'sin',
         'cos', 'tan', 'arcsin', 'arccos', 'arctan', 'reciprocal', 'tanh')


def _unary(builder, name, bottoms, tops, p, w, path):
    if p.get(0, 0) >= len(UNARY):
        raise unsupported(path, name, 'UnaryOp', f"operation {p.get(0, 0)}")
    _op(UNARY[p.get(0, 0)])(builder, name, bottoms, tops, p, w, path)


def _reshape(builder, name, bottoms, tops, p, w, path):
    if p.get(3, 0):
        raise unsupported(path, name, 'Reshape', 'permute=1')
    dims = [p.get(k, NOT_SET) for k in (2, 1, 0)]  # c, h, w
    while dims and dims[0] == NOT_SET:
        dims.pop(0)
    _op('Reshape', lambda p: {'shape': (0,) + tuple(dims)})(builder, name, bottoms, tops, p,
                                                            w, path)


def _permute(builder, name, bottoms, tops, p, w, path):
    order = PERMUTE_ORDERS[p.get(0, 0)]  # the new w, h, c named by the old axes
    axes = (0,) + tuple('CHW'.index(axis) + 1 for axis in reversed(order))
    _op('transpose', lambda p: {'axes': axes})(builder, name, bottoms, tops, p, w, path)


def _padding(builder, name, bottoms, tops, p, w, path):
    if p.get(7, 0) or p.get(8, 0) or p.get(4, 0) not in (0, 1, 2):
        raise unsupported(path, name, 'Padding', 'channel padding or an unknown type')
    mode = ('constant', 'edge', 'reflect')[p.get(4, 0)]
    attrs = {'mode': mode, 'pad_width': (0, 0, 0, 0) + tuple(p.get(k, 0) for k in range(4))}
    if mode == 'constant':
        attrs['constant_value'] = p.get(5, 0.0)
    _op('Pad', lambda p: attrs)(builder, name, bottoms, tops, p, w, path)


def _interp(builder, name, bottoms, tops, p, w, path):
    kind, (height, width) = p.get(0, 1), (p.get(3, 0), p.get(4, 0))
    scales = (p.get(1, 1.0), p.get(2, 1.0))
    if kind == 2 and height and width:
        return _op('_contrib_BilinearResize2D', lambda p: {
            'height': height, 'width': width, 'align_corners': bool(p.get(6, 0))})(
                builder, name, bottoms, tops, p, w, path)
    if kind == 1 and height and width and builder.input_shapes:
        # ncnn's nearest reads row floor(y * h / height): an integer ratio is MXNet's
        # UpSampling
        h, wd = builder.shape(bottoms[0], builder.input_shapes)[2:]
        scales = (height / h, width / wd)
    if kind == 1 and scales[0] == scales[1] == int(scales[0]):
        return _op('UpSampling', lambda p: {'scale': int(scales[0]), 'sample_type': 'nearest',
                                            'num_args': 1})(builder, name, bottoms, tops, p,
                                                            w, path)
    raise unsupported(path, name, 'Interp', 'only bilinear to a size, or nearest by an '
                      'integer factor')


def _crop(builder, name, bottoms, tops, p, w, path):
    if not p.get(11):
        raise unsupported(path, name, 'Crop', 'only the starts / ends / axes form')
    begin, end = [None] * 4, [None] * 4
    for start, stop, axis in zip(p[9], p[10], p[11]):
        axis = int(axis) + 1 if axis >= 0 else int(axis) + 4
        begin[axis], end[axis] = int(start), None if stop >= 2 ** 31 - 1 else int(stop)
    _op('slice', lambda p: {'begin': tuple(begin), 'end': tuple(end)})(
        builder, name, bottoms, tops, p, w, path)


def _gelu(builder, name, bottoms, tops, p, w, path):
    if p.get(0, 0):
        raise unsupported(path, name, 'GELU', "fast_gelu (MXNet's GELU is the erf form)")
    builder.add(name, lambda prefix: nn.GELU(prefix=prefix), bottoms, tops)


def _prelu(builder, name, bottoms, tops, p, w, path):
    builder.add(name, lambda prefix: nn.PReLU(in_channels=p.get(0, 1), prefix=prefix),
                bottoms, tops, {'alpha': w['slope']})


# ncnn layer type -> reader(builder, name, bottoms, tops, params, weights, path)
LAYERS = {
    'Input': None, 'Split': None, 'Dropout': None, 'Noop': None,  # handled in ``read``
    'Convolution': _convolution,
    'ConvolutionDepthWise': _depthwise,
    'Deconvolution': _deconvolution,
    'InnerProduct': _inner_product,
    'BatchNorm': _batchnorm,
    'Pooling': _pooling,
    'ReLU': _block(lambda p, prefix: nn.LeakyReLU(p[0], prefix=prefix) if p.get(0, 0.0)
                   else nn.Activation('relu', prefix=prefix)),
    'Clip': _op('clip', lambda p: {'a_min': p.get(0, -3.4e38), 'a_max': p.get(1, 3.4e38)}),
    'Sigmoid': _block(lambda p, prefix: nn.Activation('sigmoid', prefix=prefix)),
    'TanH': _block(lambda p, prefix: nn.Activation('tanh', prefix=prefix)),
    'ELU': _block(lambda p, prefix: nn.ELU(p.get(0, 0.1), prefix=prefix)),
    'PReLU': _prelu,
    'Swish': _block(lambda p, prefix: Gated('sigmoid', prefix=prefix)),
    'HardSigmoid': _op('hard_sigmoid', lambda p: {'alpha': p.get(0, 0.2),
                                                  'beta': p.get(1, 0.5)}),
    'HardSwish': _block(lambda p, prefix: Gated('hard_sigmoid', {
        'alpha': p.get(0, 0.2), 'beta': p.get(1, 0.5)}, prefix=prefix)),
    'Eltwise': _eltwise,
    'BinaryOp': _binary,
    'UnaryOp': _unary,
    'Concat': _op('Concat', lambda p: {'dim': _axis(p)}),
    'Flatten': _op('Flatten'),
    'Reshape': _reshape,
    'Permute': _permute,
    'Softmax': _op('softmax', lambda p: {'axis': _axis(p)}),
    'ShuffleChannel': _block(lambda p, prefix: ChannelShuffle(p.get(0, 1), p.get(1, 0),
                                                              prefix=prefix)),
    'Padding': _padding,
    'Interp': _interp,
    'Crop': _crop,
    'GELU': _gelu,
}
