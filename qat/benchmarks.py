"""Benchmarks (run by the thin scripts in tools/): measured side by side, medians and ratios."""
import statistics
import time

import mxnet as mx
from mxnet import autograd, gluon

from .config import QuantConfig
from .convert import convert_model


def _train_step_fn(net, batch, labels):
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.01,
                                                          'momentum': 0.9})

    def step():
        with autograd.record():
            loss = loss_fn(net(batch), labels)
        loss.backward()
        trainer.step(batch.shape[0])
        mx.nd.waitall()
    return step


def train_step_times(model='cifar_resnet20_v1', batch_size=64, size=32, rounds=15,
                     warmup=3, config=None):
    """Median training-step time (s) of a hybridized float net and of its converted versions
    with and without fake BN (per-channel, 8-bit), interleaved round by round."""
    from gluoncv.model_zoo import get_model
    config = config or QuantConfig()
    variants = {'float': None, 'qat (no fake BN)': config.updated(fake_bn=False),
                'qat (fake BN)': config.updated(fake_bn=True)}
    batch = mx.nd.random.uniform(-1, 1, shape=(batch_size, 3, size, size))
    labels = mx.nd.array([i % 10 for i in range(batch_size)])
    steps = {}
    for name, variant in variants.items():
        mx.random.seed(0)
        net = get_model(model, pretrained=False)
        net.initialize(mx.init.Xavier())
        net(batch)
        if variant is not None:
            convert_model(net, config=variant)
        net.hybridize(static_alloc=True, static_shape=True)
        steps[name] = _train_step_fn(net, batch, labels)
        for _ in range(warmup):
            steps[name]()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def format_table(rows, headers):
    """A Markdown table from rows of values."""
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
    lines += ['| ' + ' | '.join(str(v) for v in row) + ' |' for row in rows]
    return '\n'.join(lines)
