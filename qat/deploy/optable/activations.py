"""Activations, stand-alone or fused into the Convolution / InnerProduct before them.

MXNet spells them as ops (``Activation``, ``relu``, ``sigmoid``, ``tanh``, ``LeakyReLU`` with
its act_type, ``clip``, ``hard_sigmoid``) and as patterns of elementwise ops: hard sigmoid
``clip(x + 3, 0, 6) / 6`` (GluonCV's MobileNetV3), hard swish ``x * hard_sigmoid(x)``, swish
``x * sigmoid(x)`` (Gluon's ``nn.Swish``). Each becomes one ncnn layer. ReLU, leaky ReLU,
PReLU and Clip are exact in MXNet's own arithmetic; for sigmoid, tanh, swish, ELU and the hard
ones the simulation computes ncnn's (``qat_ncnn_act``, ``qat/native/ncnnmath.cc``). GELU is
exported with ncnn's erf form but simulated with MXNet's (within a few float32 ulps).
"""
import numpy as np

from .base import caffe_layer, ncnn_arithmetic, refuse

# Fusable activation tuples -> ncnn's fused activation id (9=) of Convolution / InnerProduct.
NCNN_FUSED = {'relu': 1, 'leaky': 2, 'clip': 3, 'sigmoid': 4}
MULTIPLY_OPS = ('elemwise_mul', '_mul', '_Mul', 'broadcast_mul')
HARD_SIGMOID = (np.float32(1 / 6), np.float32(0.5))  # ncnn's alpha, beta of relu6(x + 3) / 6


def fused(node):
    """The fusable activation tuple of a node ((relu,), (leaky, slope), (clip, low, high),
    (sigmoid,)), or None if it is not one."""
    op, attrs = node['op'], node.get('attrs', {})
    act_type = attrs.get('act_type')
    if (op == 'Activation' and act_type == 'relu') or op == 'relu':
        return ('relu',)
    if (op == 'Activation' and act_type == 'sigmoid') or op == 'sigmoid':
        return ('sigmoid',)
    if op == 'LeakyReLU' and attrs.get('act_type', 'leaky') == 'leaky':
        return ('leaky', float(attrs.get('slope', 0.25)))
    if op == 'clip':
        return ('clip', float(attrs['a_min']), float(attrs['a_max']))
    return None


def ncnn_fused(activation):
    """ncnn parameters (9=, 10=) of a fused activation tuple."""
    if activation is None:
        return []
    pairs = [(9, NCNN_FUSED[activation[0]])]
    if activation[0] == 'leaky':
        pairs.append((10, [activation[1]]))
    elif activation[0] == 'clip':
        pairs.append((10, [activation[1], activation[2]]))
    return pairs


def caffe_fused(name, bottom, top, act):
    """The Caffe layer of an activation tuple."""
    if act[0] == 'sigmoid':
        return caffe_layer(name, 'Sigmoid', [bottom], top)
    if act[0] == 'clip':
        return caffe_layer(name, 'Clip', [bottom], top,
                           clip_param={'min': float(act[1]), 'max': float(act[2])})
    slope = float(act[1]) if act[0] == 'leaky' else 0.0
    param = {'relu_param': {'negative_slope': slope}} if slope != 0 else {}
    return caffe_layer(name, 'ReLU', [bottom], top, **param)


def simulate_fused(layer):
    """The ncnn arithmetic of a fused activation that MXNet computes differently: an int8
    Convolution runs ncnn's Sigmoid layer on its output, an InnerProduct computes it in its
    scalar output loop with libm's expf (unpacked output, measured)."""
    activation = layer.params['activation']
    if activation is not None and activation[0] == 'sigmoid':
        return [ncnn_arithmetic(layer.source, 'qat_ncnn_act', layer.sim_inputs,
                                act='sigmoid' if layer.kind == 'Convolution' else 'sigmoid_libm')]
    return []


# ---- tracing --------------------------------------------------------------------------------
def trace_activation(t, index, node):
    """A stand-alone activation op."""
    op, attrs = node['op'], node.get('attrs', {})
    source = t.data_inputs(node)[:1]
    act = fused(node)
    if act is not None:
        if act[0] == 'clip':
            t.add('Clip', index, source, {'low': act[1], 'high': act[2]})
        elif act[0] == 'sigmoid':
            t.add('Sigmoid', index, source)
        else:
            t.add('ReLU', index, source, {'slope': act[1] if act[0] == 'leaky' else 0.0})
        return
    act_type = attrs.get('act_type')
    if op == 'tanh' or (op == 'Activation' and act_type == 'tanh'):
        t.add('TanH', index, source)
    elif op == 'hard_sigmoid':
        t.add('HardSigmoid', index, source, {'alpha': float(attrs.get('alpha', 0.2)),
                                             'beta': float(attrs.get('beta', 0.5))})
    elif op == 'LeakyReLU' and act_type == 'elu':
        t.add('ELU', index, source, {'alpha': float(attrs.get('slope', 0.25))})
    elif op == 'LeakyReLU' and act_type == 'prelu':
        slopes = t.param(node, 1).asnumpy().astype(np.float32).ravel()
        t.add('PReLU', index, source, {}, {'slope': slopes})
    elif op == 'LeakyReLU' and act_type == 'gelu':
        t.add('GELU', index, source)
    else:
        raise refuse(t, node, f"activation {act_type or op!r} has no ncnn equivalent "
                              f"(supported: relu, sigmoid, tanh, leaky, elu, prelu, gelu, clip, "
                              f"hard_sigmoid, hard swish, swish)")


def _scalar(node):
    return float(node.get('attrs', {}).get('scalar', 'nan'))


def _multiplies(t, node, a, b):
    """True if ``node`` is a product of the outputs of nodes ``a`` and ``b``."""
    return node['op'] in MULTIPLY_OPS and sorted(t.data_inputs(node)) == sorted([a, b])


def match_hard_sigmoid(t, index, node):
    """``clip(x + 3, 0, 6) / 6`` (or ``* (1/6)``) -> HardSigmoid; times x -> HardSwish."""
    if node['op'] != '_plus_scalar' or _scalar(node) != 3.0:
        return False
    clip = t.only_consumer(index)
    if clip is None or fused(t.nodes[clip]) != ('clip', 0.0, 6.0):
        return False
    scale = t.only_consumer(clip)
    scale_node = t.nodes[scale] if scale is not None else None
    if scale_node is None or not (
            (scale_node['op'] == '_div_scalar' and _scalar(scale_node) == 6.0)
            or (scale_node['op'] == '_mul_scalar'
                and np.float32(_scalar(scale_node)) == HARD_SIGMOID[0])):
        return False
    x = t.data_inputs(node)[0]
    end, kind, absorbed = scale, 'HardSigmoid', [clip, scale]
    product = t.only_consumer(scale)
    if product is not None and _multiplies(t, t.nodes[product], x, scale):
        end, kind, absorbed = product, 'HardSwish', absorbed + [product]
    alpha, beta = HARD_SIGMOID
    t.add(kind, index, [x], {'alpha': float(alpha), 'beta': float(beta)}, source=t.key(end))
    t.absorb(absorbed, index)
    return True


def match_swish(t, index, node):
    """``x * sigmoid(x)`` (Gluon's ``nn.Swish`` with beta 1 spells it
    ``x * sigmoid(x * 1.0)``) -> Swish."""
    absorbed = []
    if node['op'] == '_mul_scalar' and _scalar(node) == 1.0:
        x, sigmoid = t.data_inputs(node)[0], t.only_consumer(index)
        if sigmoid is None or fused(t.nodes[sigmoid]) != ('sigmoid',):
            return False
        absorbed.append(sigmoid)
    elif fused(node) == ('sigmoid',):
        x, sigmoid = t.data_inputs(node)[0], index
    else:
        return False
    product = t.only_consumer(sigmoid)
    if product is None or not _multiplies(t, t.nodes[product], x, sigmoid):
        return False
    t.add('Swish', index, [x], source=t.key(product))
    t.absorb(absorbed + [product], index)
    return True


# ---- ncnn and Caffe -------------------------------------------------------------------------
def ncnn_prelu(layer, graph, int8, guarded, out):
    slopes = layer.weights['slope']
    out.raw(slopes)
    return 'PReLU', [(0, len(slopes))]


def caffe_standalone(layer, inputs, taken):
    """ReLU / Clip / Sigmoid as their activation tuple's Caffe layer."""
    p = layer.params
    act = {'ReLU': ('leaky', p.get('slope', 0.0)), 'Sigmoid': ('sigmoid',),
           'Clip': ('clip', p.get('low'), p.get('high'))}[layer.kind]
    return [caffe_fused(layer.name, layer.inputs[0], layer.name, act)]


def caffe_prelu(layer, inputs, taken):
    return [caffe_layer(layer.name, 'PReLU', layer.inputs, layer.name, [layer.weights['slope']])]


def caffe_elu(layer, inputs, taken):
    return [caffe_layer(layer.name, 'ELU', layer.inputs, layer.name,
                        elu_param={'alpha': float(layer.params['alpha'])})]


def simulate_as(act):
    """The simulation of an activation kind: ncnn's arithmetic (``qat_ncnn_act``)."""
    def simulation(layer):
        attrs = {key: layer.params[key] for key in ('alpha', 'beta') if key in layer.params}
        return [ncnn_arithmetic(layer.source, 'qat_ncnn_act', layer.sim_inputs, act=act,
                                **attrs)]
    return simulation
