"""Agreement and accuracy metrics, each written once: cosine similarity, SQNR, streaming error
statistics, top-1 accuracy. Used by calibration (EasyQuant), verify, the analysis tools and
the trainer."""
import math

import numpy as np


def cosine_from_sums(dot, aa, bb):
    """Cosine similarity from its sums, elementwise (float64, any broadcastable shapes):
    ``dot / sqrt(aa * bb)`` with ``dot = <a, b>``, ``aa = |a|^2``, ``bb = |b|^2``; 1 where both
    vectors are zero, 0 where exactly one is."""
    dot, aa, bb = (np.asarray(v, np.float64) for v in (dot, aa, bb))
    denominator = np.sqrt(aa * bb)
    both_zero = (aa == 0) & (bb == 0)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, dot / safe, np.where(both_zero, 1.0, 0.0))


def cosine_similarity(a, b):
    """Per-sample cosine similarity (N,) of two arrays (N, ...), computed in float64."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return cosine_from_sums((a * b).sum(1), (a * a).sum(1), (b * b).sum(1))


def sqnr_db(signal_power, noise_power):
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - test)^2)`` in dB
    from the two sums: +inf without noise, -inf for a zero signal with noise."""
    if noise_power == 0:
        return math.inf
    if signal_power == 0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


class ErrorStats:
    """Streaming comparison of a test tensor with its reference, batch by batch: mean per-sample
    cosine, SQNR over all elements, largest absolute error."""

    def __init__(self):
        self.cosines, self.signal, self.noise, self.max_error = [], 0.0, 0.0, 0.0

    def add(self, reference, test):
        reference = np.asarray(reference, np.float64)
        test = np.asarray(test, np.float64)
        self.cosines.append(cosine_similarity(reference, test))
        self.signal += float((reference ** 2).sum())
        self.noise += float(((reference - test) ** 2).sum())
        self.max_error = max(self.max_error, float(np.abs(reference - test).max(initial=0)))
        return self

    @property
    def cosine(self):
        return float(np.concatenate(self.cosines).mean()) if self.cosines else float('nan')

    @property
    def sqnr(self):
        return sqnr_db(self.signal, self.noise)


def top1(scores, labels):
    """Fraction of rows of ``scores`` (N, classes) whose argmax is the label (N,)."""
    scores = np.asarray(scores).reshape(len(scores), -1)
    return float(np.mean(scores.argmax(1) == np.asarray(labels).reshape(-1)))


def accuracy(net, data, ctx=None):
    """Top-1 accuracy (%) of ``net`` over an iterable of (data, label) batches (NDArrays;
    ``ctx``: the device the inputs are moved to)."""
    correct = seen = 0
    for x, y in data:
        if ctx is not None:
            x = x.as_in_context(ctx)
        predicted = net(x).argmax(axis=1).as_in_context(y.context)
        correct += int((predicted == y.astype('float32')).sum().asscalar())
        seen += y.shape[0]
    return 100.0 * correct / max(seen, 1)
