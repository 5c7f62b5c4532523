"""Normalizations computed at run time (InstanceNorm, LayerNorm, GroupNorm, L2Normalization)
and reductions (sum, mean over axes): fp32 layers in ncnn, whose means and variances are
summed in ncnn's order, not MXNet's, so the simulation is within a few float32 ulps, not
bit-exact.
"""
import numpy as np

from .base import IntArray, flag, ints, ncnn_axis, refuse

NCNN_REDUCTION = {'sum': 0, 'mean': 3}


def _affine(t, node, count):
    gamma = t.param(node, 1).asnumpy().astype(np.float32)
    beta = t.param(node, 2).asnumpy().astype(np.float32)
    if gamma.size != count or beta.size != count:
        raise refuse(t, node, f"gamma / beta of {gamma.size} / {beta.size} values, expected "
                              f"{count}")
    return {'gamma': gamma, 'beta': beta}


def trace_instance_norm(t, index, node):
    shape = t.shape(index)
    if len(shape) != 4:
        raise refuse(t, node, "InstanceNorm of a 4-D (N, C, H, W) tensor only")
    eps = float(node.get('attrs', {}).get('eps', 1e-3))
    t.add('InstanceNorm', index, t.data_inputs(node)[:1], {'channels': shape[1], 'eps': eps},
          _affine(t, node, shape[1]))


def trace_layer_norm(t, index, node):
    attrs = node.get('attrs', {})
    shape = t.shape(index)
    if int(attrs.get('axis', -1)) % len(shape) != len(shape) - 1:
        raise refuse(t, node, "LayerNorm over the last axis only (ncnn's affine_size = w)")
    t.add('LayerNorm', index, t.data_inputs(node)[:1],
          {'size': shape[-1], 'eps': float(attrs.get('eps', 1e-5))},
          _affine(t, node, shape[-1]))


# MXNet L2Normalization mode -> ncnn Normalize (across_spatial, across_channel)
L2_MODES = {'channel': (0, 1), 'instance': (1, 1), 'spatial': (1, 0)}


def trace_l2_normalization(t, index, node):
    """L2Normalization (x / sqrt(sum x^2 + eps)) -> ncnn Normalize (eps_mode 0, the same
    formula as x * (1 / sqrtf(ssum + eps)) * scale); a following broadcast_mul by a
    (1, C, 1, 1) parameter (SSD's ``Normalize`` block) becomes its per-channel scale."""
    attrs = node.get('attrs', {})
    mode = attrs.get('mode', 'instance')
    shape = t.shape(index)
    if mode not in L2_MODES or len(shape) != 4:
        raise refuse(t, node, f"L2Normalization of a 4-D tensor in modes {sorted(L2_MODES)}, "
                              f"got mode {mode!r} on {shape}")
    scale, end = np.ones(1, np.float32), index
    user = t.only_consumer(index)
    if user is not None and t.nodes[user]['op'] in ('broadcast_mul', 'elemwise_mul'):
        operands = [source for source, *_ in t.nodes[user]['inputs'] if source != index]
        if len(operands) == 1 and t.nodes[operands[0]]['op'] == 'null' \
                and t.nodes[operands[0]]['name'] in t.values:
            value = t.values[t.nodes[operands[0]]['name']].asnumpy().astype(np.float32)
            if value.size == 1 or value.shape == (1, shape[1], 1, 1):
                scale, end = value.reshape(-1), user
    spatial, channel = L2_MODES[mode]
    layer = t.add('Normalize', index, t.data_inputs(node)[:1],
                  {'across_spatial': spatial, 'across_channel': channel,
                   'eps': float(attrs.get('eps', 1e-10))}, {'scale': scale},
                  source=t.key(end))
    if end != index:
        t.absorb([end], index)
    return layer


def ncnn_normalize(layer, graph, int8, guarded, out):
    p, scale = layer.params, layer.weights['scale']
    out.raw(scale)  # Normalize reads its scales raw (no tag)
    return 'Normalize', [(0, p['across_spatial']), (1, int(scale.size == 1)),
                         (2, float(p['eps'])), (3, int(scale.size)), (4, p['across_channel']),
                         (9, 0)]


def trace_group_norm(t, index, node):
    attrs = node.get('attrs', {})
    shape = t.shape(index)
    if len(shape) != 4:
        raise refuse(t, node, "GroupNorm of a 4-D (N, C, H, W) tensor only")
    groups = int(attrs.get('num_groups', 1))
    # MXNet's gamma / beta are per group, ncnn's per channel
    affine = {key: np.repeat(value, shape[1] // groups)
              for key, value in _affine(t, node, groups).items()}
    t.add('GroupNorm', index, t.data_inputs(node)[:1],
          {'groups': groups, 'channels': shape[1], 'eps': float(attrs.get('eps', 1e-5))},
          affine)


def trace_reduction(t, index, node):
    attrs = node.get('attrs', {})
    source = t.data_inputs(node)[0]
    rank = len(t.shape(source))
    axes = ints(attrs.get('axis'), ()) or tuple(range(1, rank))
    if flag(attrs.get('exclude')) or any(a % rank == 0 for a in axes):
        raise refuse(t, node, f"a reduction over axes {axes} (not the batch, no exclude)")
    t.add('Reduction', index, [source], {
        'op': node['op'], 'axes': tuple(sorted(ncnn_axis(a, rank) for a in axes)),
        'keepdims': flag(attrs.get('keepdims'))})


def _affine_blobs(layer, out):
    out.raw(layer.weights['gamma'])
    out.raw(layer.weights['beta'])


def ncnn_instance_norm(layer, graph, int8, guarded, out):
    _affine_blobs(layer, out)
    p = layer.params
    return 'InstanceNorm', [(0, p['channels']), (1, float(p['eps'])), (2, 1)]


def ncnn_layer_norm(layer, graph, int8, guarded, out):
    _affine_blobs(layer, out)
    p = layer.params
    return 'LayerNorm', [(0, p['size']), (1, float(p['eps'])), (2, 1)]


def ncnn_group_norm(layer, graph, int8, guarded, out):
    _affine_blobs(layer, out)
    p = layer.params
    return 'GroupNorm', [(0, p['groups']), (1, p['channels']), (2, float(p['eps'])), (3, 1)]


def ncnn_reduction(layer, graph, int8, guarded, out):
    p = layer.params
    return 'Reduction', [(0, NCNN_REDUCTION[p['op']]), (1, 0), (3, IntArray(p['axes'])),
                         (4, int(p['keepdims'])), (5, 1)]
