"""Datasets. The embedded default is scikit-learn's bundled digits: 1797 real 8x8 handwritten
digits (no download), resized and replicated to the 3-channel input GluonCV models expect."""
import numpy as np
import mxnet as mx

DIGITS_MEAN, DIGITS_STD = 0.5, 0.5  # on pixel values scaled to [0, 1]


def digits(size=16, channels=3, test_fraction=0.2, seed=0):
    """((x_train, y_train), (x_test, y_test)) as float32 NCHW numpy arrays and int labels.

    Images are scaled to [0, 1], bilinearly resized to ``size`` x ``size``, repeated to
    ``channels`` channels and normalized with DIGITS_MEAN / DIGITS_STD. The split is a fixed
    stratified shuffle (``seed``), identical on every machine."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None] / 16.0
    if size != 8:
        images = mx.nd.contrib.BilinearResize2D(mx.nd.array(images), height=size,
                                                width=size).asnumpy()
    images = np.repeat((images - DIGITS_MEAN) / DIGITS_STD, channels, axis=1)
    labels = bunch.target.astype(np.int64)
    rng = np.random.RandomState(seed)
    test = np.zeros(len(labels), bool)
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        test[rng.permutation(members)[:int(round(len(members) * test_fraction))]] = True
    return (images[~test], labels[~test]), (images[test], labels[test])


def batches(x, y, batch_size, shuffle=False, seed=0):
    """Yield (data, label) NDArray batches (the last one may be smaller)."""
    order = np.random.RandomState(seed).permutation(len(x)) if shuffle else np.arange(len(x))
    for start in range(0, len(x), batch_size):
        index = order[start:start + batch_size]
        yield mx.nd.array(x[index]), mx.nd.array(y[index])
