"""Training-step time of converted vs float nets (issue 2 benchmark). Prints a Markdown table.

A random-initialized GluonCV net (hybridized, static memory) is trained on one random batch
with SGD: as float, and converted with the default 8-bit per-channel config with and without
fake BN, and with learned (LSQ) ranges. The nets are timed in turn, round after round; the table gives each one's
median step time and its ratio to float.

    python -m benchmarks.train_step [--model cifar_resnet20_v1] [--batch-size 64] [--size 32]
                                    [--rounds 15]
"""
import mxnet as mx
from mxnet import autograd, gluon

from qat import QuantConfig, calibrate, convert_model
from qat.app.models import build
from qat.report import format_table

from .common import interleaved_medians, parser, stopwatch


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
    return interleaved_medians(steps, rounds, warmup)


def main(argv=None):
    arguments = parser('benchmarks.train_step', __doc__)
    arguments.add_argument('--model', default='cifar_resnet20_v1')
    arguments.add_argument('--batch-size', type=int, default=64)
    arguments.add_argument('--size', type=int, default=32)
    arguments.add_argument('--rounds', type=int, default=15)
    args = arguments.parse_args(argv)
    times = train_step_times(args.model, args.batch_size, args.size, args.rounds)
    base = times['float']
    print(format_table([(name, f"{t * 1000:.1f}", f"{t / base:.2f}x")
                        for name, t in times.items()],
                       [f"{args.model}, batch {args.batch_size}, {args.size}x{args.size}",
                        'median step (ms)', 'vs float']))


if __name__ == '__main__':
    main()
