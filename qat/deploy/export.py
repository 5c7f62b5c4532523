"""export: a converted, calibrated or trained net -> one folder of deployable files.

Written, all or nothing, into ``folder``::

    <name>.prototxt, <name>.caffemodel   Caffe, fp32, BN fused (left out, with a warning,
                                         when a layer has no Caffe equivalent)
    <name>.table                         ncnn calibration table (int8 layers only)
    <name>.param, <name>.bin             ncnn fp32
    <name>-int8.param, <name>-int8.bin   ncnn int8 (mixed precision: layers without scales stay fp32)
    <name>.json                          manifest: input, layers, scales, Winograd guards

Every file is rendered into a temporary folder next to the destination first; only when all
of them exist are they moved into place, so a failure leaves no partial files.
"""
import glob
import json
import logging
import os
import shutil
import tempfile

import numpy as np

from . import caffe, ncnn, winograd
from ..errors import MissingFileError, UserError
from ..fileio import read_json
from .graph import ExportError, trace
from .optable import LAYERS
from .optable.weighted import requantized_scale
from .table import render_table

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def _winograd_layers(graph):
    """(layer, Winograd variant) of every int8 convolution ncnn may run with Winograd."""
    for layer in graph.layers:
        quant, p = layer.quant, layer.params
        if layer.kind != 'Convolution' or quant is None or not quant.int8:
            continue
        num_input = layer.weights['weight'].shape[1] * p['groups']
        variant = winograd.uses_winograd(p['kernel'], p['stride'], p['dilate'], p['groups'],
                                         num_input, p['num_output'])
        if variant is not None:
            yield layer, variant


# Winograd policy -> the int8 convs that get 31=64 (no Winograd). ncnn's int8 Winograd
# F(4,3) divides by 576 in float32 and is exact only while |conv output| <= 1864136
# (qat.deploy.winograd): most 8-bit layers cannot be proven safe. Default 'off', measured
# (python -m benchmarks.deploy): exact and, on this AVX-512 CPU, the fastest int8 path.
WINOGRAD_POLICIES = {
    # Guard only the layers whose worst-case int32 accumulation the bound cannot prove safe.
    'bound': lambda graph: {layer.name for layer, variant in _winograd_layers(graph)
                            if not winograd.is_safe(layer.quant.weight_codes,
                                                    groups=layer.params['groups'],
                                                    variant=variant)},
    # Guard every int8 conv that could run with Winograd (exact, slowest).
    'off': lambda graph: {layer.name for layer, _ in _winograd_layers(graph)},
    # Guard nothing: may overflow on adversarial inputs; for speed comparisons only.
    'unsafe': lambda graph: set(),
}


def winograd_guards(graph, policy='off'):
    if policy not in WINOGRAD_POLICIES:
        raise UserError(f"unknown winograd policy {policy!r}; valid: {sorted(WINOGRAD_POLICIES)}")
    return WINOGRAD_POLICIES[policy](graph)


def manifest(graph, name, guarded, input_names):
    """The export's description, read back by verify."""
    layers = []
    for layer in graph.layers:
        entry = {'name': layer.name, 'kind': layer.kind, 'inputs': layer.inputs,
                 'source': layer.source, 'int8': bool(layer.quant is not None and layer.quant.int8)}
        simulation = LAYERS[layer.kind].simulation
        # (a layer without a source node, a decoder's own, is not simulated)
        arithmetic = simulation(layer) if simulation is not None and layer.source else []
        if arithmetic:  # verify computes these nodes with ncnn's arithmetic
            entry['ncnn_arithmetic'] = arithmetic
        if entry['int8']:
            top = requantized_scale(graph, layer)
            entry.update(input_scale=float(layer.quant.input_scale),
                         input_bits=layer.quant.input_bits,
                         weight_bits=layer.quant.weight_bits,
                         requantized=top is not None, winograd_guard=layer.name in guarded)
        layers.append(entry)
    return {'format_version': FORMAT_VERSION, 'name': name, 'inputs': list(input_names),
            'input_shape': list(graph.input.params['shape']), 'outputs': graph.outputs,
            'files': file_names(name), 'layers': layers}


def file_names(name):
    return {'prototxt': f'{name}.prototxt', 'caffemodel': f'{name}.caffemodel',
            'table': f'{name}.table', 'param': f'{name}.param', 'bin': f'{name}.bin',
            'int8_param': f'{name}-int8.param', 'int8_bin': f'{name}-int8.bin',
            'manifest': f'{name}.json'}


def read_manifest(folder, name='model'):
    """The manifest of the export ``name`` in ``folder`` (an error naming it if absent)."""
    path = os.path.join(folder, file_names(name)['manifest'])
    if not os.path.isfile(path):
        raise MissingFileError(f"no export manifest {path}: export the model first "
                                f"(qat export, qat.export)")
    return read_json(path)


def _check_finite(graph):
    """A NaN or infinite weight, bias or scale would be written silently: refuse, naming the
    layer."""
    for layer in graph.layers:
        arrays = dict(layer.weights)
        if layer.quant is not None:
            arrays['weight scales'] = layer.quant.weight_scales
            if layer.quant.input_scale is not None:
                arrays['input scale'] = np.asarray(layer.quant.input_scale)
        for what, values in arrays.items():
            if values is not None and not np.all(np.isfinite(values)):
                raise ExportError(f"{layer.name}: its {what} hold NaN or infinite values "
                                  f"(did training diverge?); nothing was exported")


def _prepare_folder(folder):
    """Make ``folder`` and check it is writable; remove staging folders that a killed export
    left there."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix='.probe-')
        probe.close()
    except OSError as err:
        raise ExportError(f"cannot write to output folder {folder}: {err.strerror or err}") \
            from err
    for stale in glob.glob(os.path.join(folder, '.export-*')):
        shutil.rmtree(stale, ignore_errors=True)


def export(net, folder, input_shape, name='model', input_names=('data',), winograd='off',
           detection=None):
    """Export ``net`` (converted; calibrated or trained) into ``folder``.

    input_shape: (C, H, W). winograd: a key of WINOGRAD_POLICIES. detection: for a GluonCV
    SSD / YOLOv3, overrides of the deployed decoder's thresholds ({'confidence_threshold':
    0.5, ...}; ``qat.deploy.optable.detection.DETECTION_OPTIONS``). Returns {kind: path}.
    Raises ExportError (nothing written) for an op that cannot be exported, a layer whose
    input range is unset, non-finite weights or scales, or a folder that cannot be written."""
    if not (isinstance(input_shape, (tuple, list)) and len(input_shape) == 3
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                    for d in input_shape)):
        raise ExportError(f"input_shape must be (C, H, W) of positive integers, got "
                          f"{input_shape!r}")
    if not name or os.path.basename(name) != name or name in ('.', '..'):
        raise ExportError(f"export name {name!r} must be a plain file name (no folder)")
    graph = trace(net, tuple(input_shape), input_names, detection)
    _check_finite(graph)
    guarded = winograd_guards(graph, winograd)
    fp32_param, fp32_bin = ncnn.render(graph.float_graph(), int8=False)
    int8_param, int8_bin = ncnn.render(graph, int8=True, guarded=guarded)
    contents = {'table': render_table(graph).encode(), 'param': fp32_param.encode(),
                'bin': fp32_bin, 'int8_param': int8_param.encode(), 'int8_bin': int8_bin,
                'manifest': json.dumps(manifest(graph, name, guarded, input_names),
                                       indent=1).encode()}
    _prepare_folder(folder)
    names = file_names(name)
    staging = tempfile.mkdtemp(dir=folder, prefix='.export-')
    try:
        for kind, data in contents.items():
            with open(os.path.join(staging, names[kind]), 'wb') as handle:
                handle.write(data)
        try:
            caffe.write_caffe(graph.float_graph(), os.path.join(staging, names['prototxt']),
                              os.path.join(staging, names['caffemodel']), name)
        except UserError as err:  # Caffe as far as Caffe has the layers
            log.warning("%s: no Caffe files: %s", name, err)
            names = {k: v for k, v in names.items() if k not in ('prototxt', 'caffemodel')}
        for kind, file_name in names.items():
            os.replace(os.path.join(staging, file_name), os.path.join(folder, file_name))
    except OSError as err:
        raise ExportError(f"writing the export into {folder} failed: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    int8_layers = sum(1 for layer in graph.layers if layer.quant is not None
                      and layer.quant.int8)
    log.info("exported %s: %d layers (%d int8, %d Winograd-guarded) into %s", name,
             len(graph.layers), int8_layers, len(guarded), folder)
    if int8_layers == 0:
        log.warning("%s: no int8 layer (quantization disabled?): the int8 model is fp32", name)
    return {kind: os.path.join(folder, file_name) for kind, file_name in names.items()}

