"""Training and evaluation loops (the recipe trainer builds on these)."""
import logging
import time

from mxnet import autograd, gluon

from .data import batches

log = logging.getLogger(__name__)


def evaluate(net, x, y, batch_size=256):
    """Top-1 accuracy (%) of ``net`` on numpy arrays ``x``, ``y``."""
    correct = 0
    for data, label in batches(x, y, batch_size):
        correct += int((net(data).argmax(axis=1) == label.astype('float32')).sum().asscalar())
    return 100.0 * correct / len(y)


def fit(net, x, y, epochs, batch_size=64, optimizer='sgd', optimizer_params=None, seed=0,
        progress=print):
    """Plain supervised training with softmax cross-entropy; one summary line per epoch."""
    optimizer_params = optimizer_params or {'learning_rate': 0.05, 'momentum': 0.9,
                                            'wd': 1e-4}
    trainer = gluon.Trainer(net.collect_params(), optimizer, optimizer_params)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for epoch in range(epochs):
        start, total, seen = time.time(), 0.0, 0
        for data, label in batches(x, y, batch_size, shuffle=True, seed=seed + epoch):
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            trainer.step(data.shape[0])
            total += float(loss.sum().asscalar())
            seen += data.shape[0]
        progress(f"epoch {epoch + 1}/{epochs}: loss {total / seen:.4f} "
                 f"({time.time() - start:.1f} s)")
    return net
