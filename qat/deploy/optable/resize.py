"""Resizing: ``UpSampling`` (nearest, integer scale), ``repeat`` along the height and / or
width (YOLOv3's upsampling) and ``BilinearResize2D`` (any output size, either corner
convention) -> ncnn Interp.

Nearest copies values: exact. Bilinear is ncnn's arithmetic in the simulation
(``qat_ncnn_bilinear``): the same source positions and weights as MXNet (align_corners:
x * (in - 1) / (out - 1); else (x + 0.5) * in / out - 0.5, clamped at the edges), but ncnn
rounds the weights and the products in its own order.
"""
from .base import flag, ncnn_arithmetic, refuse

NCNN_RESIZE = {'nearest': 1, 'bilinear': 2}


def trace_upsampling(t, index, node):
    attrs = node.get('attrs', {})
    if attrs.get('sample_type', 'nearest') != 'nearest' or int(attrs.get('num_args', 1)) != 1:
        raise refuse(t, node, "only nearest UpSampling of one input (bilinear UpSampling is a "
                              "deconvolution: use BilinearResize2D)")
    _, _, height, width = t.shape(index)
    t.add('Interp', index, t.data_inputs(node)[:1],
          {'mode': 'nearest', 'height': height, 'width': width, 'align_corners': False})


def trace_repeat(t, index, node):
    """``repeat`` of the height or width of an NCHW tensor (a run of them, e.g. YOLOv3's
    ``x.repeat(axis=-1).repeat(axis=-2)``, is one layer): nearest Interp to the output size,
    which copies source pixel ``y * in / out`` = ``y // repeats``: exact."""
    chain = [index]
    while True:
        user = t.only_consumer(chain[-1])
        if user is None or t.nodes[user]['op'] != 'repeat' or not _spatial_repeat(t, user):
            break
        chain.append(user)
    if not _spatial_repeat(t, index):
        raise refuse(t, node, "only repeat along the height or width of an NCHW tensor, "
                              "with repeats >= 1")
    _, _, height, width = t.shape(chain[-1])
    t.add('Interp', index, t.data_inputs(node)[:1],
          {'mode': 'nearest', 'height': height, 'width': width, 'align_corners': False},
          source=t.key(chain[-1]))
    t.absorb(chain[1:], index)


def _spatial_repeat(t, index):
    attrs = t.nodes[index].get('attrs', {})
    shape = t.shape(index)
    axis = attrs.get('axis', 'None')
    return (len(shape) == 4 and axis != 'None' and int(axis) % 4 in (2, 3)
            and int(attrs.get('repeats', 0)) >= 1)


def trace_bilinear(t, index, node):
    attrs = node.get('attrs', {})
    _, _, height, width = t.shape(index)
    source = t.data_inputs(node)[0]
    _, _, in_h, in_w = t.shape(source)
    align = flag(attrs.get('align_corners'), True)
    if align and 1 in (height, width, in_h, in_w):
        raise refuse(t, node, "align_corners with a size-1 axis (ncnn divides by out - 1)")
    t.add('Interp', index, [source], {'mode': 'bilinear', 'height': height, 'width': width,
                                      'align_corners': align})


def ncnn_interp(layer, graph, int8, guarded, out):
    p = layer.params
    return 'Interp', [(0, NCNN_RESIZE[p['mode']]), (3, p['height']), (4, p['width']),
                      (6, int(p['align_corners']))]


def simulate_interp(layer):
    p = layer.params
    if p['mode'] != 'bilinear':
        return []
    return [ncnn_arithmetic(layer.source, 'qat_ncnn_bilinear', layer.sim_inputs,
                            height=p['height'], width=p['width'],
                            align_corners=int(p['align_corners']))]
