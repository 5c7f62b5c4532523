"""What a run checks before any work, so that a mistake costs seconds, not an epoch: the
devices exist, both data splits open and their first image decodes, labels are in range, the
model builds with its kwargs and returns class scores, and every ``quantize.exclude`` pattern
names a layer. Each problem is a UserError naming the recipe key."""
import mxnet as mx
import numpy as np
from mxnet.gluon import nn

from ..convert import unmatched
from ..errors import DataError, UserError, reason
from ..nn import walk
from .data import open_split


def check_devices(contexts, names):
    """Every context can hold an array (a GPU on a CPU-only MXNet cannot)."""
    for ctx, name in zip(contexts, names):
        try:
            mx.nd.zeros((1,), ctx=ctx).wait_to_read()
        except mx.base.MXNetError as err:
            raise UserError(f"run.devices: {name} is not available here: "
                            f"{reason(err)}") from None


def open_splits(section):
    """(train, val) datasets of a recipe's ``data`` section, each with a first item that
    decodes."""
    splits = []
    for split in ('train', 'val'):
        dataset = open_split(section, split)
        if len(dataset) == 0:
            raise DataError(f"data.{split}: no samples in {dataset.name}")
        dataset.item(0)  # raises DataError naming the file when it cannot be decoded
        splits.append(dataset)
    return splits


def check_labels(datasets, classes):
    """Labels of in-memory / file datasets lie in [0, classes) (RecordIO labels are checked
    batch by batch, see ``qat.app.data.iterate``)."""
    for split, dataset in zip(('train', 'val'), datasets):
        labels = getattr(dataset, 'labels', None)
        if labels is None or not len(labels):
            continue
        bad = np.flatnonzero((labels < 0) | (labels >= classes))
        if len(bad):
            raise DataError(f"data.{split}: label {int(labels[bad[0]])} of sample {bad[0]} "
                            f"({dataset.name}) is outside [0, {classes}): the model has "
                            f"{classes} outputs (model.kwargs classes?)")


def check_model(net, input_shape, exclude, ctx):
    """The number of class scores ``net`` returns for one input; every ``exclude`` pattern
    names a block of it."""
    try:
        out = net(mx.nd.zeros((1,) + tuple(input_shape), ctx=ctx))
    except mx.base.MXNetError as err:
        raise UserError(f"preprocess.size / channels: the model does not accept an input of "
                        f"shape {(1,) + tuple(input_shape)}: "
                        f"{reason(err)}") from None
    out = out[0] if isinstance(out, (list, tuple)) else out
    if out.ndim != 2:
        raise UserError(f"model.name: the model returns shape {out.shape}; a classifier "
                        f"returns (N, classes)")
    missing = unmatched(net, exclude)
    if missing:
        layers = [block.name for *_, block in walk(net)
                  if isinstance(block, (nn.Conv2D, nn.Dense))][:12]
        raise UserError(f"quantize.exclude: {missing[0]!r} matches no layer or block of the "
                        f"model (e.g. {', '.join(layers)})")
    return out.shape[1]
