"""What every importer builds: a ``GraphNet`` of standard Gluon layers run in file order.

An importer reads its file into a list of layers (blob names in, blob names out) and hands
each one to a ``Builder``: a Gluon block under the source layer's name (``nn.Conv2D``,
``nn.Dense``, ``nn.BatchNorm``, activations, pooling, or an ``Op``: one MXNet operator with
fixed attributes, for add / concat / reshape / softmax and the rest), the blobs it reads and
writes, and its weights. ``GraphNet`` keeps the blocks as its children (so ``convert_model``
can swap them) and looks each one up by name at every call (so it runs the swapped block).
"""
import os
import re

import mxnet as mx
from mxnet.gluon import HybridBlock

from ..errors import UserError


class ModelFileError(UserError):
    """A model file that cannot be imported; the message names the file (and the layer)."""


class UnsupportedLayerError(ModelFileError):
    """A layer type (or a setting of one) the importer cannot express in Gluon."""


def unsupported(path, name, kind, why=''):
    """The one error of a layer that cannot be imported: file, layer name and type."""
    detail = f": {why}" if why else ''
    return UnsupportedLayerError(f"{path}: layer {name!r} of type {kind!r} is not supported"
                                 f"{detail}")


def files_there(path, weights):
    """``weights``, once the model file ``path`` and it are found to exist."""
    for file in (path, weights):
        if not os.path.isfile(file):
            raise ModelFileError(f"{file}: no such file")
    return weights


def resolve_op(F, op):
    """The function of MXNet operator ``op`` in ``F`` (mx.nd or mx.sym), or None: public
    ops, internal ones (``_plus_scalar``) and contrib ones (``_contrib_X``)."""
    found = getattr(F, op, None) or getattr(F._internal, op, None)
    for space in ('contrib', 'linalg', 'image'):
        if found is None and op.startswith(f'_{space}_'):
            found = getattr(getattr(F, space), op[len(space) + 2:], None)
    return found


class Op(HybridBlock):
    """``F.<op>(*inputs, **attrs)``: one MXNet operator with fixed attributes (strings as in
    a symbol file, or numbers). ``constants``: {name: array} fixed tensors the operator also
    reads (held as parameters that are not trained); ``order`` lists the operator's inputs,
    ``'#k'`` for the k-th input of the block and a constant's name for a constant (default:
    the block's inputs, then the constants)."""

    def __init__(self, op, attrs=None, constants=None, order=None, **kwargs):
        super().__init__(**kwargs)
        self.op, self.attrs = op, dict(attrs or {})
        self.constants = dict(constants or {})
        self.order = order
        for name, value in self.constants.items():
            param = self.params.get(name, shape=value.shape, grad_req='null',
                                    init=mx.init.Constant(mx.nd.array(value)),
                                    differentiable=False)
            setattr(self, name, param)

    def hybrid_forward(self, F, *inputs, **constants):
        order = self.order or [f'#{k}' for k in range(len(inputs))] + list(self.constants)
        args = [inputs[int(item[1:])] if item.startswith('#') else constants[item]
                for item in order]
        # named like a Gluon layer's op (``<prefix>fwd``), so the deployed layer keeps the
        # block's name
        return resolve_op(F, self.op)(*args, name='fwd', **self.attrs)

    def __repr__(self):
        return f"{self.__class__.__name__}({self.op}, {self.attrs})"


class Chain(HybridBlock):
    """Apply ``F.<op>`` pairwise over the inputs, left to right, after multiplying input k by
    ``coeffs[k]`` (when given): an n-ary sum, product or maximum (ncnn / Caffe Eltwise)."""

    def __init__(self, op, coeffs=None, **kwargs):
        super().__init__(**kwargs)
        self.op, self.coeffs = op, list(coeffs or [])

    def hybrid_forward(self, F, *inputs):
        if self.coeffs:
            inputs = [x if c == 1 else x * float(c) for x, c in zip(inputs, self.coeffs)]
        out = inputs[0]
        for x in inputs[1:]:
            out = resolve_op(F, self.op)(out, x)
        return out


class Gated(HybridBlock):
    """``x * F.<op>(x, **attrs)``: swish (sigmoid), hard swish (hard_sigmoid)."""

    def __init__(self, op, attrs=None, **kwargs):
        super().__init__(**kwargs)
        self.op, self.attrs = op, dict(attrs or {})

    def hybrid_forward(self, F, x):
        return x * resolve_op(F, self.op)(x, **self.attrs)


class ChannelShuffle(HybridBlock):
    """ShuffleNet's channel shuffle of ``groups`` groups: (N, g, C/g, H, W), the two group
    axes swapped, back to (N, C, H, W) (``reverse``: (N, C/g, g, H, W), as ncnn's
    ``reverse``)."""

    def __init__(self, groups, reverse=False, **kwargs):
        super().__init__(**kwargs)
        self.groups, self.reverse = int(groups), bool(reverse)

    def hybrid_forward(self, F, x):
        split = (0, -4, -1, self.groups, -2) if self.reverse else (0, -4, self.groups, -1, -2)
        x = F.reshape(x, shape=split)
        return F.reshape(F.swapaxes(x, 1, 2), shape=(0, -3, -2))


class GraphNet(HybridBlock):
    """A net read from a file: ``steps`` [(child name, input blobs, output blobs)] run in
    order on the blobs, the inputs named ``inputs``, returning the blobs ``outputs``.
    ``source`` is the file, ``preprocess`` what the file says about the input ({'mean',
    'scale', 'shape'}, each optional)."""

    def __init__(self, inputs, steps, outputs, source='', preprocess=None, **kwargs):
        super().__init__(**kwargs)
        self.inputs, self.steps, self.outputs = list(inputs), list(steps), list(outputs)
        self.source, self.preprocess = source, dict(preprocess or {})

    def hybrid_forward(self, F, *xs):
        blobs = dict(zip(self.inputs, xs))
        for name, bottoms, tops in self.steps:
            out = self._children[name](*[blobs[b] for b in bottoms])
            if len(tops) == 1:
                blobs[tops[0]] = out
            else:
                blobs.update(zip(tops, [out[k] for k in range(len(tops))]))
        outs = [blobs[b] for b in self.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)


def block_name(name):
    """A Gluon prefix stem from a source layer name: letters, digits and '_' (``conv1/3x3``
    -> ``conv1_3x3``), so that it is a valid ncnn / Caffe layer name and parameter name."""
    clean = re.sub(r'\W', '_', name)
    return clean if clean and not clean[0].isdigit() else f"layer_{clean}"


class Builder:
    """Collects the layers of one file: ``add(name, block_fn, bottoms, tops, weights)``
    creates ``block_fn(prefix)`` under a unique name made from ``name`` and records the step
    and its weights ({parameter attribute: array}); ``alias`` makes a blob another name of a
    blob (Split, Dropout); ``net`` builds the GraphNet and loads the weights (shapes checked:
    a mismatch names the layer and the file). Blobs written and not read since (in file
    order: an in-place layer rewrites its blob) are the net's outputs by default."""

    def __init__(self, path):
        self.path = path
        self.blocks, self.steps, self.weights = {}, [], []
        self.aliases, self.unread = {}, {}

    def blob(self, name):
        return self.aliases.get(name, name)

    def _read(self, bottoms):
        bottoms = [self.blob(b) for b in bottoms]
        for b in bottoms:
            self.unread.pop(b, None)
        return bottoms

    def alias(self, top, bottom):
        self.aliases[top] = self._read([bottom])[0]

    def add(self, name, block_fn, bottoms, tops, weights=None):
        key, n = block_name(name), 1
        while key in self.blocks:
            key, n = f"{block_name(name)}_{n}", n + 1
        block = block_fn(key + '_')
        self.blocks[key] = block
        bottoms = self._read(bottoms)
        for top in tops:  # an in-place layer gives its blob a new value
            self.aliases.pop(top, None)
            self.unread[top] = True
        self.steps.append((key, bottoms, list(tops)))
        self.weights += [(name, block, attr, value) for attr, value in (weights or {}).items()]
        return block

    def shape(self, blob, input_shapes):
        """The shape of ``blob`` (as the layers so far make it) for ``input_shapes`` ({input
        blob: full shape}), inferred symbolically: for a layer whose parameters are sizes
        where Gluon wants a ratio."""
        partial = GraphNet(list(input_shapes), self.steps, [self.blob(blob)], prefix='')
        for key, block in self.blocks.items():
            partial.register_child(block, key)
        out = partial(*[mx.sym.var(name) for name in input_shapes])
        return tuple(out.infer_shape(**input_shapes)[1][0])

    def net(self, inputs, outputs=None, preprocess=None):
        outputs = list(self.unread) if outputs is None else [self.blob(b) for b in outputs]
        if not outputs:
            raise ModelFileError(f"{self.path}: the net has no output")
        net = GraphNet(inputs, self.steps, outputs, source=self.path, preprocess=preprocess,
                       prefix='')
        for key, block in self.blocks.items():
            net.register_child(block, key)
        net.initialize(mx.init.Zero())
        for name, block, attr, value in self.weights:
            param = getattr(block, attr)
            if tuple(param.shape) != tuple(value.shape):
                raise ModelFileError(f"{self.path}: layer {name!r}: {attr} has shape "
                                     f"{tuple(value.shape)}, the layer needs "
                                     f"{tuple(param.shape)}")
            param.set_data(mx.nd.array(value, dtype='float32'))
        return net
