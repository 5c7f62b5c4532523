"""Which int8 3x3 s1 convs the Winograd bound proves safe, and the latency of the guards.

    python -m benchmarks.winograd [--rounds 20]

Random-initialized resnet18_v1 (224x224) and cifar_resnet20_v1 (32x32), converted with the
default 8-bit per-channel scheme and EMA-calibrated on random images. Per Winograd conv
(3x3 s1, > 8 channels): its bound max|y| and whether it is proven safe (a) with its 8-bit
codes and inputs in [-127, 127], (b) the same with inputs in [0, 127] where the input is a
ReLU output, (c) with 6-bit codes (31 / max|w| per channel, as ncnn2table does). Then the
int8 model is rendered with each Winograd policy of ``qat.deploy.export`` (no guard
('unsafe'), 31=64 on every Winograd conv ('off'), and 31=64 where the bound fails ('bound'))
and timed with the ncnn runtime (default options, one image), policies interleaved round by
round: the table gives median milliseconds per thread count.
"""
import os
import tempfile
import time

import mxnet as mx
import ncnn
import numpy as np

from qat import calibrate, convert_model, reference
from qat.app.models import build
from qat.deploy import ncnn as ncnn_writer, winograd
from qat.deploy.export import winograd_guards
from qat.deploy.graph import trace
from qat.deploy.verify import NcnnModel
from qat.report import format_table

from .common import interleaved_medians, parser

MODELS = (('resnet18_v1', 224), ('cifar_resnet20_v1', 32))
POLICIES = ('unsafe', 'off', 'bound')


def _post_relu(graph, layer):
    """True when the layer's input blob is a ReLU output (its codes are then in [0, 127])."""
    producer = graph[layer.inputs[0]]
    return (producer.kind == 'ReLU' and not producer.params.get('slope')) \
        or producer.params.get('activation') == ('relu',)


def winograd_guard_report(model='resnet18_v1', size=224, rounds=20, warmup=3, threads=(1, 2),
                          calibration_batches=2, seed=0):
    """The int8 Winograd bound on a random-initialized GluonCV net, and what the guard costs
    (see the module docstring).

    Returns (rows, times): rows = [(name, in, out, max|y|, a, b, c)], times = {(policy,
    threads): median ms}."""
    net = build(model, seed=seed)
    batches = [mx.nd.random.uniform(-1, 1, shape=(2, 3, size, size))
               for _ in range(calibration_batches)]
    net(batches[0])
    convert_model(net)
    calibrate(net, batches)
    graph = trace(net, (3, size, size))

    rows = []
    for layer in graph.layers:
        p, quant = layer.params, layer.quant
        if layer.kind != 'Convolution' or quant is None or not quant.int8:
            continue
        num_input = layer.weights['weight'].shape[1] * p['groups']
        if not winograd.uses_winograd(p['kernel'], p['stride'], p['dilate'], p['groups'],
                                      num_input, p['num_output']):
            continue
        codes, weight = quant.weight_codes, layer.weights['weight']
        scale6 = 31 / np.abs(weight).reshape(len(weight), -1).max(axis=1)
        codes6 = reference.quantize(weight, scale6.reshape(-1, 1, 1, 1), bits=6)
        relu = _post_relu(graph, layer)
        rows.append((layer.name, num_input, p['num_output'],
                     int(winograd.output_bounds(codes).max()), winograd.is_safe(codes),
                     winograd.is_safe(codes, x_range=(0, 127) if relu else (-127, 127)),
                     winograd.is_safe(codes6)))

    image = np.random.default_rng(seed).uniform(-1, 1, (3, size, size)).astype(np.float32)
    nets = {}
    with tempfile.TemporaryDirectory(prefix='bench-winograd-') as folder:
        for policy in POLICIES:
            text, data = ncnn_writer.render(graph, int8=True,
                                            guarded=winograd_guards(graph, policy))
            param, weights = (os.path.join(folder, policy + ext) for ext in ('.param', '.bin'))
            with open(param, 'w') as handle:
                handle.write(text)
            with open(weights, 'wb') as handle:
                handle.write(data)
            for n in threads:  # one net per thread count: ncnn fixes its tiling at load time
                nets[policy, n] = NcnnModel(param, weights, n, use_int8_inference=True).net
    mat = ncnn.Mat(image)  # keep ``image`` alive: ncnn.Mat does not own it

    def forward(net_):
        def run():
            ex = net_.create_extractor()
            ex.input('data', mat)
            start = time.perf_counter()
            ex.extract(graph.outputs[0])
            return time.perf_counter() - start
        return run

    times = interleaved_medians({key: forward(net_) for key, net_ in nets.items()}, rounds,
                                warmup)
    return rows, {key: 1000 * seconds for key, seconds in times.items()}


def main(argv=None):
    arguments = parser('benchmarks.winograd', __doc__)
    arguments.add_argument('--rounds', type=int, default=20)
    args = arguments.parse_args(argv)
    for model, size in MODELS:
        rows, times = winograd_guard_report(model, size, rounds=args.rounds)
        print(f"\n## {model} ({size}x{size}): Winograd convs proven safe")
        print(format_table(rows, ['layer', 'in', 'out', 'max |y| (8-bit)', 'safe 8-bit',
                                  'safe 8-bit, ReLU input', 'safe 6-bit']))
        counts = [sum(row[i] for row in rows) for i in (4, 5, 6)]
        print(f"\nsafe / total: 8-bit {counts[0]}/{len(rows)}, 8-bit with ReLU inputs "
              f"{counts[1]}/{len(rows)}, 6-bit {counts[2]}/{len(rows)}")
        threads = sorted({n for _, n in times})
        print(f"\nmedian latency, ms ({args.rounds} interleaved rounds)")
        print(format_table([[policy] + ['%.2f' % times[policy, n] for n in threads]
                            for policy in POLICIES],
                           ['policy'] + [f'{n} thread(s)' for n in threads]))


if __name__ == '__main__':
    main()
