"""Caffe models (``x.prototxt`` + ``x.caffemodel``) into a GraphNet of standard Gluon layers.

Both files are read as protobuf messages of the package's caffe.proto subset
(``qat.deploy.caffe``: BVLC field numbers; fields it does not declare, such as fillers and
learning rates, are skipped). Defaults are caffe.proto's (bias_term true, BatchNorm eps 1e-5,
Pooling MAX with CEIL rounding, Concat / Softmax axis 1, ...). A BatchNorm whose output only
a ``Scale`` reads becomes one ``nn.BatchNorm`` with the Scale's gamma and beta (Caffe's
BatchNorm has no affine part); an in-place layer (bottom == top) gives its blob a new value.
A data layer's ``transform_param`` (mean_value, scale) is kept as the net's preprocessing
(Caffe decodes images with OpenCV: BGR). Each reader in ``LAYERS`` turns one layer into a
block, or raises UnsupportedLayerError naming the layer, its type and the file.
"""
import os

import numpy as np
from google.protobuf import text_format
from mxnet.gluon import nn

from ..deploy.caffe import read_caffemodel, read_net
from .graph import Builder, Chain, ModelFileError, Op, files_there, unsupported

SUFFIX = '.prototxt'
DATA_LAYERS = ('Input', 'Data', 'ImageData', 'MemoryData', 'DummyData', 'HDF5Data',
               'WindowData')


def weights_next_to(path):
    return os.path.splitext(path)[0] + '.caffemodel'


def read(path, weights=None):
    """The GraphNet of the Caffe model ``path`` with weights ``weights`` (default
    ``x.caffemodel``)."""
    weights = files_there(path, weights or weights_next_to(path))
    try:
        fields, layers = read_net(path, skip_unknown=True)
    except (text_format.ParseError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{path}: not a readable Caffe prototxt: {err}") from None
    try:
        blobs = {name: arrays for name, (_, arrays) in read_caffemodel(weights).items()}
    except Exception as err:  # protobuf's DecodeError and friends: a damaged file
        raise ModelFileError(f"{weights}: not a readable .caffemodel: {err}") from None
    for layer in layers:
        if layer.type not in LAYERS and layer.type not in DATA_LAYERS:
            raise unsupported(path, layer.name, layer.type,
                              f"supported: {', '.join(sorted(set(LAYERS) | set(DATA_LAYERS)))}")
    builder = Builder(path)
    inputs, preprocess = list(fields.get('input', [])), {}
    shape = [s['dim'] for s in fields.get('input_shape', [])] or \
        ([fields['input_dim']] if fields.get('input_dim') else [])
    builder.input_shapes = {}  # for Pooling's rounding
    if inputs and shape:
        builder.input_shapes[inputs[0]] = (1,) + tuple(int(d) for d in shape[0][1:])
    skip = set()
    for index, layer in enumerate(layers):
        if index in skip:
            continue
        if layer.type in DATA_LAYERS:
            inputs += layer.tops[:1]
            shape += [s['dim'] for s in layer.params.get('input_param', {}).get('shape', [])]
            if shape and len(inputs) == 1:
                builder.input_shapes[inputs[0]] = (1,) + tuple(int(d) for d in shape[0][1:])
            preprocess.update(_transform(layer.params.get('transform_param', {})))
            continue
        scale = _scale_after(layers, index)
        if scale is not None:
            skip.add(scale)
            _batchnorm(builder, layer, blobs, path, layers[scale])
        else:
            LAYERS[layer.type](builder, layer, blobs.get(layer.name, []), path)
    if shape:
        preprocess['shape'] = tuple(int(d) for d in shape[0][1:])
    if not inputs:
        raise ModelFileError(f"{path}: no input (an Input layer or the net's input field)")
    return builder.net(inputs, preprocess=preprocess)


def _scale_after(layers, index):
    """The index of the Scale right after BatchNorm ``index`` that alone reads its output
    (no later layer reads that value before it is rewritten), or None."""
    layer = layers[index]
    if layer.type != 'BatchNorm' or index + 1 >= len(layers):
        return None
    top = layer.tops[0]
    following = layers[index + 1]
    if following.type != 'Scale' or following.bottoms != [top]:
        return None
    if top not in following.tops:
        for later in layers[index + 2:]:
            if top in later.bottoms:
                return None
            if top in later.tops:
                break
    return index + 1


def _transform(param):
    """ncnn's (mean, norm) of a Caffe transform_param: ``(x - mean_value) * scale``."""
    found = {}
    if param.get('mean_value'):
        found['mean'] = list(param['mean_value'])
    if 'scale' in param:
        found['norm'] = [param['scale']]
    if param.get('mean_file'):
        found['mean_file'] = param['mean_file']
    if found:
        found['pixel'] = 'BGR'
    return found


def _hw(p, name, short, default):
    """(h, w) of a Convolution / Pooling field given as ``name`` (repeated or single) or
    ``<short>_h`` / ``<short>_w``."""
    value = p.get(name, default)
    values = (list(value) if isinstance(value, list) else [value]) or [default]
    h, w = (values * 2)[:2]
    return p.get(f'{short}_h', h), p.get(f'{short}_w', w)


def _blob(arrays, k, shape, path, layer):
    """Blob ``k`` of a layer, as ``shape`` (legacy 4-D blobs carry ones)."""
    if k >= len(arrays):
        raise ModelFileError(f"{path}: layer {layer.name!r} ({layer.type}) has no blob {k} in "
                             f"the caffemodel")
    array = arrays[k]
    if array.size != int(np.prod(shape)):
        raise ModelFileError(f"{path}: layer {layer.name!r}: blob {k} has shape "
                             f"{array.shape}, expected {shape}")
    return array.reshape(shape)


def _convolution(builder, layer, arrays, path):
    """Convolution, and Deconvolution (its weight is (inputs, outputs / group, kh, kw))."""
    p = layer.params.get('convolution_param', {})
    kernel, stride = _hw(p, 'kernel_size', 'kernel', 1), _hw(p, 'stride', 'stride', 1)
    pad, dilation = _hw(p, 'pad', 'pad', 0), _hw(p, 'dilation', 'dilation', 1)
    groups, channels, bias = p.get('group', 1), p['num_output'], p.get('bias_term', True)
    if not arrays:
        raise ModelFileError(f"{path}: layer {layer.name!r} has no weights in the caffemodel")
    per_group = arrays[0].size // (channels * kernel[0] * kernel[1])
    transposed = layer.type == 'Deconvolution'
    shape = (per_group * groups, channels // groups) if transposed else (channels, per_group)
    weights = {'weight': _blob(arrays, 0, shape + kernel, path, layer)}
    if bias:
        weights['bias'] = _blob(arrays, 1, (channels,), path, layer)
    block = nn.Conv2DTranspose if transposed else nn.Conv2D
    builder.add(layer.name, lambda prefix: block(
        channels, kernel, strides=stride, padding=pad, dilation=dilation, groups=groups,
        use_bias=bias, in_channels=shape[0] if transposed else per_group * groups,
        prefix=prefix), layer.bottoms, layer.tops, weights)


def _inner_product(builder, layer, arrays, path):
    p = layer.params.get('inner_product_param', {})
    if p.get('axis', 1) != 1 or p.get('transpose', False):
        raise unsupported(path, layer.name, layer.type, 'axis != 1 or transpose')
    units, bias = p['num_output'], p.get('bias_term', True)
    inputs = arrays[0].size // units if arrays else 0
    weights = {'weight': _blob(arrays, 0, (units, inputs), path, layer)}
    if bias:
        weights['bias'] = _blob(arrays, 1, (units,), path, layer)
    builder.add(layer.name, lambda prefix: nn.Dense(units, use_bias=bias, in_units=inputs,
                                                    prefix=prefix),
                layer.bottoms, layer.tops, weights)


def _batchnorm(builder, layer, blobs, path, scale=None):
    """Caffe BatchNorm (mean, var, scale factor) [+ the Scale after it] -> nn.BatchNorm."""
    arrays = blobs.get(layer.name, [])
    channels = arrays[0].size if arrays else 0
    factor = float(_blob(arrays, 2, (1,), path, layer)[0])
    factor = 0.0 if factor == 0 else 1.0 / factor  # Caffe's own rule for a zero factor
    weights = {'running_mean': _blob(arrays, 0, (channels,), path, layer) * factor,
               'running_var': _blob(arrays, 1, (channels,), path, layer) * factor,
               'gamma': np.ones(channels, np.float32), 'beta': np.zeros(channels, np.float32)}
    tops = layer.tops
    if scale is not None:
        affine = blobs.get(scale.name, [])
        weights['gamma'] = _blob(affine, 0, (channels,), path, scale)
        if scale.params.get('scale_param', {}).get('bias_term', False):
            weights['beta'] = _blob(affine, 1, (channels,), path, scale)
        tops = scale.tops
    eps = layer.params.get('batch_norm_param', {}).get('eps', 1e-5)
    builder.add(layer.name, lambda prefix: nn.BatchNorm(epsilon=eps, in_channels=channels,
                                                        prefix=prefix),
                layer.bottoms, tops, weights)


def _standalone_batchnorm(builder, layer, arrays, path):
    _batchnorm(builder, layer, {layer.name: arrays}, path)


def _scale(builder, layer, arrays, path):
    """A Scale no BatchNorm absorbs: ``x * gamma (+ beta)`` per channel."""
    p = layer.params.get('scale_param', {})
    if len(layer.bottoms) != 1 or p.get('axis', 1) != 1 or p.get('num_axes', 1) != 1:
        raise unsupported(path, layer.name, 'Scale', 'only a learned per-channel scale')
    channels = arrays[0].size if arrays else 0
    terms = [('broadcast_mul', _blob(arrays, 0, (1, channels, 1, 1), path, layer))]
    if p.get('bias_term', False):
        terms.append(('broadcast_add', _blob(arrays, 1, (1, channels, 1, 1), path, layer)))
    bottoms = layer.bottoms
    for k, (op, value) in enumerate(terms):
        last = k == len(terms) - 1
        tops = layer.tops if last else [layer.tops[0] + '/scaled']
        builder.add(layer.name if k == 0 else f"{layer.name}_bias",
                    lambda prefix, op=op, value=value: Op(op, constants={'c0': value},
                                                          prefix=prefix),
                    bottoms, tops, {'c0': value})
        bottoms = tops


def _pooling(builder, layer, arrays, path):
    p = layer.params.get('pooling_param', {})
    kind = p.get('pool', 'MAX')
    if kind not in ('MAX', 'AVE'):
        raise unsupported(path, layer.name, 'Pooling', f"pool {kind}")
    if p.get('global_pooling', False):
        block = nn.GlobalMaxPool2D if kind == 'MAX' else nn.GlobalAvgPool2D
        return builder.add(layer.name, lambda prefix: block(prefix=prefix), layer.bottoms,
                           layer.tops)
    kernel, stride = _hw(p, 'kernel_size', 'kernel', 1), _hw(p, 'stride', 'stride', 1)
    pad = _hw(p, 'pad', 'pad', 0)
    common = dict(pool_size=kernel, strides=stride, padding=pad,
                  ceil_mode=_ceil_mode(builder, layer, p.get('round_mode', 'CEIL'), kernel,
                                       stride, pad, path))
    if kind == 'MAX':
        return builder.add(layer.name, lambda prefix: nn.MaxPool2D(**common, prefix=prefix),
                           layer.bottoms, layer.tops)
    return builder.add(layer.name, lambda prefix: nn.AvgPool2D(**common, prefix=prefix),
                       layer.bottoms, layer.tops)


def _ceil_mode(builder, layer, rounding, kernel, stride, pad, path):
    """MXNet's rounding (True: 'full') that gives Caffe's pooled size: Caffe rounds up (CEIL,
    or down with FLOOR), then drops a last window that starts in the padding, which MXNet's
    'full' keeps. With the input's size known the sizes are compared; without it, Caffe's
    rounding is taken as it is (the two differ only with padding)."""
    if not builder.input_shapes:
        return rounding == 'CEIL'
    sizes = builder.shape(layer.bottoms[0], builder.input_shapes)[2:]
    modes = set()  # the roundings that give Caffe's size, where floor and ceil differ
    for n, k, s, p in zip(sizes, kernel, stride, pad):
        floor, ceil = (n + 2 * p - k) // s + 1, -(-(n + 2 * p - k) // s) + 1
        caffe = ceil if rounding == 'CEIL' else floor
        if p and (caffe - 1) * s >= n + p:
            caffe -= 1
        if caffe not in (floor, ceil):
            raise unsupported(path, layer.name, 'Pooling', f"an output size {caffe} that "
                              f"MXNet's pooling does not make from {n}")
        if floor != ceil:
            modes.add(caffe == ceil)
    if len(modes) > 1:
        raise unsupported(path, layer.name, 'Pooling', 'rows and columns rounded differently')
    return modes.pop() if modes else False


def _simple(make):
    """A reader for a layer that is one block ``make(the layer's params, prefix)``."""
    def reader(builder, layer, arrays, path):
        builder.add(layer.name, lambda prefix: make(layer.params, prefix), layer.bottoms,
                    layer.tops)
    return reader


def _eltwise(builder, layer, arrays, path):
    p = layer.params.get('eltwise_param', {})
    op = {'SUM': 'elemwise_add', 'PROD': 'elemwise_mul', 'MAX': '_maximum'}[
        p.get('operation', 'SUM')]
    coeffs = p.get('coeff', [])
    builder.add(layer.name, lambda prefix: Chain(op, coeffs if any(c != 1 for c in coeffs)
                                                 else None, prefix=prefix),
                layer.bottoms, layer.tops)


def _prelu(builder, layer, arrays, path):
    shared = layer.params.get('prelu_param', {}).get('channel_shared', False)
    slopes = arrays[0].ravel() if arrays else np.zeros(0, np.float32)
    if shared and slopes.size != 1:
        raise ModelFileError(f"{path}: layer {layer.name!r}: channel_shared with "
                             f"{slopes.size} slopes")
    builder.add(layer.name, lambda prefix: nn.PReLU(in_channels=slopes.size, prefix=prefix),
                layer.bottoms, layer.tops, {'alpha': slopes})


def _power(builder, layer, arrays, path):
    """Caffe Power: ``(shift + scale * x) ** power``, as scalar ops."""
    p = layer.params.get('power_param', {})
    steps = [(op, value) for op, value, neutral in (
        ('_mul_scalar', p.get('scale', 1.0), 1.0), ('_plus_scalar', p.get('shift', 0.0), 0.0),
        ('_power_scalar', p.get('power', 1.0), 1.0)) if value != neutral]
    bottoms = layer.bottoms
    for k, (op, value) in enumerate(steps or [('_copy', None)]):
        tops = layer.tops if k == len(steps or [0]) - 1 else [f"{layer.tops[0]}/{op}"]
        builder.add(layer.name if k == 0 else f"{layer.name}_{op.strip('_')}",
                    lambda prefix, op=op, value=value: Op(
                        op, {} if value is None else {'scalar': value}, prefix=prefix),
                    bottoms, tops)
        bottoms = tops


def _lrn(builder, layer, arrays, path):
    """LRN across channels: ``x / (k + alpha / n * sum of x^2 over n channels) ^ beta``,
    MXNet's LRN."""
    p = layer.params.get('lrn_param', {})
    if p.get('norm_region', 'ACROSS_CHANNELS') != 'ACROSS_CHANNELS':
        raise unsupported(path, layer.name, 'LRN', 'WITHIN_CHANNEL')
    attrs = {'nsize': p.get('local_size', 5), 'alpha': p.get('alpha', 1.0),
             'beta': p.get('beta', 0.75), 'knorm': p.get('k', 1.0)}
    builder.add(layer.name, lambda prefix: Op('LRN', attrs, prefix=prefix), layer.bottoms,
                layer.tops)


def _slice(builder, layer, arrays, path):
    """Slice: equal parts (no slice_point), else one slice_axis per top."""
    p = layer.params.get('slice_param', {})
    axis, points = p.get('axis', p.get('slice_dim', 1)), list(p.get('slice_point', []))
    if not points:
        return builder.add(layer.name, lambda prefix: Op(
            'split', {'num_outputs': len(layer.tops), 'axis': axis}, prefix=prefix),
            layer.bottoms, layer.tops)
    if len(points) != len(layer.tops) - 1:
        raise ModelFileError(f"{path}: layer {layer.name!r}: {len(points)} slice points for "
                             f"{len(layer.tops)} tops")
    for top, begin, end in zip(layer.tops, [0] + points, points + [None]):
        builder.add(f"{layer.name}_{top}", lambda prefix, begin=begin, end=end: Op(
            'slice_axis', {'axis': axis, 'begin': begin, 'end': end}, prefix=prefix),
            layer.bottoms, [top])


def _identity(builder, layer, arrays, path):
    """Split / Dropout: every top is the bottom."""
    for top in layer.tops:
        builder.alias(top, layer.bottoms[0])


def _reshape(params, prefix):
    p = params.get('reshape_param', {})
    return Op('Reshape', {'shape': tuple(p.get('shape', {}).get('dim', []))}, prefix=prefix)


def _relu(params, prefix):
    slope = params.get('relu_param', {}).get('negative_slope', 0.0)
    return nn.LeakyReLU(slope, prefix=prefix) if slope else nn.Activation('relu', prefix=prefix)


# Caffe layer type -> reader(builder, layer, its caffemodel blobs, path)
LAYERS = {
    'Convolution': _convolution,
    'Deconvolution': _convolution,
    'InnerProduct': _inner_product,
    'BatchNorm': _standalone_batchnorm,
    'Scale': _scale,
    'ReLU': _simple(_relu),
    'ReLU6': _simple(lambda p, prefix: Op('clip', {'a_min': 0.0, 'a_max': 6.0}, prefix=prefix)),
    'Clip': _simple(lambda p, prefix: Op('clip', {'a_min': p['clip_param']['min'],
                                                  'a_max': p['clip_param']['max']},
                                         prefix=prefix)),
    'PReLU': _prelu,
    'ELU': _simple(lambda p, prefix: nn.ELU(p.get('elu_param', {}).get('alpha', 1.0),
                                            prefix=prefix)),
    'Sigmoid': _simple(lambda p, prefix: nn.Activation('sigmoid', prefix=prefix)),
    'TanH': _simple(lambda p, prefix: nn.Activation('tanh', prefix=prefix)),
    'AbsVal': _simple(lambda p, prefix: Op('abs', prefix=prefix)),
    'Power': _power,
    'Pooling': _pooling,
    'Eltwise': _eltwise,
    'Concat': _simple(lambda p, prefix: Op('Concat', {'dim': p.get('concat_param', {}).get(
        'axis', p.get('concat_param', {}).get('concat_dim', 1))}, prefix=prefix)),
    'Flatten': _simple(lambda p, prefix: Op('Flatten', prefix=prefix)),
    'Reshape': _simple(_reshape),
    'Softmax': _simple(lambda p, prefix: Op('softmax', {'axis': p.get('softmax_param', {})
                                                        .get('axis', 1)}, prefix=prefix)),
    'LRN': _lrn,
    'Slice': _slice,
    'Split': _identity,
    'Dropout': _identity,
}
