"""Range equalization of a float net before quantization: the inputs of depthwise convs.

One quantized activation has one range for all its channels. In a MobileNet a single channel
of a depthwise conv's input can range ten times wider than the others (measured: mobilenet0.25
on the digits, one channel of 16 at 37 where the median channel reaches 2.7); the shared range
then covers that channel, and at 3 bits every other channel rounds to zero. For a
``BatchNorm -> ReLU -> depthwise conv`` chain the ranges can be made equal without changing
the function the net computes (cross-layer equalization, Nagel et al. 2019, "Data-free
quantization through weight equalization and bias correction"): ReLU is positively
homogeneous, so dividing channel ``c`` of the BatchNorm's output (its ``gamma`` and ``beta``)
by ``s_c > 0`` and multiplying the depthwise filter of channel ``c`` by ``s_c`` computes the
same outputs. A depthwise conv has one weight scale per channel, so its quantized weights are
the same codes scaled; only the activation's range changes. ``equalize_depthwise_inputs``
chooses ``s_c`` so that every channel's range (its max over calibration data) becomes the
median channel range.

Apply it to the float net, before ``convert_model``; it changes only those parameters.
"""
import mxnet as mx
import numpy as np
from mxnet.gluon import nn

from .errors import UserError

# channels whose range is below this fraction of the median are left alone (dead channels)
DEAD_FRACTION = 1e-6


def _is_depthwise(block):
    if not isinstance(block, nn.Conv2D):
        return False
    groups = block._kwargs.get('num_group', 1)
    return groups > 1 and groups == block._channels and block.weight.shape[1] == 1


def depthwise_chains(net):
    """The ``(BatchNorm, ReLU Activation, depthwise Conv2D)`` triples that follow each other
    directly in a ``HybridSequential`` of ``net`` (a MobileNet's pointwise -> depthwise
    transitions), in network order."""
    chains = []

    def visit(block):
        children = list(block._children.values())
        if isinstance(block, nn.HybridSequential):
            for bn, act, conv in zip(children, children[1:], children[2:]):
                if isinstance(bn, nn.BatchNorm) and isinstance(act, nn.Activation) \
                        and act._act_type == 'relu' and _is_depthwise(conv) \
                        and bn._kwargs.get('axis', 1) == 1 and not bn._kwargs.get('fix_gamma'):
                    chains.append((bn, act, conv))
        for child in children:
            visit(child)
    visit(net)
    return chains


def _input(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def channel_ranges(net, data, activations, num_batches=None):
    """{activation block: per-channel max of its output (numpy, (C,))} over ``data`` (batches
    or (data, label) tuples), the net run imperatively with forward hooks."""
    ranges, handles = {}, []

    def hook(block, _inputs, output):
        if not isinstance(output, mx.nd.NDArray):  # a hybridized net being traced
            return
        value = output.max(axis=(0, 2, 3)).asnumpy()
        ranges[block] = value if block not in ranges else np.maximum(ranges[block], value)
    for act in activations:
        handles.append(act.register_forward_hook(hook))
    try:
        for number, batch in enumerate(data):
            if num_batches is not None and number >= num_batches:
                break
            with mx.autograd.predict_mode():
                net(_input(batch))
    finally:
        for handle in handles:
            handle.detach()
    return ranges


def equalize_depthwise_inputs(net, data, num_batches=None):
    """Equalize the per-channel input ranges of every depthwise conv of ``net`` (a float
    Gluon net, initialized, not hybridized) that follows a ``BatchNorm -> ReLU`` (see the
    module doc), from the activations on ``data``. The net computes the same function afterwards (up to float
    rounding). Returns one dict per chain: ``conv`` (the depthwise conv's name) and
    ``spread`` (the largest channel range over the median channel range, before)."""
    chains = depthwise_chains(net)
    if not chains:
        return []
    ranges = channel_ranges(net, data, [act for _, act, _ in chains], num_batches)
    if len(ranges) != len(chains):
        raise UserError("equalize_depthwise_inputs: no activations seen (run the float net "
                        "imperatively: before hybridize(), or after hybridize(False))")
    report = []
    for bn, act, conv in chains:
        r = ranges[act].astype(np.float64)
        live = r[r > 0]
        if not live.size:
            continue
        median = float(np.median(live))
        s = np.where(r > DEAD_FRACTION * median, r / median, 1.0)
        for param in (bn.gamma, bn.beta):
            for array in param.list_data():
                array[:] = array / mx.nd.array(s, ctx=array.context, dtype=array.dtype)
        for array in conv.weight.list_data():
            array[:] = array * mx.nd.array(s.reshape(-1, 1, 1, 1), ctx=array.context,
                                           dtype=array.dtype)
        report.append({'conv': conv.name, 'spread': float(r.max() / median)})
    return report
