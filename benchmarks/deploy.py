"""ncnn int8 vs fp32 latency and size of exported GluonCV models, per Winograd policy.

    python -m benchmarks.deploy [--repeats 30] [--threads 1 2] [--models name:size ...]

Models are random-initialized GluonCV nets (BN statistics randomized), calibrated on random
inputs (``qat.app.models.calibrated_random``): the arithmetic cost does not depend on trained
values. Each is exported once per Winograd overflow policy of ``qat.deploy.export``. Latency
is the median of interleaved single-image runs (each variant timed in turn, so machine noise
hits all alike), with ncnn's default options except the thread count; sizes are those of the
.bin files.
"""
import os
import tempfile

import numpy as np

from qat.app.models import calibrated_random
from qat.deploy.export import WINOGRAD_POLICIES, export, winograd_guards
from qat.deploy.graph import trace
from qat.deploy.verify import NcnnModel

from .common import ZOO, add_models_option, interleaved_medians, parse_models, parser, \
    stopwatch


def _latency(models, sample, repeats):
    """{variant: median ms} over interleaved runs of one image (one warm-up run each: memory
    pools, packed weights)."""
    runs = {key: stopwatch(model.run, sample, [model.output]) for key, model in models.items()}
    return {key: 1000 * seconds
            for key, seconds in interleaved_medians(runs, repeats, warmup=1).items()}


def deploy_benchmark(models=ZOO, threads=(1, 2), repeats=30, progress=print):
    """Rows of {model, threads, fp32_ms, int8_ms per policy, sizes, guarded layer counts}."""
    rows = []
    for name, size in models:
        progress(f"{name} ({size}x{size}): exporting")
        net = calibrated_random(name, size)
        graph = trace(net, (3, size, size))
        guarded = {policy: len(winograd_guards(graph, policy)) for policy in WINOGRAD_POLICIES}
        sample = np.random.RandomState(1).normal(0, 1, (3, size, size)).astype(np.float32)
        with tempfile.TemporaryDirectory() as folder:
            paths = {policy: export(net, os.path.join(folder, policy), (3, size, size),
                                    winograd=policy) for policy in WINOGRAD_POLICIES}
            any_paths = paths['bound']
            sizes = {'fp32': os.path.getsize(any_paths['bin']),
                     'int8': os.path.getsize(any_paths['int8_bin'])}
            output = graph.outputs[0]
            for count in threads:
                variants = {'fp32': NcnnModel(any_paths['param'], any_paths['bin'], count)}
                for policy, files in paths.items():
                    variants[policy] = NcnnModel(files['int8_param'], files['int8_bin'], count)
                for model in variants.values():
                    model.output = output
                progress(f"{name}: timing with {count} thread(s)")
                rows.append({'model': f"{name} ({size})", 'threads': count,
                             'ms': _latency(variants, sample, repeats), 'sizes': sizes,
                             'guarded': guarded})
    return rows


def format_deploy_table(rows):
    policies = list(WINOGRAD_POLICIES)
    head = ("| model (input) | threads | fp32 ms | int8 ms (bound) | int8/fp32 "
            + ''.join(f"| {p} int8/fp32 " for p in policies if p != 'bound')
            + "| layers guarded (bound/off) | .bin fp32 MB | .bin int8 MB | size ratio |")
    lines = [head, '|' + '---|' * (head.count('|') - 1)]
    for row in rows:
        ms, sizes = row['ms'], row['sizes']
        lines.append(
            f"| {row['model']} | {row['threads']} | {ms['fp32']:.2f} | {ms['bound']:.2f} | "
            f"{ms['bound'] / ms['fp32']:.2f} "
            + ''.join(f"| {ms[p] / ms['fp32']:.2f} " for p in policies if p != 'bound')
            + f"| {row['guarded']['bound']}/{row['guarded']['off']} "
            f"| {sizes['fp32'] / 1e6:.2f} | {sizes['int8'] / 1e6:.2f} "
            f"| {sizes['int8'] / sizes['fp32']:.3f} |")
    return '\n'.join(lines)


def main(argv=None):
    arguments = parser('benchmarks.deploy', __doc__)
    arguments.add_argument('--repeats', type=int, default=30, help='timed runs per variant')
    arguments.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    add_models_option(arguments)
    args = arguments.parse_args(argv)
    print(format_deploy_table(deploy_benchmark(parse_models(args.models), args.threads,
                                               args.repeats)))


if __name__ == '__main__':
    main()
