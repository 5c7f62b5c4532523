"""Benchmark of exported models: ncnn int8 vs ncnn fp32 latency and file size, and the speed
cost of each Winograd overflow policy (``tools/bench_deploy.py`` prints the table).

Models are random-initialized GluonCV nets (BN statistics randomized), calibrated on random
inputs: the arithmetic cost does not depend on trained values. Latency is the median of
interleaved single-image runs (each variant timed in turn, so machine noise hits all alike),
with ncnn's default options except the thread count.
"""
import os
import statistics
import tempfile
import time

import mxnet as mx
import numpy as np

from .. import calibrate, convert_model, freeze_bn
from .export import WINOGRAD_POLICIES, export, winograd_guards
from .graph import trace
from .verify import NcnnModel

MODELS = (('resnet18_v1', 224), ('mobilenet1.0', 224), ('mobilenetv2_1.0', 224),
          ('cifar_resnet20_v1', 32))


def calibrated_random_model(name, size, seed=0):
    """A converted GluonCV model with random weights and BN statistics, calibrated (max) on
    random inputs, BN frozen."""
    from gluoncv.model_zoo import get_model
    mx.random.seed(seed)
    rs = np.random.RandomState(seed)
    net = get_model(name, pretrained=False, **({'classes': 10} if 'cifar' in name else {}))
    net.initialize()
    data = mx.nd.array(rs.normal(0, 1, (2, 3, size, size)))
    net(data)
    for key, param in net.collect_params().items():
        if key.endswith(('running_var', 'gamma')):
            param.set_data(mx.nd.array(rs.uniform(0.5, 1.5, param.shape)))
        elif key.endswith(('running_mean', 'beta')):
            param.set_data(mx.nd.array(rs.normal(0, 0.2, param.shape)))
    convert_model(net)
    calibrate(net, [data], method='max')
    freeze_bn(net)
    return net


def _latency(models, sample, repeats):
    """{variant: median ms} over interleaved runs of one image."""
    times = {key: [] for key in models}
    for key, model in models.items():  # warm-up (memory pools, packed weights)
        model.run(sample, [model.output])
    for _ in range(repeats):
        for key, model in models.items():
            start = time.perf_counter()
            model.run(sample, [model.output])
            times[key].append(1000 * (time.perf_counter() - start))
    return {key: statistics.median(values) for key, values in times.items()}


def deploy_benchmark(models=MODELS, threads=(1, 2), repeats=30, progress=print):
    """Rows of {model, threads, fp32_ms, int8_ms per policy, sizes, guarded layer counts}."""
    rows = []
    for name, size in models:
        progress(f"{name} ({size}x{size}): exporting")
        net = calibrated_random_model(name, size)
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


def zoo_agreement(models=MODELS, samples=8, progress=print):
    """Rows of verify figures per model: fp32 relative error, int8 top-1 agreement and LSB
    agreement with ncnn's default packing, and the max error with packing off."""
    from .verify import verify
    rows = []
    for name, size in models:
        progress(f"{name} ({size}x{size}): export and verify")
        net = calibrated_random_model(name, size)
        data = [mx.nd.array(np.random.RandomState(2).normal(0, 1, (samples, 3, size, size)))]
        with tempfile.TemporaryDirectory() as folder:
            export(net, folder, (3, size, size))
            packed = verify(net, folder, data, per_layer=False)
            exact = verify(net, folder, data, packing=False)
        rows.append({'model': f"{name} ({size})", 'fp32': packed['fp32']['max_relative_error'],
                     'top1': packed['int8']['top1_agreement'],
                     'within': packed['int8']['within_1lsb'],
                     'max_lsb': packed['int8']['max_lsb'],
                     'exact_error': exact['int8']['max_abs_error'],
                     'exact_layers': sum(layer['max_lsb'] == 0 for layer in exact['layers']
                                         if layer['int8']),
                     'int8_layers': sum(layer['int8'] for layer in exact['layers'])})
    return rows


def format_agreement_table(rows):
    lines = ["| model (input) | fp32 ncnn vs float, max rel. error | int8 top-1 agreement | "
             "int8 output within 1 LSB | max LSB | packing off: max error | int8 layers "
             "bit-exact |", '|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['model']} | {r['fp32']:.2e} | {100 * r['top1']:.1f} % | "
                     f"{100 * r['within']:.2f} % | {r['max_lsb']:.3g} | {r['exact_error']:.3g} "
                     f"| {r['exact_layers']}/{r['int8_layers']} |")
    return '\n'.join(lines)
