"""What every entry of the op table shares: reading MXNet attributes, the value types of ncnn
parameters, and the dicts the Caffe writer turns into LayerParameter messages."""
import re

from ..ir import ExportError


def ints(text, default=None):
    """An MXNet tuple attribute ('(3, 3)', '[1,2]', '2') as a tuple of ints."""
    if text is None:
        return default
    return tuple(int(v) for v in re.findall(r'-?\d+', text))


def flag(text, default=False):
    """An MXNet boolean attribute."""
    return default if text is None else text.strip() in ('True', 'true', '1')


def refuse(tracer, node, why):
    """The ExportError of an op the table knows but cannot export in this form."""
    return ExportError(f"cannot export {tracer.describe(node)}: {why}")


class IntArray(tuple):
    """An array parameter of integers (Slice's slices), written without a decimal point:
    ncnn reads an array element with '.' or 'e' as a float."""


def ncnn_axis(axis, rank):
    """ncnn's axis for MXNet ``axis`` of a batched tensor of ``rank`` dimensions (the batch
    is not an ncnn dimension; ncnn numbers the remaining ones in the same order)."""
    axis = axis % rank
    if axis == 0:
        raise ValueError("the batch axis has no ncnn equivalent")
    return axis - 1


def ncnn_shape(shape):
    """ncnn Reshape/Input parameters (0=w, 1=h, 11=d, 2=c) of a per-sample shape."""
    ids = {1: (0,), 2: (1, 0), 3: (2, 1, 0), 4: (2, 11, 1, 0)}[len(shape)]
    return [(key, int(size)) for key, size in sorted(zip(ids, shape))]


def ncnn_arithmetic(node, op, inputs=None, **attrs):
    """An entry of a layer's ``simulation``: compute MXNet graph node ``node`` (a float-graph
    key) with the native op ``op`` from the nodes ``inputs`` (keys; None: the node's own
    inputs), as ncnn computes it."""
    return {'node': node, 'op': op, 'attrs': attrs, 'inputs': inputs}


def caffe_layer(name, kind, bottoms, top, blobs=(), **param):
    """One Caffe LayerParameter dict; ``param``: its ``*_param`` message as a dict, if any."""
    return {'name': name, 'type': kind, 'bottom': list(bottoms), 'top': [top], **param,
            'blobs': list(blobs)}


def caffe_unique(name, taken):
    """``name``, or ``name_1``, ``name_2``... if taken; marks the result taken."""
    candidate, k = name, 0
    while candidate in taken:
        k += 1
        candidate = f'{name}_{k}'
    taken.add(candidate)
    return candidate


def caffe_simple(kind, **param):
    """A Caffe writer for a layer that is one Caffe layer of ``kind`` with fixed params."""
    def write(layer, inputs, taken):
        return [caffe_layer(layer.name, kind, layer.inputs, layer.name, **param)]
    return write


def ncnn_simple(kind, make_pairs=lambda p: []):
    """An ncnn writer for a layer that is one ncnn layer of ``kind`` whose parameters are a
    function of the IR params alone."""
    return lambda layer, graph, int8, guarded, out: (kind, make_pairs(layer.params))
