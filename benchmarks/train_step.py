"""Training-step time of converted vs float nets (issue 2 benchmark). Prints a Markdown table.

A random-initialized GluonCV net (hybridized, static memory) is trained on one random batch
with SGD: as float, and converted with the default 8-bit per-channel config with and without
fake BN, and with learned (LSQ) ranges. The nets are timed in turn, round after round; the table gives each one's
median step time, its ratio to float, and the quartiles of the ratio to the float step of the
same round (a shared machine's load moves both alike, so the spread shows how far to trust it).

    python -m benchmarks.train_step [--model cifar_resnet20_v1] [--batch-size 64] [--size 32]
                                    [--rounds 15]
"""
import numpy as np
import mxnet as mx
from mxnet import autograd, gluon

from qat import QuantConfig, calibrate, convert_model
from qat.app.models import build
from qat.report import format_table

from .common import interleaved_times, parser, stopwatch


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


def train_step_rounds(model='cifar_resnet20_v1', batch_size=64, size=32, rounds=15,
                      warmup=3, config=None):
    """{variant: [training-step seconds of each round]} of a hybridized float net and of its
    converted versions (per-channel, 8-bit), timed in turn round after round."""
    config = config or QuantConfig()
    variants = {'float': None, 'qat (no fake BN)': config.updated(fake_bn=False),
                'qat (fake BN)': config.updated(fake_bn=True),
                'qat (fake BN, LSQ ranges)': config.updated(fake_bn=True, range_tracker='lsq')}
    batch = mx.nd.random.uniform(-1, 1, shape=(batch_size, 3, size, size))
    labels = mx.nd.array([i % 10 for i in range(batch_size)])
    steps = {}
    for name, variant in variants.items():
        net = build(model, seed=0)
        net(batch)
        if variant is not None:
            convert_model(net, config=variant)
            calibrate(net, [batch], method='max')  # starts the learned ranges too
        net.hybridize(static_alloc=True, static_shape=True)
        steps[name] = stopwatch(_train_step_fn(net, batch, labels))
    return interleaved_times(steps, rounds, warmup)


def train_step_times(*args, **kwargs):
    """{variant: median training-step seconds} (``train_step_rounds``' arguments)."""
    return {name: float(np.median(t)) for name, t in train_step_rounds(*args, **kwargs).items()}


def main(argv=None):
    arguments = parser('benchmarks.train_step', __doc__)
    arguments.add_argument('--model', default='cifar_resnet20_v1')
    arguments.add_argument('--batch-size', type=int, default=64)
    arguments.add_argument('--size', type=int, default=32)
    arguments.add_argument('--rounds', type=int, default=15)
    args = arguments.parse_args(argv)
    times = train_step_rounds(args.model, args.batch_size, args.size, args.rounds)
    base = np.array(times['float'])
    rows = []
    for name, t in times.items():
        t = np.array(t)
        low, high = np.percentile(t / base, [25, 75])
        rows.append((name, f"{np.median(t) * 1000:.1f}", f"{np.median(t) / np.median(base):.2f}x",
                     f"{low:.2f}-{high:.2f}x"))
    print(format_table(rows, [f"{args.model}, batch {args.batch_size}, {args.size}x{args.size}",
                              'median step (ms)', 'vs float', 'per-round ratio, quartiles']))


if __name__ == '__main__':
    main()
