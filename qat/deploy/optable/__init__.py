"""The op table: every MXNet op (and op pattern) the exporter supports, and for every
deployment layer kind how it is written to ncnn and to Caffe and how the simulation computes
it. The tracer (``qat.deploy.graph``), the writers (``qat.deploy.ncnn``, ``qat.deploy.caffe``)
and the verifier (``qat.deploy.verify``) look everything up here; an op missing from OPS is
an ExportError naming the op and its block.

OPS: MXNet op -> trace(tracer, node index, node), which adds IR layers (``qat.deploy.ir``).
PATTERNS: tried on every node, in order, before its OPS entry: a pattern that matches a run of
    nodes (hard sigmoid, channel shuffle, ...) adds one layer for all of them; a detector's
    whole decoding (``detection``) becomes one ncnn detection layer.
LAYERS: IR kind -> Kind(ncnn, caffe, simulation, ncnn_flat):
    ncnn(layer, graph, int8, guarded, bin) -> (ncnn type, [(param id, value)]), weights
        appended to ``bin``;
    caffe(layer, input shapes, taken names) -> [LayerParameter dicts], or None: no Caffe
        equivalent (the Caffe files are then skipped with a warning);
    simulation(layer) -> [``base.ncnn_arithmetic`` entries]: the MXNet nodes the verifier
        must compute with ncnn's own arithmetic (native ops, ``qat/native/ncnnmath.cc``)
        rather than MXNet's; empty (or no function) where MXNet's arithmetic is ncnn's, or the deployed blocks
        compute it (``QBatchNorm``, ``QAvgPool2D``, the quantized layers);
    ncnn_flat: 'makes' when ncnn's output is 1-D where MXNet keeps (C, 1, 1) (InnerProduct,
        Flatten, global pooling: a function of the layer), 'keeps' when the layer computes
        on 1-D inputs as they are (all of them 1-D: so is its output), 'reads' when it takes
        a 1-D input as it is but its output is not 1-D (Reshape); otherwise (None) the
        writer reshapes a 1-D input back to ncnn's (C, 1, 1) first.
"""
from collections import namedtuple

from . import (activations, detection, elementwise, normalization, pooling, resize, shape,
               weighted)
from .base import caffe_simple, ncnn_simple

Kind = namedtuple('Kind', 'ncnn caffe simulation ncnn_flat', defaults=(None, None, None))

_ACTIVATION_OPS = ('Activation', 'relu', 'sigmoid', 'tanh', 'LeakyReLU', 'clip',
                   'hard_sigmoid')

OPS = {
    'null': shape.trace_input,  # only the net's inputs reach the table
    'Convolution': weighted.trace_convolution,
    'FullyConnected': weighted.trace_fully_connected,
    'BatchNorm': weighted.trace_batchnorm,
    'Deconvolution': weighted.trace_deconvolution,
    'InstanceNorm': normalization.trace_instance_norm,
    'LayerNorm': normalization.trace_layer_norm,
    'GroupNorm': normalization.trace_group_norm,
    'L2Normalization': normalization.trace_l2_normalization,
    'sum': normalization.trace_reduction, 'mean': normalization.trace_reduction,
    'Pooling': pooling.trace_pooling,
    '_contrib_AdaptiveAvgPooling2D': pooling.trace_adaptive_avg,
    **{op: activations.trace_activation for op in _ACTIVATION_OPS},
    **{op: elementwise.trace_elementwise for op in
       list(elementwise.ELTWISE_OPS) + list(elementwise.BINARY_OPS)},
    **{op: elementwise.trace_scalar for op in elementwise.SCALAR_OPS},
    **{op: elementwise.trace_unary for op in elementwise.UNARY_OPS},
    **{op: elementwise.trace_constant_like for op in elementwise.CONSTANT_LIKE},
    **{op: shape.trace_pass_through for op in shape.PASS_THROUGH_OPS},
    **{op: shape.trace_reshape for op in shape.SHAPE_OPS},
    'Flatten': shape.trace_flatten, 'flatten': shape.trace_flatten,
    'Concat': shape.trace_concat, 'concat': shape.trace_concat,
    'transpose': shape.trace_transpose, 'SwapAxis': shape.trace_transpose,
    'slice_axis': shape.trace_slice_axis, 'slice': shape.trace_slice_axis,
    'SliceChannel': shape.trace_split, 'split': shape.trace_split,
    'Pad': shape.trace_pad, 'pad': shape.trace_pad,
    'softmax': shape.trace_softmax, 'SoftmaxActivation': shape.trace_softmax,
    'SoftmaxOutput': shape.trace_softmax,
    'slice_like': shape.trace_slice_like,
    'UpSampling': resize.trace_upsampling, 'repeat': resize.trace_repeat,
    '_contrib_BilinearResize2D': resize.trace_bilinear,
    **{op: detection.refuse_decoding for op in ('_contrib_box_nms', '_contrib_box_decode',
                                                '_contrib_MultiBoxDetection')},
}

PATTERNS = (detection.match_detection, activations.match_hard_sigmoid,
            activations.match_swish, shape.match_channel_shuffle, shape.match_shape_operand)

_act = activations.simulate_as
LAYERS = {
    'Input': Kind(shape.ncnn_input, shape.caffe_input),
    'Convolution': Kind(weighted.ncnn_convolution, weighted.caffe_convolution,
                        weighted.simulate_convolution),
    'InnerProduct': Kind(weighted.ncnn_inner_product, weighted.caffe_inner_product,
                         activations.simulate_fused,
                         'makes'),
    'BatchNorm': Kind(weighted.ncnn_batchnorm, weighted.caffe_batchnorm, None, 'keeps'),
    'Deconvolution': Kind(weighted.ncnn_deconvolution, None),
    'InstanceNorm': Kind(normalization.ncnn_instance_norm, None),
    'LayerNorm': Kind(normalization.ncnn_layer_norm, None),
    'GroupNorm': Kind(normalization.ncnn_group_norm, None),
    'Normalize': Kind(normalization.ncnn_normalize, None),
    'Reduction': Kind(normalization.ncnn_reduction, None),
    'ReLU': Kind(ncnn_simple('ReLU', lambda p: [(0, float(p['slope']))] if p['slope'] else []),
                 activations.caffe_standalone, None, 'keeps'),
    'Clip': Kind(ncnn_simple('Clip', lambda p: [(0, float(p['low'])), (1, float(p['high']))]),
                 activations.caffe_standalone, None, 'keeps'),
    'Sigmoid': Kind(ncnn_simple('Sigmoid'), activations.caffe_standalone, _act('sigmoid'),
                    'keeps'),
    'TanH': Kind(ncnn_simple('TanH'), caffe_simple('TanH'), _act('tanh'), 'keeps'),
    'Swish': Kind(ncnn_simple('Swish'), None, _act('swish'), 'keeps'),
    'ELU': Kind(ncnn_simple('ELU', lambda p: [(0, float(p['alpha']))]), activations.caffe_elu,
                _act('elu'), 'keeps'),
    'PReLU': Kind(activations.ncnn_prelu, activations.caffe_prelu, None, 'keeps'),
    'GELU': Kind(ncnn_simple('GELU'), None, None, 'keeps'),
    'HardSigmoid': Kind(ncnn_simple('HardSigmoid', lambda p: [(0, float(p['alpha'])),
                                                              (1, float(p['beta']))]),
                        None, _act('hardsigmoid'), 'keeps'),
    'HardSwish': Kind(ncnn_simple('HardSwish', lambda p: [(0, float(p['alpha'])),
                                                          (1, float(p['beta']))]),
                      None, _act('hardswish'), 'keeps'),
    'Pooling': Kind(pooling.ncnn_pooling, pooling.caffe_pooling, pooling.simulate_pooling,
                    lambda layer: 'makes' if layer.params['global_pool'] else None),
    'Eltwise': Kind(ncnn_simple('Eltwise', lambda p: [(0, {'prod': 0, 'sum': 1,
                                                           'max': 2}[p['op']])]),
                    elementwise.caffe_eltwise, None, 'keeps'),
    'BinaryOp': Kind(elementwise.ncnn_binary, None, None,
                     lambda layer: 'keeps' if 'scalar' in layer.params else None),
    'UnaryOp': Kind(elementwise.ncnn_unary, None, None, 'keeps'),
    'Scale': Kind(elementwise.ncnn_scale, None),
    'Concat': Kind(ncnn_simple('Concat', lambda p: [(0, p['axis'] - 1)]), shape.caffe_concat,
                   None, 'keeps'),
    'Flatten': Kind(ncnn_simple('Flatten'), shape.caffe_flatten, None, 'makes'),
    'Reshape': Kind(shape.ncnn_reshape, shape.caffe_reshape, None, 'reads'),
    'Permute': Kind(ncnn_simple('Permute', lambda p: [(0, p['order'])]), None),
    'Crop': Kind(shape.ncnn_crop, None),
    'Softmax': Kind(ncnn_simple('Softmax', lambda p: [(0, p['axis'] - 1), (1, 1)]),
                    shape.caffe_softmax, None, 'keeps'),
    'Padding': Kind(shape.ncnn_padding, None),
    'Interp': Kind(resize.ncnn_interp, None, resize.simulate_interp),
    'ShuffleChannel': Kind(ncnn_simple('ShuffleChannel', lambda p: [(0, p['group'])]), None),
    'MemoryData': Kind(detection.ncnn_memory_data, None),
    'DetectionOutput': Kind(detection.ncnn_detection_output, None),
    'Yolov3DetectionOutput': Kind(detection.ncnn_yolov3_detection_output, None),
}
