"""Latency-aware int8: keep fp32 the layers that ncnn runs no faster in int8, measured in the
real runtime on the user's thread count.

ncnn's int8 is not faster everywhere: on an AVX-512 VNNI CPU its int8 depthwise path is slower
than its fp32 one (an int8 MobileNetV2 runs at 1.03-1.05x its fp32 latency). Per-layer timings
would miss what a change does around a layer (a requantization that becomes a dequantize and a
quantize), so every candidate is a whole model: the int8 layers are grouped by the code path
ncnn takes (int8 depthwise 3x3 stride 1, pointwise 1x1, ...), each group is tried fp32 with
the rest int8, all variants timed interleaved with the all-int8 model (median of ``rounds``),
and a group stays fp32 when that saves at least ``min_gain`` of the all-int8 latency. The
chosen layers get ``quantize=False`` (no table line: ncnn's mixed precision), and the combined
model is timed against the fp32 and all-int8 ones.
"""
import os
import tempfile
from collections import OrderedDict

import numpy as np

from ..modes import temporary_mode
from ..nn import quant_blocks
from ..timing import interleaved_medians, stopwatch
from . import ncnn
from .export import winograd_guards
from .graph import trace
from .optable.weighted import is_depthwise
from .verify import NcnnModel


def code_path(layer):
    """The ncnn int8 code path of an IR layer, as a group name."""
    p = layer.params
    if layer.kind == 'InnerProduct':
        return 'innerproduct'
    kind = 'depthwise' if is_depthwise(layer) else \
        ('grouped conv' if p['groups'] > 1 else 'conv')
    (kh, kw), (sh, sw) = p['kernel'], p['stride']
    return f"{kind} {kh}x{kw} s{sh}" + ('' if sh == sw else f"x{sw}")


def _int8_groups(graph):
    groups = OrderedDict()
    for layer in graph.layers:
        if layer.quant is not None and layer.quant.int8:
            groups.setdefault(code_path(layer), []).append(layer.name)
    return groups


def _write(folder, name, text, binary):
    param, weights = os.path.join(folder, f"{name}.param"), os.path.join(folder, f"{name}.bin")
    with open(param, 'w') as handle:
        handle.write(text)
    with open(weights, 'wb') as handle:
        handle.write(binary)
    return param, weights


def _models(net, input_shape, variants, threads, winograd, folder):
    """{key: NcnnModel} of the int8 model of ``net`` with, per variant, the blocks named in
    ``variants[key]`` fp32; 'fp32' is the fp32 model."""
    models = {}
    for key, names in variants.items():
        with temporary_mode(net, quantize=lambda block: block.mode['quantize']
                            and block.name not in names):
            graph = trace(net, input_shape)
            text, binary = ncnn.render(graph, int8=True,
                                       guarded=winograd_guards(graph, winograd))
        models[key] = NcnnModel(*_write(folder, key.replace(' ', '_'), text, binary), threads)
    graph = trace(net, input_shape)
    models['fp32'] = NcnnModel(*_write(folder, 'fp32', *ncnn.render(graph.float_graph())),
                               threads)
    return models, graph.outputs[0]


def _medians(models, output, input_shape, rounds):
    sample = np.random.RandomState(0).normal(0, 1, input_shape).astype(np.float32)
    runs = {key: stopwatch(model.run, sample, [output]) for key, model in models.items()}
    return {key: 1000 * seconds
            for key, seconds in interleaved_medians(runs, rounds, warmup=2).items()}


def latency_aware(net, input_shape, threads=1, rounds=20, min_gain=0.02, winograd='off',
                  progress=None):
    """Keep fp32 (``quantize=False``) the groups of int8 layers of ``net`` whose fp32 form
    makes the ncnn model at least ``min_gain`` faster; returns the report: per group its
    layers, the model's ms with the group fp32, and the choice; the fp32, all-int8 and chosen
    models' ms."""
    input_shape = tuple(input_shape)
    groups = _int8_groups(trace(net, input_shape))
    say = progress or (lambda message: None)
    with tempfile.TemporaryDirectory() as folder:
        say(f"latency-aware int8: timing {len(groups)} group(s) of int8 layers, "
            f"{threads} thread(s)")
        models, output = _models(net, input_shape, {'int8': [], **groups}, threads, winograd,
                                 folder)
        ms = _medians(models, output, input_shape, rounds)
        chosen = [key for key in groups if ms[key] <= ms['int8'] * (1 - min_gain)]
        kept = [name for key in chosen for name in groups[key]]
        say(f"latency-aware int8: {len(kept)} layer(s) fp32; timing the result")
        final, output = _models(net, input_shape, {'int8': [], 'chosen': kept}, threads,
                                winograd, folder)
        final_ms = _medians(final, output, input_shape, rounds)
    blocks = {block.name: block for _, block in quant_blocks(net)}
    for name in kept:
        blocks[name].set_mode(quantize=False)
    return {'threads': threads, 'min_gain': min_gain,
            'groups': [{'group': key, 'layers': names, 'ms': ms[key],
                        'gain': 1 - ms[key] / ms['int8'], 'fp32': key in chosen}
                       for key, names in groups.items()],
            'fp32_ms': final_ms['fp32'], 'all_int8_ms': final_ms['int8'],
            'chosen_ms': final_ms['chosen'], 'kept_fp32': kept}


def format_latency(report):
    """The report as a Markdown table and a summary line."""
    lines = ["| int8 layers (ncnn code path) | layers | model ms with them fp32 | gain | "
             "kept fp32 |", "|---|---|---|---|---|"]
    for group in report['groups']:
        lines.append(f"| {group['group']} | {len(group['layers'])} | {group['ms']:.2f} | "
                     f"{100 * group['gain']:+.1f} % | {'yes' if group['fp32'] else 'no'} |")
    lines.append('')
    lines.append(f"fp32 {report['fp32_ms']:.2f} ms, all-int8 {report['all_int8_ms']:.2f} ms, "
                 f"latency-aware {report['chosen_ms']:.2f} ms "
                 f"({report['chosen_ms'] / report['fp32_ms']:.2f}x fp32), "
                 f"{len(report['kept_fp32'])} layer(s) kept fp32, {report['threads']} thread(s)")
    return '\n'.join(lines)
