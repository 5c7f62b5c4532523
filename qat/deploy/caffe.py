"""Write the deployment graph as a Caffe model (``.prototxt`` text + ``.caffemodel`` binary), and
read such files back with the ``google.protobuf`` package.

Mapping (one IR layer -> one or two Caffe layers; every IR name is a Caffe layer and blob name):

============  ===============================================================================
IR kind       Caffe layer(s) and fields
============  ===============================================================================
Input         Input: input_param { shape { dim: 1 dim: C dim: H dim: W } }
Convolution   Convolution: num_output, bias_term, pad_h/pad_w, kernel_h/kernel_w,
              stride_h/stride_w, group, dilation (once if dh == dw, else dh then dw);
              blobs weight (O, I/g, kh, kw), [bias (O,)]
InnerProduct  InnerProduct: num_output, bias_term; blobs weight (O, I), [bias (O,)]
BatchNorm     BatchNorm (use_global_stats true, eps; blobs mean, var, scale_factor [1.0])
              then Scale ``<name>_scale`` in place (bias_term true; blobs gamma, beta):
              Caffe's BatchNorm has no affine part
ReLU          ReLU, relu_param { negative_slope } when the slope is not 0
Clip          Clip, clip_param { min max } (BVLC Caffe's ClipLayer, LayerParameter field 148)
Sigmoid       Sigmoid
Pooling       Pooling: pool MAX | AVE, kernel_h/kernel_w, stride_h/stride_w, pad_h/pad_w,
              [round_mode FLOOR]; a global pool is pool + global_pooling true only
Eltwise       Eltwise: eltwise_param { operation SUM | PROD | MAX }, any number of bottoms
Concat        Concat: concat_param { axis } (the same NCHW axis number as MXNet's)
Flatten       Flatten (default axis 1: (N, C*H*W))
Softmax       Softmax: softmax_param { axis }
TanH, PReLU   TanH; PReLU (blob: the slopes)
ELU           ELU: elu_param { alpha }
Reshape       Reshape: reshape_param { shape { dim: 0 dim: ... } } (0 keeps the batch)
============  ===============================================================================

The writers are the op table's (``qat.deploy.optable.LAYERS``); the kinds with no Caffe layer
that computes the same (Swish, GELU, HardSigmoid, HardSwish, BinaryOp with broadcasting or a
scalar, Permute, Crop, Padding, ShuffleChannel, adaptive pooling) raise UserError naming the
layer, and the export then skips the Caffe files with a warning.

A fused ``activation`` of a Convolution / InnerProduct becomes a separate in-place layer after
it (bottom == top == the layer's blob) named ``<layer>_relu`` / ``_leaky`` / ``_clip`` /
``_sigmoid``, so consumers still read the blob named after the layer. Added layer names that
would collide with an IR name get a ``_1``, ``_2``... suffix. Weights are written as float32;
``Quant`` (int8 codes and scales) is not part of a Caffe model.

Clip: written as BVLC Caffe's ``Clip`` for every (low, high), including (0, 6), because that is
what standard Caffe reads (it has no ReLU6 layer). ncnn's caffe2ncnn knows only the fork-style
``ReLU6`` and its caffe.proto has no ``clip_param`` (148 is roi_align_param there), so it
rejects a prototxt with a Clip; for ncnn use the direct ncnn writer.

Pooling: Caffe computes ``ceil((H + 2p - k) / s) + 1`` (CEIL; FLOOR with ``round_mode``) and then
drops the last window if it starts at or beyond ``H + p``. The writer keeps MXNet's output shape
(floor for ``full=False``, ceil for ``full=True``): it writes no round_mode when Caffe's default
CEIL gives that shape (portable to every Caffe fork and to caffe2ncnn), ``round_mode: FLOOR``
(BVLC Caffe >= 2018; caffe2ncnn's caffe.proto lacks the field and rejects the file rather than
mis-shape it) when only FLOOR does, e.g. GluonCV ResNet's 3x3/2 pad-1 max pool, and raises
ValueError naming the layer when neither does. The windows start at ``r * s - p`` in both, and an average divides by the window clipped to
the padded input in both, so values match; MXNet's ``count_include_pad=False`` with padding has
no Caffe equivalent (ValueError), and neither has ``pad >= kernel`` (Caffe checks pad < kernel).

Unsupported IR kinds raise ValueError naming the kind and the layer. Nothing is written unless
the whole model converts: both messages are built first, then each file is written atomically
(``qat.fileio.atomic_write``).

Both files are protobuf's own serializations of a caffe.proto ``NetParameter`` built with the
message classes of ``caffe_messages()`` (the caffe.proto subset below, BVLC field numbers,
descriptors built at run time: no .proto file, no protoc). The ``.prototxt`` is text format with
every layer and its ``*_param``, fields in the order the schema declares them; the
``.caffemodel`` is the binary encoding of NetParameter { name, layer } with one
LayerParameter { name, type, blobs } per layer that has weights, BlobProto { data, shape }.
"""
import functools
from collections import namedtuple

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from ..errors import UserError
from ..fileio import atomic_write
from .optable import LAYERS
from .optable.pooling import mxnet_pool_len

# A layer of a parsed .prototxt: params is {param message name: {field: value}}.
CaffeLayer = namedtuple('CaffeLayer', 'name type bottoms tops params')


def write_caffe(graph, prototxt_path, caffemodel_path, net_name):
    """Write ``graph`` (``qat.deploy.ir.Graph``) as a Caffe deploy prototxt and caffemodel."""
    deploy, weights = _net_messages(net_name, _caffe_layers(graph))
    text = text_format.MessageToString(deploy, use_index_order=True)
    model = weights.SerializeToString()
    atomic_write(prototxt_path, text)
    atomic_write(caffemodel_path, model)


def _net_messages(net_name, layers):
    """The NetParameter of the prototxt (every layer, no weights) and of the caffemodel (the
    layers with weights: name, type and blobs), from the LayerParameter dicts ``layers``."""
    net = caffe_messages()['NetParameter']
    deploy = net(name=net_name, layer=[{key: value for key, value in layer.items()
                                        if key != 'blobs'} for layer in layers])
    weights = net(name=net_name, layer=[
        {'name': layer['name'], 'type': layer['type'],
         'blobs': [_blob(array) for array in layer['blobs']]}
        for layer in layers if layer['blobs']])
    return deploy, weights


def _blob(array):
    """The BlobProto of a weight array, as float32. Its ``data`` is parsed from the packed
    encoding of the raw little-endian floats (field 5, wire type 2): the same message as
    assigning the values, without handing protobuf the floats one by one (0.4 s less for
    resnet18's 11.7M weights)."""
    array = np.ascontiguousarray(array, dtype='<f4')
    blob = caffe_messages()['BlobProto'](shape={'dim': array.shape})
    raw = array.tobytes()
    blob.MergeFromString(_PACKED_DATA_TAG + _varint(len(raw)) + raw)
    return blob


_PACKED_DATA_TAG = bytes([5 << 3 | 2])  # BlobProto.data = 5, length-delimited (packed)


def _varint(value):
    """Protobuf's base-128 varint encoding of a non-negative integer."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# ---------------------------------------------------------------------------------------------
# IR -> Caffe layers, as LayerParameter dicts whose 'blobs' are weight arrays

def _caffe_layers(graph):
    taken = {layer.name for layer in graph.layers}
    shapes, out = {}, []
    for layer in graph.layers:
        kind = LAYERS.get(layer.kind)
        if kind is None or kind.caffe is None:
            raise UserError(f"cannot write IR kind {layer.kind!r} (layer {layer.name!r}) "
                             f"to Caffe")
        inputs = [shapes[name] for name in layer.inputs]
        shapes[layer.name] = layer.shape if layer.shape is not None \
            else _out_shape(layer, inputs)
        out += kind.caffe(layer, inputs, taken)
    return out


def _out_shape(layer, inputs):
    """Per-sample output shape, needed to choose the pooling rounding."""
    p = layer.params
    if layer.kind == 'Input':
        return tuple(p['shape'])
    x = inputs[0]
    if layer.kind == 'Convolution':
        hw = [(n + 2 * pad - d * (k - 1) - 1) // s + 1 for n, k, s, pad, d in
              zip(x[1:], p['kernel'], p['stride'], p['pad'], p['dilate'])]
        return (p['num_output'], *hw)
    if layer.kind == 'InnerProduct':
        return (p['num_output'],)
    if layer.kind == 'Pooling':
        if p['global_pool']:
            return (x[0], 1, 1)
        return (x[0], *[mxnet_pool_len(*axis, p['full']) for axis in
                        zip(x[1:], p['kernel'], p['stride'], p['pad'])])
    if layer.kind == 'Concat':
        axis = p['axis'] % (len(x) + 1) - 1  # MXNet's axis counts the batch
        if axis < 0:
            raise UserError(f"Concat layer {layer.name!r}: cannot concatenate the batch axis")
        return (*x[:axis], sum(shape[axis] for shape in inputs), *x[axis + 1:])
    if layer.kind == 'Flatten':
        return (int(np.prod(x)),)
    return x  # BatchNorm, activations, Eltwise, Softmax


# ---------------------------------------------------------------------------------------------
# The message schema (descriptors built at run time: no .proto file, no protoc), and reading back

# The caffe.proto (BVLC, proto2) messages and fields written and read here, with their numbers,
# each message's fields in the order the prototxt lists them (text_format's use_index_order).
# Enum types are declared in _ENUMS under their message; values are numbered by position.
_MESSAGES = {
    'BlobShape': 'repeated int64 dim = 1 packed',
    'BlobProto': 'optional BlobShape shape = 7; repeated float data = 5 packed; '
                 'optional int32 num = 1; optional int32 channels = 2; '
                 'optional int32 height = 3; optional int32 width = 4',
    'NetParameter': 'optional string name = 1; repeated LayerParameter layer = 100; '
                    'repeated string input = 3; repeated int32 input_dim = 4; '
                    'repeated BlobShape input_shape = 8',
    'LayerParameter': 'optional string name = 1; optional string type = 2; '
                      'repeated string bottom = 3; repeated string top = 4; '
                      'repeated BlobProto blobs = 7; '
                      'optional ConcatParameter concat_param = 104; '
                      'optional ConvolutionParameter convolution_param = 106; '
                      'optional EltwiseParameter eltwise_param = 110; '
                      'optional InnerProductParameter inner_product_param = 117; '
                      'optional PoolingParameter pooling_param = 121; '
                      'optional ReLUParameter relu_param = 123; '
                      'optional SoftmaxParameter softmax_param = 125; '
                      'optional ReshapeParameter reshape_param = 133; '
                      'optional FlattenParameter flatten_param = 135; '
                      'optional BatchNormParameter batch_norm_param = 139; '
                      'optional ELUParameter elu_param = 140; '
                      'optional ScaleParameter scale_param = 142; '
                      'optional InputParameter input_param = 143; '
                      'optional ClipParameter clip_param = 148; '
                      'optional TransformationParameter transform_param = 100; '
                      'optional PowerParameter power_param = 122; '
                      'optional PReLUParameter prelu_param = 131; '
                      'optional LRNParameter lrn_param = 118; '
                      'optional SliceParameter slice_param = 126',
    # read only (the importer): preprocessing, Power, PReLU's sharing, LRN, Slice
    'TransformationParameter': 'optional float scale = 1; optional bool mirror = 2; '
                               'optional uint32 crop_size = 3; optional string mean_file = 4; '
                               'repeated float mean_value = 5',
    'PowerParameter': 'optional float power = 1; optional float scale = 2; '
                      'optional float shift = 3',
    'PReLUParameter': 'optional bool channel_shared = 2',
    'LRNParameter': 'optional uint32 local_size = 1; optional float alpha = 2; '
                    'optional float beta = 3; optional NormRegion norm_region = 4; '
                    'optional float k = 5',
    'SliceParameter': 'optional uint32 slice_dim = 1; repeated uint32 slice_point = 2; '
                      'optional int32 axis = 3',
    'InputParameter': 'repeated BlobShape shape = 1',
    'ConvolutionParameter': 'optional uint32 num_output = 1; optional bool bias_term = 2; '
                            'repeated uint32 pad = 3; repeated uint32 kernel_size = 4; '
                            'repeated uint32 stride = 6; '
                            'optional uint32 pad_h = 9; optional uint32 pad_w = 10; '
                            'optional uint32 kernel_h = 11; optional uint32 kernel_w = 12; '
                            'optional uint32 stride_h = 13; optional uint32 stride_w = 14; '
                            'optional uint32 group = 5; repeated uint32 dilation = 18',
    'PoolingParameter': 'optional PoolMethod pool = 1; optional uint32 kernel_size = 2; '
                        'optional uint32 stride = 3; optional uint32 pad = 4; '
                        'optional uint32 kernel_h = 5; optional uint32 kernel_w = 6; '
                        'optional uint32 stride_h = 7; optional uint32 stride_w = 8; '
                        'optional uint32 pad_h = 9; optional uint32 pad_w = 10; '
                        'optional bool global_pooling = 12; optional RoundMode round_mode = 13',
    'InnerProductParameter': 'optional uint32 num_output = 1; optional bool bias_term = 2; '
                             'optional int32 axis = 5; optional bool transpose = 6',
    'BatchNormParameter': 'optional bool use_global_stats = 1; '
                          'optional float moving_average_fraction = 2; optional float eps = 3',
    'ScaleParameter': 'optional int32 axis = 1; optional int32 num_axes = 2; '
                      'optional bool bias_term = 4',
    'ReLUParameter': 'optional float negative_slope = 1',
    'ClipParameter': 'required float min = 1; required float max = 2',
    'EltwiseParameter': 'optional EltwiseOp operation = 1; repeated float coeff = 2',
    'ConcatParameter': 'optional uint32 concat_dim = 1; optional int32 axis = 2',
    'SoftmaxParameter': 'optional int32 axis = 2',
    'FlattenParameter': 'optional int32 axis = 1; optional int32 end_axis = 2',
    'ReshapeParameter': 'optional BlobShape shape = 1; optional int32 axis = 2; '
                        'optional int32 num_axes = 3',
    'ELUParameter': 'optional float alpha = 1',
}
_ENUMS = {'PoolingParameter': {'PoolMethod': ('MAX', 'AVE', 'STOCHASTIC'),
                               'RoundMode': ('CEIL', 'FLOOR')},
          'EltwiseParameter': {'EltwiseOp': ('PROD', 'SUM', 'MAX')},
          'LRNParameter': {'NormRegion': ('ACROSS_CHANNELS', 'WITHIN_CHANNEL')}}


@functools.lru_cache(maxsize=None)
def caffe_messages():
    """{message name: protobuf message class} for the caffe.proto subset above (package
    ``caffe``, BVLC field numbers), built at run time."""
    file_proto = descriptor_pb2.FileDescriptorProto(name='qat_caffe_subset.proto',
                                                    package='caffe', syntax='proto2')
    for message, spec in _MESSAGES.items():
        _add_message(file_proto.message_type.add(name=message), spec, _ENUMS.get(message, {}))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return {message: message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f'caffe.{message}')) for message in _MESSAGES}


def _add_message(proto, spec, enums):
    fdp = descriptor_pb2.FieldDescriptorProto
    for enum, values in enums.items():
        enum_proto = proto.enum_type.add(name=enum)
        for number, value in enumerate(values):
            enum_proto.value.add(name=value, number=number)
    for field in spec.split(';'):
        label, type_name, name, _, number, *packed = field.split()
        entry = proto.field.add(name=name, number=int(number),
                                label=getattr(fdp, f'LABEL_{label.upper()}'))
        if hasattr(fdp, f'TYPE_{type_name.upper()}'):
            entry.type = getattr(fdp, f'TYPE_{type_name.upper()}')
        elif type_name in enums:
            entry.type, entry.type_name = fdp.TYPE_ENUM, f'.caffe.{proto.name}.{type_name}'
        else:
            entry.type, entry.type_name = fdp.TYPE_MESSAGE, f'.caffe.{type_name}'
        if packed:
            entry.options.packed = True


def read_caffemodel(path):
    """{layer name: (type, [float32 arrays shaped as their BlobShape])} of a binary
    ``.caffemodel`` (legacy num/channels/height/width blobs are read as 4-D)."""
    with open(path, 'rb') as f:
        net = caffe_messages()['NetParameter'].FromString(f.read())
    return {layer.name: (layer.type, [_blob_array(blob) for blob in layer.blobs])
            for layer in net.layer}


def _blob_array(blob):
    if blob.HasField('shape'):
        shape = tuple(blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    return np.array(blob.data, dtype=np.float32).reshape(shape)


def read_prototxt(path):
    """The layers of a text ``.prototxt`` as ``CaffeLayer(name, type, bottoms, tops, params)``;
    params holds the ``*_param`` messages that are set, as dicts of the fields that are set
    (repeated fields as lists, enums by name)."""
    return read_net(path)[1]


def read_net(path, skip_unknown=False):
    """(the NetParameter's own fields that are set, as a dict without 'layer'; the layers as
    in ``read_prototxt``) of a text ``.prototxt``; ``skip_unknown`` ignores the fields this
    subset of caffe.proto does not declare (training settings: fillers, lr_mult, ...)."""
    with open(path, encoding='utf-8') as f:
        net = text_format.Parse(f.read(), caffe_messages()['NetParameter'](),
                                allow_unknown_field=skip_unknown)
    fields = {fd.name: _field_value(fd, value) for fd, value in net.ListFields()
              if fd.name != 'layer'}
    return fields, [CaffeLayer(layer.name, layer.type, list(layer.bottom), list(layer.top),
                               {fd.name: _message_dict(value) for fd, value in layer.ListFields()
                                if fd.name.endswith('_param')})
                    for layer in net.layer]


def _message_dict(message):
    return {fd.name: _field_value(fd, value) for fd, value in message.ListFields()}


def _field_value(fd, value):
    # protobuf >= 6 has is_repeated instead of label
    if fd.is_repeated if hasattr(fd, 'is_repeated') else fd.label == fd.LABEL_REPEATED:
        return [_field_value_one(fd, v) for v in value]
    return _field_value_one(fd, value)


def _field_value_one(fd, value):
    if fd.type == fd.TYPE_MESSAGE:
        return _message_dict(value)
    if fd.type == fd.TYPE_ENUM:
        return fd.enum_type.values_by_number[value].name
    return value
