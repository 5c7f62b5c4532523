"""Pooling: max and average (windowed, global, adaptive) -> ncnn Pooling, Caffe Pooling.

Simulation: max pooling is exact anywhere; a windowed average is ncnn's in the deployed blocks
(``QAvgPool2D``: ``qat.ops.avgpool_ncnn``); a global average (``Pooling(global_pool=True)``,
``GlobalAvgPool2D``, ``AdaptiveAvgPooling2D(output_size=1)``) is ncnn's unpacked summation
(``qat_ncnn_global_avgpool``). A general adaptive average has the same windows in ncnn and
MXNet (start floor(i * H / out), end ceil((i + 1) * H / out)) and MXNet's rounding.
"""
from ..ir import ExportError
from .base import caffe_layer, flag, ints, ncnn_arithmetic, refuse

POOL_METHODS = {'max': 'MAX', 'avg': 'AVE'}  # IR pool -> Caffe PoolMethod


def _has_tail(shape, params):
    """True if the 'full' (ceil) convention gives a larger output than 'valid' (floor)."""
    for size, k, s, p in zip(shape[2:], params['kernel'], params['stride'], params['pad']):
        if (size + 2 * p - k) % s:
            return True
    return False


def trace_pooling(t, index, node):
    attrs = node.get('attrs', {})
    pool = attrs.get('pool_type', 'max')
    if pool not in ('max', 'avg') or attrs.get('layout', 'NCHW') != 'NCHW':
        raise refuse(t, node, f"pool_type {pool!r} (only max and avg, NCHW)")
    params = {'pool': pool, 'kernel': ints(attrs.get('kernel'), (1, 1)),
              'stride': ints(attrs.get('stride'), (1, 1)) or (1, 1),
              'pad': ints(attrs.get('pad'), (0, 0)) or (0, 0),
              'global_pool': flag(attrs.get('global_pool')),
              'full': attrs.get('pooling_convention', 'valid') == 'full',
              'count_include_pad': flag(attrs.get('count_include_pad'), True)}
    source = t.data_inputs(node)[0]
    if pool == 'avg' and params['full'] and not params['global_pool'] \
            and any(params['pad']) and _has_tail(t.shape(source), params):
        raise refuse(t, node, "average pooling with padding and a ceil-mode tail has no exact "
                              "ncnn equivalent")
    t.add('Pooling', index, [source], params)


def trace_adaptive_avg(t, index, node):
    """``AdaptiveAvgPooling2D``: output 1x1 is a global average, any other size ncnn's
    adaptive pooling."""
    size = ints(node.get('attrs', {}).get('output_size'), (1,)) or (1,)
    out_h, out_w = (size * 2)[:2]
    params = {'pool': 'avg', 'global_pool': out_h == out_w == 1}
    if not params['global_pool']:
        params['adaptive'] = (out_h, out_w)
    t.add('Pooling', index, t.data_inputs(node)[:1], params)


def ncnn_pooling(layer, graph, int8, guarded, out):
    p = layer.params
    pairs = [(0, 0 if p['pool'] == 'max' else 1)]
    if p['global_pool']:
        return 'Pooling', pairs + [(4, 1)]
    if 'adaptive' in p:
        out_h, out_w = p['adaptive']
        return 'Pooling', pairs + [(7, 1), (8, out_w), (18, out_h)]
    (kh, kw), (sh, sw), (ph, pw) = p['kernel'], p['stride'], p['pad']
    pairs += [(1, kw), (11, kh), (2, sw), (12, sh), (3, pw), (14, pw), (13, ph), (15, ph),
              (5, 0 if p['full'] else 1)]
    if p['pool'] == 'avg':
        pairs.append((6, int(p['count_include_pad'])))
    return 'Pooling', pairs


def simulate_pooling(layer):
    if layer.params['pool'] == 'avg' and layer.params['global_pool']:
        return [ncnn_arithmetic(layer.source, 'qat_ncnn_global_avgpool', layer.sim_inputs)]
    return []


def caffe_pooling(layer, inputs, taken):
    p = layer.params
    fields = {'pool': POOL_METHODS[p['pool']]}
    if 'adaptive' in p:
        raise ExportError(f"Pooling layer {layer.name!r}: adaptive pooling has no Caffe "
                          f"equivalent")
    if p['global_pool']:
        fields['global_pooling'] = True
    else:
        (kh, kw), (sh, sw), (ph, pw) = p['kernel'], p['stride'], p['pad']
        fields.update(kernel_h=kh, kernel_w=kw, stride_h=sh, stride_w=sw, pad_h=ph, pad_w=pw)
        if _round_mode(layer, inputs[0]) == 'FLOOR':
            fields['round_mode'] = 'FLOOR'
    return [caffe_layer(layer.name, 'Pooling', layer.inputs, layer.name, pooling_param=fields)]


def _round_mode(layer, in_shape):
    """'CEIL' or 'FLOOR': the Caffe rounding that gives MXNet's output shape, checked."""
    p = layer.params
    if any(pad >= k for pad, k in zip(p['pad'], p['kernel'])):
        raise ExportError(f"Pooling layer {layer.name!r}: Caffe needs pad < kernel, got "
                          f"pad {tuple(p['pad'])} kernel {tuple(p['kernel'])}")
    if p['pool'] == 'avg' and any(p['pad']) and not p['count_include_pad']:
        raise ExportError(f"Pooling layer {layer.name!r}: Caffe's average pooling counts the "
                          f"padding (count_include_pad=False has no Caffe equivalent)")
    axes = list(zip(in_shape[1:], p['kernel'], p['stride'], p['pad']))
    want = [mxnet_pool_len(*axis, p['full']) for axis in axes]
    for mode in ('CEIL', 'FLOOR'):
        if [_caffe_pool_len(*axis, mode == 'CEIL') for axis in axes] == want:
            return mode
    raise ExportError(f"Pooling layer {layer.name!r}: no Caffe rounding gives MXNet's output "
                      f"size {tuple(want)} (input {tuple(in_shape[1:])}, "
                      f"{'full' if p['full'] else 'valid'} convention)")


def mxnet_pool_len(n, k, s, pad, full):
    return (n + 2 * pad - k + (s - 1 if full else 0)) // s + 1


def _caffe_pool_len(n, k, s, pad, ceil):
    size = (n + 2 * pad - k + (s - 1 if ceil else 0)) // s + 1
    # Caffe drops a last window that starts inside the right padding
    return size - 1 if pad and (size - 1) * s >= n + pad else size
