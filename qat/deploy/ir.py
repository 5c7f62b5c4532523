"""The deployment graph: a flat list of layers that every writer (Caffe, ncnn, table) and the
numpy runtime read. It is built by ``qat.deploy.graph.trace`` from a converted Gluon net.

A ``Layer``'s name is also the name of the blob it produces (one output per layer). Layers
are in topological order; the first is the ``Input``. Weights are float32 numpy arrays with
BN already folded; an int8 layer also carries its integer weight codes and scales (``Quant``).

Kinds and their ``params`` (shapes are per sample, without the batch axis; every kind's
writers and simulation are in the op table, ``qat.deploy.optable.LAYERS``):

==============  ====================================================================
Input           shape (C, H, W)
Convolution     num_output, kernel (kh, kw), stride (sh, sw), pad (ph, pw),
                dilate (dh, dw), groups, activation; weights: weight (O, I/g, kh, kw),
                bias (O,) [optional]
InnerProduct    num_output, activation; weights: weight (O, I), bias (O,) [optional];
                the input is flattened (c, h, w order)
BatchNorm       channels, eps; weights: gamma, beta, mean, var (gamma = 1 when fixed)
Deconvolution   num_output, kernel, stride, pad, dilate, adj (output padding), activation;
                weights: weight (O, I, kh, kw) (ncnn's order), bias [optional]; fp32
InstanceNorm    channels, eps; weights: gamma, beta (C,)
LayerNorm       size (of the last axis), eps; weights: gamma, beta (size,)
GroupNorm       groups, channels, eps; weights: gamma, beta (C,)
Reduction       op ('sum' | 'mean'), axes (ncnn axes), keepdims
Normalize       across_spatial, across_channel (0 / 1), eps; weights: scale (C,) or (1,):
                L2Normalization (times SSD's learned per-channel scale)
ReLU            slope (0.0 = plain ReLU, else leaky)
Clip            low, high
Sigmoid, TanH, Swish, GELU   -
ELU             alpha
PReLU           weights: slope (C,) (one value: shared)
HardSigmoid     alpha, beta: clamp(x * alpha + beta, 0, 1)
HardSwish       alpha, beta: x * clamp(x * alpha + beta, 0, 1)
Pooling         pool ('max' | 'avg'), kernel, stride, pad, global_pool (bool),
                full (bool: MXNet 'full' = ceil convention), count_include_pad (bool);
                or pool, global_pool False, adaptive (out_h, out_w)
Eltwise         op ('sum' | 'prod' | 'max'); two or more inputs of the same shape
BinaryOp        op ('add' | 'sub' | 'mul' | 'div' | 'max' | 'min' | 'rsub' | 'rdiv'),
                scalar (optional: the second operand); else two inputs that broadcast
Scale           weights: scale (C,): a product with a per-channel constant; exact
UnaryOp         op (the MXNet op: 'abs' | 'negative' | 'floor' | 'ceil' | 'square')
Concat          axis (MXNet axis of the NCHW tensor: 1 = channels)
Flatten         -
Reshape         shape (the per-sample output shape)
Permute         order (ncnn's order_type of a (C, H, W) sample)
Crop            starts, ends, axes (ncnn axes: 0 = the first per-sample axis)
Softmax         axis (MXNet axis of the batched tensor)
Padding         top, bottom, left, right, mode ('constant' | 'edge' | 'reflect'), value
                (of the constant mode); fp32 in ncnn, no arithmetic: exact
Interp          mode ('nearest' | 'bilinear'), height, width (of the output),
                align_corners (bool)
ShuffleChannel  group: ShuffleNet's channel shuffle (reshape to (group, C/group), swap,
                flatten back); a permutation: exact
MemoryData      shape (h, w); weights: data (h, w) float32 (SSD's priors)
DetectionOutput num_class (with the background), nms_threshold, nms_top_k, keep_top_k,
                confidence_threshold, variances; inputs: location (A, 4), softmaxed
                confidence (A, num_class), priors (2, A * 4) (``optable.detection``)
Yolov3DetectionOutput  num_class, num_box, confidence_threshold, nms_threshold, biases,
                mask, anchors_scale; inputs: the raw prediction convs of every output
==============  ====================================================================

``activation`` (fused into Convolution / InnerProduct) is None or one of
``('relu',)``, ``('leaky', slope)``, ``('clip', low, high)``, ``('sigmoid',)``.

``Layer.shape`` is the per-sample output shape MXNet infers (None in hand-built graphs);
``Layer.sim_inputs`` the MXNet graph nodes (keys) the layer's computation reads and
``Layer.origin`` its first node, which the verifier needs where it computes a layer with
ncnn's arithmetic.
"""
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from ..errors import UserError



class ExportError(UserError):
    """The net cannot be exported as it is; the message names the op, layer or value."""


@dataclass
class Quant:
    """What makes a Convolution / InnerProduct int8 in ncnn (docs/ncnn-int8-contract.md §3.2).

    input_scale: s_in = qmax / threshold (float32) of the layer's input blob; None for
        weight-only quantization, which ncnn runs in fp32 with the weights codes / s_w.
    weight_scales: (O,) float32, one per output channel; for a grouped convolution all the
        channels of a group carry the same value (ncnn keeps one per group).
    weight_codes: int8 array shaped like the weight: float2int8(w * s_w) as trained.
    """
    input_scale: Optional[np.float32]
    weight_scales: np.ndarray
    weight_codes: np.ndarray
    input_bits: Optional[int] = 8
    weight_bits: int = 8
    input_signed: bool = True  # False: codes 0 .. 2^b - 1 (b <= 7, they fit int8)

    @property
    def int8(self):
        """True when ncnn runs the layer in int8 (input and weights quantized)."""
        return self.input_scale is not None


@dataclass
class Layer:
    kind: str
    name: str
    inputs: list
    params: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    quant: Optional[Quant] = None
    source: str = ''  # the MXNet graph node whose output this layer's output equals
    shape: Optional[tuple] = None
    sim_inputs: list = field(default_factory=list)
    origin: str = ''  # the MXNet graph node the layer was traced at (its first node)

    def group_scales(self):
        """Weight scales as ncnn stores them: per output channel, or per group when grouped."""
        scales = self.quant.weight_scales
        groups = self.params.get('groups', 1)
        if groups == 1:
            return scales
        return scales.reshape(groups, -1)[:, 0]


@dataclass
class Graph:
    layers: list
    outputs: list

    def __getitem__(self, name):
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def consumers(self, name):
        """Layers that read blob ``name``, in order."""
        return [layer for layer in self.layers if name in layer.inputs]

    @property
    def input(self):
        return self.layers[0]

    def float_graph(self):
        """This graph without the layers only the int8 model needs (``params['int8_only']``,
        e.g. the saturating Clip in front of a narrow-input layer), consumers rewired."""
        dropped = {layer.name: layer.inputs[0] for layer in self.layers
                   if layer.params.get('int8_only')}
        layers = [replace(layer, inputs=[dropped.get(i, i) for i in layer.inputs])
                  for layer in self.layers if layer.name not in dropped]
        return Graph(layers, [dropped.get(o, o) for o in self.outputs])
