"""Normalizations computed at run time (InstanceNorm, LayerNorm, GroupNorm) and reductions
(sum, mean over axes): fp32 layers in ncnn, whose means and variances are summed in ncnn's
order, not MXNet's, so the simulation is within a few float32 ulps, not bit-exact.
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
