"""Ops that move data without arithmetic (exact everywhere): the input, reshapes, transposes,
slices, concatenation, padding, channel shuffle; and softmax.

MXNet shapes carry the batch axis, ncnn's do not: a per-sample shape (C, H, W) is ncnn's
(c, h, w), (C, L) its (h, w), (C,) its w, (A, C, H, W) its (c, d, h, w). An axis of a
batched MXNet tensor is ncnn's axis minus one (``base.ncnn_axis``).
"""
from .base import IntArray, caffe_layer, caffe_simple, ints, ncnn_axis, ncnn_shape, refuse

PASS_THROUGH_OPS = ('Dropout', '_copy', 'identity', 'BlockGrad', 'stop_gradient')
PAD_MODES = ('constant', 'edge', 'reflect')  # MXNet Pad modes, all exact in ncnn Padding
# ncnn Permute order_type of a per-sample 3-D permutation, by the new order of the axes
# named from the innermost (w) out, e.g. 'HWC': the new w is the old h.
PERMUTE_ORDERS = ('WHC', 'HWC', 'WCH', 'CWH', 'HCW', 'CHW')
SHAPE_OPS = ('Reshape', 'reshape', 'expand_dims', 'squeeze', 'reshape_like')


def trace_input(t, index, node):
    t.add('Input', index, [], {'shape': t.input_shape})


def trace_pass_through(t, index, node):
    t.blob[index] = t.blob[t.data_inputs(node)[0]]


def trace_flatten(t, index, node):
    t.add('Flatten', index, t.data_inputs(node)[:1])


def trace_concat(t, index, node):
    attrs = node.get('attrs', {})
    rank = len(t.shape(index))
    axis = int(attrs.get('dim', 1)) % rank
    if axis == 0:
        raise refuse(t, node, "concatenation along the batch axis")
    t.add('Concat', index, t.data_inputs(node), {'axis': axis})


def trace_reshape(t, index, node):
    """Reshape, expand_dims, squeeze: one ncnn Reshape to the inferred per-sample shape.
    A run of them (e.g. ``expand_dims(2).expand_dims(2)``) becomes one layer."""
    source = t.data_inputs(node)[0]
    chain = [index]
    while True:
        user = t.only_consumer(chain[-1])
        if user is None or t.nodes[user]['op'] not in SHAPE_OPS:
            break
        chain.append(user)
    end = chain[-1]
    shape = t.shape(end)
    if t.shape(source)[0] != shape[0] or not 1 <= len(shape) - 1 <= 4:
        raise refuse(t, node, f"a reshape from {t.shape(source)} to {shape} must keep the "
                              f"batch axis and at most 4 per-sample axes (ncnn's limit)")
    t.add('Reshape', index, [source], {'shape': tuple(shape[1:])}, source=t.key(end))
    t.absorb(chain[1:], index)


def match_channel_shuffle(t, index, node):
    """ShuffleNet's ``reshape(0, -4, g, -1, -2)``, ``swapaxes(1, 2)``, ``reshape(0, -3, -2)``
    -> one ShuffleChannel."""
    if node['op'] != 'Reshape':
        return False
    shape = ints(node.get('attrs', {}).get('shape'), ())
    swap = t.only_consumer(index)
    back = t.only_consumer(swap) if swap is not None else None
    if not (len(shape) == 5 and shape[:2] == (0, -4) and shape[3:] == (-1, -2)
            and swap is not None and t.nodes[swap]['op'] == 'SwapAxis'
            and {int(t.nodes[swap]['attrs'].get(d, 0)) for d in ('dim1', 'dim2')} == {1, 2}
            and back is not None and t.nodes[back]['op'] == 'Reshape'
            and ints(t.nodes[back]['attrs'].get('shape'), ()) == (0, -3, -2)):
        return False
    t.add('ShuffleChannel', index, t.data_inputs(node)[:1], {'group': shape[2]},
          source=t.key(back))
    t.absorb([swap, back], index)
    return True


def trace_transpose(t, index, node):
    """transpose / SwapAxis of a 3-D sample -> ncnn Permute."""
    attrs = node.get('attrs', {})
    rank = len(t.shape(index))
    if node['op'] == 'SwapAxis':
        order = list(range(rank))
        a, b = int(attrs.get('dim1', 0)) % rank, int(attrs.get('dim2', 0)) % rank
        order[a], order[b] = order[b], order[a]
    else:
        order = [a % rank for a in ints(attrs.get('axes'), ())] or list(range(rank))[::-1]
    if order[0] != 0 or rank != 4:
        raise refuse(t, node, f"only permutations of the (C, H, W) axes of one sample, got "
                              f"axes {tuple(order)} of a {rank}-D tensor")
    names = 'CHW'
    t.add('Permute', index, t.data_inputs(node)[:1],
          {'order': PERMUTE_ORDERS.index(''.join(names[a - 1] for a in order[::-1][:3]))})


def trace_slice_axis(t, index, node):
    """slice_axis / slice (unit steps) -> ncnn Crop of one range per sliced axis."""
    attrs = node.get('attrs', {})
    source = t.data_inputs(node)[0]
    full = t.shape(source)
    if node['op'] == 'slice_axis':
        axes = [int(attrs['axis']) % len(full)]
        begin, end = [attrs.get('begin')], [attrs.get('end')]
        step = [None]
    else:
        begin = _optional_ints(attrs.get('begin'))
        end = _optional_ints(attrs.get('end'))
        step = _optional_ints(attrs.get('step')) or [None] * len(begin)
        axes = list(range(len(begin)))
    starts, ends, kept = [], [], []
    for axis, b, e, s in zip(axes, begin, end, step):
        b, e, s = _none_or_int(b), _none_or_int(e), _none_or_int(s)
        lo, hi, stride = slice(b, e, s).indices(full[axis])
        if stride != 1:
            raise refuse(t, node, f"a slice with step {stride} (ncnn's Crop takes ranges)")
        if (lo, hi) == (0, full[axis]):
            continue
        if axis == 0:
            raise refuse(t, node, "slicing the batch axis")
        starts.append(lo)
        ends.append(hi)
        kept.append(ncnn_axis(axis, len(full)))
    if not kept:
        trace_pass_through(t, index, node)
        return
    t.add('Crop', index, [source], {'starts': tuple(starts), 'ends': tuple(ends),
                                    'axes': tuple(kept)})


def _optional_ints(text):
    """MXNet's slice begin/end/step: '(0, None, 2)' -> ['0', 'None', '2']."""
    if text is None:
        return []
    return [v.strip() for v in text.strip('()[]').split(',') if v.strip()]


def _none_or_int(value):
    return None if value in (None, 'None') else int(value)


def trace_slice_like(t, index, node):
    """slice_like(x, like): x cropped to the shape of ``like`` on the given axes (YOLOv3's
    upsampled route): nothing where the shapes already agree, else one Crop from 0."""
    source = t.data_inputs(node)[0]
    full, out = t.shape(source), t.shape(index)
    axes = [axis for axis in range(len(full)) if full[axis] != out[axis]]
    if not axes:
        trace_pass_through(t, index, node)
        return
    if 0 in axes:
        raise refuse(t, node, "slicing the batch axis")
    t.add('Crop', index, [source], {'starts': (0,) * len(axes),
                                    'ends': tuple(out[axis] for axis in axes),
                                    'axes': tuple(ncnn_axis(axis, len(full)) for axis in axes)})


def match_shape_operand(t, index, node):
    """``x * 0`` read only as the shape operand of slice_like (GluonCV's idiom): no layer."""
    if node['op'] not in ('_mul_scalar', '_MulScalar') \
            or float(node.get('attrs', {}).get('scalar', 1)) != 0:
        return False
    users = t.consumers.get(index, [])
    if not users or index in t.heads or any(
            t.nodes[user]['op'] != 'slice_like' or t.nodes[user]['inputs'][0][0] == index
            for user in users):
        return False
    return True


def trace_split(t, index, node):
    """SliceChannel / split: one ncnn Crop per output (its consumers read output k)."""
    attrs = node.get('attrs', {})
    source = t.data_inputs(node)[0]
    full = t.shape(source)
    parts = int(attrs['num_outputs'])
    axis = int(attrs.get('axis', 1)) % len(full)
    if axis == 0 or full[axis] % parts or (attrs.get('squeeze_axis') in ('True', '1')):
        raise refuse(t, node, f"a split into {parts} along axis {axis} of {full} "
                              f"(squeeze_axis unsupported)")
    size = full[axis] // parts
    for k in range(parts):
        t.add('Crop', index, [source], {'starts': (k * size,), 'ends': ((k + 1) * size,),
                                        'axes': (ncnn_axis(axis, len(full)),)},
              name=f"{node['name']}_{k}", output=k, source='')


def trace_pad(t, index, node):
    attrs = node.get('attrs', {})
    widths = ints(attrs.get('pad_width'), ())
    mode = attrs.get('mode', 'constant')
    if len(widths) != 8 or any(widths[:4]) or mode not in PAD_MODES:
        raise refuse(t, node, f"only padding of the height and width of an NCHW tensor "
                              f"({sorted(PAD_MODES)}), got pad_width {widths} mode {mode!r}")
    top, bottom, left, right = widths[4:]
    t.add('Padding', index, t.data_inputs(node)[:1],
          {'top': top, 'bottom': bottom, 'left': left, 'right': right, 'mode': mode,
           'value': float(attrs.get('constant_value', 0.0))})


def trace_softmax(t, index, node):
    attrs = node.get('attrs', {})
    ndim = len(t.shape(index))
    if node['op'] == 'softmax':
        axis = int(attrs.get('axis', -1)) % ndim
    else:  # SoftmaxActivation / SoftmaxOutput: over the channel axis
        axis = 1
    t.add('Softmax', index, t.data_inputs(node)[:1], {'axis': axis})


# ---- ncnn -----------------------------------------------------------------------------------
def ncnn_input(layer, graph, int8, guarded, out):
    return 'Input', ncnn_shape(layer.params['shape'])


def ncnn_reshape(layer, graph, int8, guarded, out):
    return 'Reshape', ncnn_shape(layer.params['shape'])


def ncnn_crop(layer, graph, int8, guarded, out):
    p = layer.params
    return 'Crop', [(9, IntArray(p['starts'])), (10, IntArray(p['ends'])),
                    (11, IntArray(p['axes']))]


def ncnn_padding(layer, graph, int8, guarded, out):
    p = layer.params
    return 'Padding', [(0, p['top']), (1, p['bottom']), (2, p['left']), (3, p['right']),
                       (4, {'constant': 0, 'edge': 1, 'reflect': 2}[p['mode']]),
                       (5, float(p['value']))]


# ---- Caffe ----------------------------------------------------------------------------------
def caffe_input(layer, inputs, taken):
    shape = {'dim': [1, *layer.params['shape']]}
    return [caffe_layer(layer.name, 'Input', [], layer.name, input_param={'shape': [shape]})]


def caffe_concat(layer, inputs, taken):
    return [caffe_layer(layer.name, 'Concat', layer.inputs, layer.name,
                        concat_param={'axis': layer.params['axis']})]


def caffe_softmax(layer, inputs, taken):
    return [caffe_layer(layer.name, 'Softmax', layer.inputs, layer.name,
                        softmax_param={'axis': layer.params['axis']})]


def caffe_reshape(layer, inputs, taken):
    return [caffe_layer(layer.name, 'Reshape', layer.inputs, layer.name,
                        reshape_param={'shape': {'dim': [0, *layer.params['shape']]}})]


caffe_flatten = caffe_simple('Flatten')
