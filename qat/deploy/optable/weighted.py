"""The layers with weights: Convolution, FullyConnected and BatchNorm.

Traced: each Convolution / FullyConnected node is matched to its quantized block by name and
gets the block's integer weight codes and scales, computed by the same functions the training
graph uses; a BatchNorm that is a conv's only consumer is folded into it (``qat.ops.fold_bn``),
and an activation that is its only consumer is fused. Written to ncnn as Convolution /
ConvolutionDepthWise / InnerProduct (int8 with ``8=`` scale terms, requantized ``8=10x``
between consecutive int8 convolutions: contract §3.4) and BatchNorm; to Caffe as Convolution /
InnerProduct and BatchNorm + Scale. Simulated by the quantized blocks themselves.
"""
import numpy as np
from mxnet import nd

from ... import ops
from ...nn import QConv2DBatchNorm
from ..ir import ExportError, Quant
from . import activations
from .base import IntArray, caffe_layer, caffe_unique, flag, ints, ncnn_arithmetic, refuse

NO_WINOGRAD = 64  # 31= feature mask bit 6: this layer never runs Winograd
# ncnn's int8 ConvolutionDepthWise gives garbage (or NaN) with packing on for a grouped,
# non-depthwise conv with a multiple of this many outputs per group and a dequantized
# (not requantized, 8=1) output. It runs one Convolution per group into a slice of its
# output prepared with elempack 4 (num_output_g % 4 == 0), while the x86 AVX / AVX-512
# int8 Convolution writes its dequantized (fp32) result with elempack 8 or 16 when
# num_output_g % 8 == 0: Mat::create then allocates a new Mat, and the slice of the layer's
# output is never written (ncnn a4d2ea1d, convolutiondepthwise_x86.cpp forward_int8_x86 vs
# convolution_x86.cpp forward_int8_x86). Requantized outputs (8=101) use elempack 8 on both
# sides and are exact; so is the fp32 path.
PACKING_BUG_GROUP_OUTPUTS = 8


# ---- tracing --------------------------------------------------------------------------------
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
    if not cfg.input_signed and cfg.input_bits > 7:
        raise ExportError(f"{block.name}: unsigned {cfg.input_bits}-bit input codes (0..."
                          f"{2 ** cfg.input_bits - 1}) do not fit ncnn's int8 (-127..127); use "
                          f"QuantConfig(input_signed=True) or input_bits <= 7")
    s_in = block.input_scale()
    if s_in is None:
        raise ExportError(f"{block.name}: input range is unset (never calibrated or trained "
                          f"with input quantization); run qat.calibrate first")
    quant = Quant(input_scale=s_in,
                  weight_scales=s_w.asnumpy().astype(np.float32),
                  weight_codes=codes.asnumpy().astype(np.int8),
                  input_bits=cfg.input_bits, weight_bits=cfg.weight_bits,
                  input_signed=cfg.input_signed)
    return quant, weight, bias


def _fold_real_bn(quant, weight, bias, bn_params, bn_attrs, groups, name):
    """Fold a BatchNorm the converter left in place (``bn_params`` = gamma, beta, mean, var)
    into the preceding conv (same fold function). The int8 codes stay as trained; their
    scales absorb the BN factor."""
    gamma, beta, mean, var = bn_params
    eps, fix_gamma = float(bn_attrs.get('eps', 1e-3)), flag(bn_attrs.get('fix_gamma'), True)
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


def _trace_weighted(t, index, node, kind, params):
    """Convolution / FullyConnected with its quantized block, BN fold and activation."""
    attrs = node.get('attrs', {})
    no_bias = flag(attrs.get('no_bias'))
    weight = t.param(node, 1)
    bias = None if no_bias else t.param(node, 2)
    block, _ = t.blocks.get(node['name'], (None, None))
    groups = params.get('groups', 1)
    end, name = index, (block.name if block is not None else node['name'])
    quant = None
    user = t.only_consumer(index) if kind == 'Convolution' else None
    bn_node = t.nodes[user] if user is not None else None
    folds_bn = bn_node is not None and bn_node['op'] == 'BatchNorm' \
        and int(bn_node.get('attrs', {}).get('axis', 1)) == 1
    bn_params = [t.param(bn_node, i) for i in range(1, 5)] if folds_bn else None
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
        t.absorbed.add(end)
    params['bias_term'] = bias is not None
    params['activation'] = None
    layer = t.add(kind, index, t.data_inputs(node)[:1], params,
                  {'weight': weight.asnumpy().astype(np.float32),
                   'bias': None if bias is None else bias.asnumpy().astype(np.float32)},
                  quant, name=name, source=t.key(end))
    t.blob[end] = layer.name
    t.fuse_activation(end, layer)
    return layer


def trace_convolution(t, index, node):
    attrs = node.get('attrs', {})
    if attrs.get('layout', 'NCHW') != 'NCHW' or len(ints(attrs['kernel'], ())) != 2:
        raise refuse(t, node, "only 2-D NCHW convolutions are supported")
    params = {'num_output': int(attrs['num_filter']),
              'kernel': ints(attrs['kernel']),
              'stride': ints(attrs.get('stride'), (1, 1)) or (1, 1),
              'pad': ints(attrs.get('pad'), (0, 0)) or (0, 0),
              'dilate': ints(attrs.get('dilate'), (1, 1)) or (1, 1),
              'groups': int(attrs.get('num_group', 1))}
    _trace_weighted(t, index, node, 'Convolution', params)


def trace_fully_connected(t, index, node):
    attrs = node.get('attrs', {})
    source = t.data_inputs(node)[0]
    if not flag(attrs.get('flatten'), True) and len(t.shape(source)) > 2:
        raise refuse(t, node, f"Dense(flatten=False) on a {len(t.shape(source))}-D input")
    _trace_weighted(t, index, node, 'InnerProduct', {'num_output': int(attrs['num_hidden'])})


def trace_deconvolution(t, index, node):
    """Conv2DTranspose: an fp32 ncnn Deconvolution (the converter leaves it float); MXNet's
    weight (in, out, kh, kw) is ncnn's (out, in, kh, kw) transposed."""
    attrs = node.get('attrs', {})
    kernel = ints(attrs['kernel'])
    groups = int(attrs.get('num_group', 1))
    if attrs.get('layout', 'NCHW') != 'NCHW' or len(kernel) != 2 or groups != 1:
        raise refuse(t, node, "only 2-D NCHW deconvolutions without groups")
    weight = t.param(node, 1).asnumpy().astype(np.float32).transpose(1, 0, 2, 3)
    bias = None if flag(attrs.get('no_bias')) else t.param(node, 2).asnumpy().astype(np.float32)
    params = {'num_output': int(attrs['num_filter']), 'kernel': kernel,
              'stride': ints(attrs.get('stride'), (1, 1)) or (1, 1),
              'pad': ints(attrs.get('pad'), (0, 0)) or (0, 0),
              'dilate': ints(attrs.get('dilate'), (1, 1)) or (1, 1),
              'adj': ints(attrs.get('adj'), (0, 0)) or (0, 0),
              'bias_term': bias is not None, 'activation': None}
    layer = t.add('Deconvolution', index, t.data_inputs(node)[:1], params,
                  {'weight': np.ascontiguousarray(weight), 'bias': bias})
    t.fuse_activation(index, layer)


def ncnn_deconvolution(layer, graph, int8, guarded, out):
    p = layer.params
    pairs = _conv_geometry(p, p['num_output'], layer.weights['weight'].size)
    adj_h, adj_w = p['adj']
    pairs += [(18, adj_w), (19, adj_h)] + activations.ncnn_fused(p['activation'])
    out.tagged(layer.weights['weight'])
    if p['bias_term']:
        out.raw(layer.weights['bias'])
    return 'Deconvolution', pairs


def trace_batchnorm(t, index, node):
    """A BatchNorm not folded into a conv: ncnn's fp32 BatchNorm layer, the same
    parameters. The simulation computes it as ncnn does (``QBatchNorm`` with BN frozen:
    ``ops.batchnorm_ncnn``, docs/ncnn-int8-contract.md §3.6)."""
    attrs = node.get('attrs', {})
    if int(attrs.get('axis', 1)) != 1:
        raise refuse(t, node, "BatchNorm axis must be 1")
    gamma, beta, mean, var = (t.param(node, i).asnumpy() for i in range(1, 5))
    if flag(attrs.get('fix_gamma'), True):
        gamma = np.ones_like(gamma)
    t.add('BatchNorm', index, t.data_inputs(node)[:1],
          {'channels': len(mean), 'eps': float(attrs.get('eps', 1e-3))},
          {'gamma': gamma, 'beta': beta, 'mean': mean, 'var': var})


# ---- ncnn -----------------------------------------------------------------------------------
def is_depthwise(layer):
    """ncnn's depthwise test (input channels == groups == outputs); other grouped convs run
    as one Convolution per group inside ConvolutionDepthWise."""
    p = layer.params
    return layer.weights['weight'].shape[1] * p['groups'] == p['groups'] == p['num_output']


def splits_groups(graph, layer):
    """True when the int8 model writes ``layer`` as Slice -> one int8 Convolution per group
    -> Concat instead of ConvolutionDepthWise: an int8 grouped (not depthwise) conv with a
    multiple of PACKING_BUG_GROUP_OUTPUTS outputs per group whose output is dequantized,
    the class ncnn gets wrong with packing on (contract §4.3)."""
    p, quant = layer.params, layer.quant
    if layer.kind != 'Convolution' or quant is None or not quant.int8 or p['groups'] == 1 \
            or is_depthwise(layer):
        return False
    return (p['num_output'] // p['groups']) % PACKING_BUG_GROUP_OUTPUTS == 0 \
        and requantized_scale(graph, layer) is None


def requantized_scale(graph, layer):
    """The top scale ncnn fuses into an int8 conv (8=10x), or None.

    Fused when every consumer of the conv's output is an int8 Convolution with the same input
    scale (through a Split all consumers get one scale, so they must agree), and the output
    is not a network output: the consumers then read int8 codes directly (contract §3.4).
    A consumer written as per-group convolutions (``splits_groups``) reads through a Slice,
    which ncnn's x86 runtime cannot cut in int8 (it repacks pack-8 int8 as float): no
    fusion into it."""
    quant = layer.quant
    if layer.kind != 'Convolution' or quant is None or not quant.int8 \
            or layer.name in graph.outputs:
        return None
    users = graph.consumers(layer.name)
    if not users or any(u.kind != 'Convolution' or u.quant is None or not u.quant.int8
                        or splits_groups(graph, u) for u in users):
        return None
    scales = {float(u.quant.input_scale) for u in users}
    return users[0].quant.input_scale if len(scales) == 1 else None


def _conv_geometry(p, num_output, weight_size):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = p['kernel'], p['stride'], p['pad'], p['dilate']
    return [(0, num_output), (1, kw), (11, kh), (2, dw), (12, dh), (3, sw), (13, sh),
            (4, pw), (14, ph), (5, int(p['bias_term'])), (6, weight_size)]


def _weights(layer, int8, use_int8, out):
    """Weight blob (int8 codes, dequantized weight-only codes, or float) and raw bias."""
    quant = layer.quant
    if use_int8:
        out.tagged(quant.weight_codes, int8=True)
    elif int8 and quant is not None:  # weight-only: the simulation's dequantized weights
        shape = (-1,) + (1,) * (quant.weight_codes.ndim - 1)
        out.tagged(quant.weight_codes.astype(np.float32)
                   / quant.weight_scales.reshape(shape))
    else:
        out.tagged(layer.weights['weight'])
    if layer.params['bias_term']:
        out.raw(layer.weights['bias'])


def ncnn_convolution(layer, graph, int8, guarded, out):
    p, quant = layer.params, layer.quant
    weight = layer.weights['weight']
    grouped = p['groups'] > 1
    pairs = _conv_geometry(p, p['num_output'], weight.size)
    if grouped:
        pairs.append((7, p['groups']))
    use_int8 = int8 and quant is not None and quant.int8
    top_scale = requantized_scale(graph, layer) if use_int8 else None
    if use_int8:
        pairs.append((8, (1 if grouped else 2) + (100 if top_scale is not None else 0)))
    pairs += activations.ncnn_fused(p['activation'])
    if use_int8 and layer.name in guarded:
        pairs.append((31, NO_WINOGRAD))
    _weights(layer, int8, use_int8, out)
    if use_int8:
        out.raw(layer.group_scales() if grouped else quant.weight_scales)
        out.raw([quant.input_scale])
        if top_scale is not None:
            out.raw([top_scale])
    return ('ConvolutionDepthWise' if grouped else 'Convolution'), pairs


def ncnn_split_convolution(layer, bottom, guarded, out):
    """The lines [(type, name, bottoms, tops, pairs)] of an int8 grouped conv written as
    Slice -> one int8 Convolution per group -> Concat (``splits_groups``); blobs into ``out``.

    Each group's Convolution is the one ncnn's ConvolutionDepthWise would create: that
    group's codes and bias, its scale for each of its outputs (8=2), the layer's input
    scale, the fused activation, and ``31=64`` when the layer is Winograd-guarded (the
    per-group channel counts, hence ncnn's Winograd choice, are the same). The Concat
    carries the layer's name, so the output blob keeps it."""
    p, quant = layer.params, layer.quant
    groups = p['groups']
    codes, bias = quant.weight_codes, layer.weights.get('bias')
    outputs, inputs = p['num_output'] // groups, codes.shape[1]
    slices = [f"{layer.name}_slice_{g}" for g in range(groups)]
    parts = [f"{layer.name}_group_{g}" for g in range(groups)]
    lines = [('Slice', f"{layer.name}_slice", [bottom], slices,
              [(0, IntArray([inputs] * groups)), (1, 0)])]
    for g in range(groups):
        rows = slice(g * outputs, (g + 1) * outputs)
        pairs = _conv_geometry(p, outputs, codes[rows].size) + [(8, 2)]
        pairs += activations.ncnn_fused(p['activation'])
        if layer.name in guarded:
            pairs.append((31, NO_WINOGRAD))
        out.tagged(codes[rows], int8=True)
        if p['bias_term']:
            out.raw(bias[rows])
        out.raw(quant.weight_scales[rows])
        out.raw([quant.input_scale])
        lines.append(('Convolution', parts[g], [slices[g]], [parts[g]], pairs))
    lines.append(('Concat', layer.name, parts, [layer.name], [(0, 0)]))
    return lines


def ncnn_inner_product(layer, graph, int8, guarded, out):
    p, quant = layer.params, layer.quant
    use_int8 = int8 and quant is not None and quant.int8
    pairs = [(0, p['num_output']), (1, int(p['bias_term'])), (2, layer.weights['weight'].size)]
    if use_int8:
        pairs.append((8, 2))
    pairs += activations.ncnn_fused(p['activation'])
    _weights(layer, int8, use_int8, out)
    if use_int8:
        out.raw(quant.weight_scales)
        out.raw([quant.input_scale])
    return 'InnerProduct', pairs


def ncnn_batchnorm(layer, graph, int8, guarded, out):
    w = layer.weights
    for key in ('gamma', 'mean', 'var', 'beta'):  # ncnn order: slope, mean, var, bias
        out.raw(w[key])
    return 'BatchNorm', [(0, layer.params['channels']), (1, float(layer.params['eps']))]


def _fast_depthwise(layer):
    """True when ncnn's x86 int8 ConvolutionDepthWise (unpacked) runs ``layer`` in its 3x3
    stride 1 / 2 kernels, which dequantize with FMA like every other int8 layer. Its generic
    loop (any other kernel, stride or dilation, or a fused activation other than ReLU)
    rounds ``acc * scale`` before adding the bias (measured)."""
    p = layer.params
    return p['kernel'] == (3, 3) and p['stride'] in ((1, 1), (2, 2)) \
        and p['dilate'] == (1, 1) and p['activation'] in (None, ('relu',))


def simulate_convolution(layer):
    """An int8 depthwise conv on ncnn's generic loop: its dequantization unfused; and the
    fused activation's arithmetic."""
    overrides = []
    if layer.quant is not None and layer.quant.int8 and is_depthwise(layer) \
            and not _fast_depthwise(layer):
        overrides.append(ncnn_arithmetic(layer.origin, 'qat_dequantize', fused=0))
    return overrides + activations.simulate_fused(layer)


# ---- Caffe ----------------------------------------------------------------------------------
def _caffe_weighted(layer, kind, taken, **param):
    """A Convolution / InnerProduct and its fused activation as an in-place layer."""
    blobs = [layer.weights['weight']]
    if layer.weights.get('bias') is not None:
        blobs.append(layer.weights['bias'])
    out = [caffe_layer(layer.name, kind, layer.inputs, layer.name, blobs, **param)]
    act = layer.params.get('activation')
    if act is not None:
        name = caffe_unique(f'{layer.name}_{act[0]}', taken)
        out.append(activations.caffe_fused(name, layer.name, layer.name, act))
    return out


def caffe_convolution(layer, inputs, taken):
    p = layer.params
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = p['kernel'], p['stride'], p['pad'], p['dilate']
    fields = {'num_output': p['num_output'], 'bias_term': layer.weights.get('bias') is not None,
              'pad_h': ph, 'pad_w': pw, 'kernel_h': kh, 'kernel_w': kw,
              'stride_h': sh, 'stride_w': sw, 'group': p.get('groups', 1),
              # caffe2ncnn reads only dilation(0): one value when both axes agree
              'dilation': [dh] if dh == dw else [dh, dw]}
    return _caffe_weighted(layer, 'Convolution', taken, convolution_param=fields)


def caffe_inner_product(layer, inputs, taken):
    fields = {'num_output': layer.params['num_output'],
              'bias_term': layer.weights.get('bias') is not None}
    return _caffe_weighted(layer, 'InnerProduct', taken, inner_product_param=fields)


def caffe_batchnorm(layer, inputs, taken):
    w = layer.weights
    bn = caffe_layer(layer.name, 'BatchNorm', layer.inputs, layer.name,
                     [w['mean'], w['var'], np.ones(1, np.float32)],
                     batch_norm_param={'use_global_stats': True,
                                       'eps': float(layer.params['eps'])})
    scale = caffe_layer(caffe_unique(f'{layer.name}_scale', taken), 'Scale', [layer.name],
                        layer.name, [w['gamma'], w['beta']], scale_param={'bias_term': True})
    return [bn, scale]
