"""Batches as the library takes them: any iterable of NDArray / numpy batches or of
(data, label) pairs."""
import mxnet as mx
import numpy as np

from .errors import UserError


class Reiterable:
    """An iterable that calls ``make()`` for a fresh iterator each time (methods that read the
    data twice need one)."""

    def __init__(self, make):
        self._make = make

    def __iter__(self):
        return self._make()


def batches_and_labels(data, max_samples=None):
    """(list of NDArray batches, list of per-batch numpy labels in their own shape, or None)
    from an iterable of batches (NDArray / numpy, or (data, label) tuples), at most
    ``max_samples`` samples."""
    xs, ys, count = [], [], 0
    for item in data:
        x, y = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)
        x = x if isinstance(x, mx.nd.NDArray) else mx.nd.array(x)
        if max_samples is not None and count + len(x) > max_samples:
            x = x[:max_samples - count]
            y = None if y is None else y[:max_samples - count]
        xs.append(x)
        ys.append(None if y is None else np.asarray(
            y.asnumpy() if isinstance(y, mx.nd.NDArray) else y))
        count += len(x)
        if max_samples is not None and count >= max_samples:
            break
    if not xs:
        raise UserError("no data: the iterable gave no batches")
    return xs, None if any(y is None for y in ys) else ys


def labeled_batches(data, max_samples=None):
    """(list of NDArray batches, labels (N,) int64 or None): ``batches_and_labels`` with
    class labels."""
    xs, ys = batches_and_labels(data, max_samples)
    return xs, None if ys is None else np.concatenate(
        [y.reshape(-1).astype(np.int64) for y in ys])
