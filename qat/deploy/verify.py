"""verify: run the exported ncnn models with the real ncnn runtime and judge them.

int8 model vs the simulated (fake-quantized) net, layer by layer: requantized blobs as int8
codes (exact agreement expected), float blobs in LSBs of their quantization step; the final
output's top-1 agreement and its error in LSBs. fp32 model vs the float net (quantization
disabled): relative error. A detector (an export ending in ncnn's DetectionOutput /
Yolov3DetectionOutput) is judged on its raw head outputs (LSBs) and on its detections:
ncnn's against the numpy reference of the same decoding (``qat.deploy.detection``) fed with
the simulated heads, matched by IoU. The report is a dict (also written as JSON);
``passed`` is False when a threshold is missed.
"""
import json
import logging
import os

import mxnet as mx
import numpy as np

from .. import native, reference
from ..batches import labeled_batches
from ..errors import MissingFileError, UserError
from ..fileio import write_json
from ..metrics import top1
from ..modes import temporary_mode
from ..nn import quant_blocks
from ..report import progress
from ..symbol import SymbolGraph, outputs_block, trace_symbol
from . import detection
from .export import file_names, read_manifest
from .graph import block_index
from .ncnn import read_param, read_weights

log = logging.getLogger(__name__)

# Default pass thresholds (named; each one is checked and reported).
THRESHOLDS = {
    'min_top1_agreement': 0.99,      # int8 ncnn vs simulated net, fraction of samples
    'min_within_1lsb': 0.999,        # fraction of int8 output elements within 1 LSB of the sim
    'max_fp32_relative_error': 1e-4,  # fp32 ncnn vs float net: max|diff| / max|float|
}
# A detector's (its heads take min_within_1lsb and max_fp32_relative_error above).
DETECTION_THRESHOLDS = {
    'min_detection_iou': 0.99,       # int8 ncnn vs reference decoding: every matched pair
    'max_score_lsb': 1.0,            # |score difference| in steps of 1/127
    'max_unmatched_detections': 0,   # missing + extra (borderline scores not counted)
}


# ncnn options for comparisons: fp16 storage off (else fp32 weights are stored as fp16,
# docs/ncnn-int8-contract.md §3.5); int8 inference on (required for int8 models).
EXACT_OPTIONS = {'use_fp16_storage': False, 'use_fp16_packed': False,
                 'use_fp16_arithmetic': False, 'use_int8_inference': True}


class NcnnModel:
    """An ncnn model loaded with ncnn's default options except ``threads`` and ``options``
    ({Option attribute: value}); ``run`` returns the named blobs."""

    def __init__(self, param, binary, threads=1, **options):
        import ncnn
        self.net = ncnn.Net()
        self.net.opt.num_threads = threads
        for key, value in options.items():
            if not hasattr(self.net.opt, key):
                raise UserError(f"unknown ncnn option {key!r}")
            setattr(self.net.opt, key, value)
        for path in (param, binary):
            if not os.path.isfile(path):
                raise MissingFileError(f"ncnn model file not found: {path}")
        if self.net.load_param(param) != 0:
            raise UserError(f"{param}: ncnn could not parse this .param file (damaged?)")
        if self.net.load_model(binary) != 0:
            raise UserError(f"{binary}: ncnn could not read the weights (truncated, or not "
                            f"the .bin of {os.path.basename(param)}?)")
        self._ncnn = ncnn

    def run(self, sample, blobs, input_name='data'):
        """{blob: numpy array} for one (C, H, W) float sample. A requantized int8 blob comes
        back as its integer codes."""
        array = np.ascontiguousarray(sample, np.float32)
        # ncnn.Mat(array) wraps the numpy buffer without owning it; an in-place first layer
        # (Clip, ReLU) on such a Mat crashes the runtime, so hand ncnn its own copy.
        mat = self._ncnn.Mat(array).clone()
        extractor = self.net.create_extractor()
        extractor.input(input_name, mat)
        results = {}
        for blob in blobs:
            status, out = extractor.extract(blob)
            if status != 0:
                raise RuntimeError(f"ncnn could not compute blob {blob!r} (status {status})")
            # (a detection layer that finds nothing leaves its blob empty)
            results[blob] = np.zeros(0, np.float32) if out.empty() else \
                np.array(out, dtype=np.float32, copy=True)
        return results


def _sim_node_names(net, sources, graph):
    """Key in the quantized graph (a ``SymbolGraph``) of each float-graph node key (a quantized
    layer's output is its ``dequantize`` node there, the same call of the block; every other
    node keeps its key)."""
    index = block_index(net)
    names = []
    for source in sources:
        name, hash_, occurrence = source.partition('#')
        block, role = index.get(name, (None, None))
        dequantize = block.prefix + 'dequantize' + hash_ + occurrence \
            if block is not None else None
        if block is not None and (role == 'layer' or not graph.has_op(source)) \
                and graph.has_op(dequantize):
            names.append(dequantize)
        else:
            names.append(source)
    return names


def ncnn_arithmetic(manifest):
    """The manifest's ``ncnn_arithmetic`` entries (the op table's ``simulation``): MXNet
    nodes to compute with ncnn's own fp32 arithmetic."""
    return [entry for layer in manifest['layers'] for entry in layer.get('ncnn_arithmetic', [])]


def _with_ncnn_arithmetic(net, symbol, arithmetic):
    """``symbol`` with the node of each ``arithmetic`` entry (float-graph keys) computed by
    the native op that reproduces ncnn's arithmetic, from the entry's input nodes. Without the
    native operators the symbol is returned unchanged, after a warning (MXNet's arithmetic
    can then differ from ncnn's in the last bit of those layers)."""
    if not arithmetic:
        return symbol
    if not native.available():
        log.warning("native operators unavailable: %d fp32 layer(s) simulated with MXNet's "
                    "arithmetic, which can differ from ncnn's in the last bit",
                    len(arithmetic))
        return symbol
    graph = SymbolGraph(symbol)
    at = {graph.key(index): index for index in range(len(graph.nodes))}
    js = json.loads(symbol.tojson())
    for entry in arithmetic:
        target, = _sim_node_names(net, [entry['node']], graph)
        inputs = _sim_node_names(net, entry['inputs'] or [], graph)
        missing = [key for key in [target] + inputs if key not in at]
        if missing:
            raise UserError(f"nodes not found in the simulated graph: {missing}")
        node = js['nodes'][at[target]]
        js['nodes'][at[target]] = {
            'op': entry['op'], 'name': node['name'],
            'attrs': {key: repr(value) if isinstance(value, float) else str(value)
                      for key, value in entry['attrs'].items()},
            'inputs': node['inputs'] if entry['inputs'] is None
            else [[at[key], 0, 0] for key in inputs]}
    return mx.sym.load_json(json.dumps(js))


def simulate(net, batches, sources, input_name='data', arithmetic=None):
    """Outputs of the graph nodes ``sources`` (float-graph names) of ``net`` in its current
    modes, inference mode, concatenated over ``batches``: {source: array (N, ...)}.
    arithmetic: {source: manifest ``ncnn_arithmetic`` entry} of nodes to compute with ncnn's
    fp32 arithmetic (``ncnn_arithmetic(manifest)``)."""
    symbol = _with_ncnn_arithmetic(net, trace_symbol(net, (input_name,)), arithmetic)
    graph = SymbolGraph(symbol)
    names = _sim_node_names(net, sources, graph)
    missing = [n for n in names if not graph.has_op(n)]
    if missing:
        raise UserError(f"nodes not found in the simulated graph: {missing}")
    block = outputs_block(net, [graph.op_output(n) for n in names], input_name)
    collected = {source: [] for source in sources}
    for batch in batches:
        values = block(batch)
        values = values if isinstance(values, (list, tuple)) else [values]
        for source, value in zip(sources, values):
            collected[source].append(value.asnumpy())
    return {source: np.concatenate(parts) for source, parts in collected.items()}


def _lsb_stats(ours, theirs, lsb):
    """Errors in LSBs: max, and fraction of elements within 1 LSB (+ a float32 rounding
    margin: a value exactly one step off must count as within)."""
    errors = np.abs(ours.astype(np.float64) - theirs) / lsb
    return {'max_lsb': float(errors.max(initial=0)),
            'within_1lsb': float(np.mean(errors <= 1 + 1e-4)) if errors.size else 1.0}


def _compare_layer(layer, sim, ncnn_values, consumer_scale):
    """Agreement of one blob: codes for requantized blobs, LSBs otherwise."""
    entry = {'layer': layer['name'], 'kind': layer['kind'], 'int8': layer['int8']}
    if layer.get('requantized'):
        codes = reference.quantize(sim, consumer_scale)
        diff = np.abs(codes - np.rint(ncnn_values).astype(np.int64))
        entry.update(lsb=float(1 / consumer_scale), code_mismatches=int((diff > 0).sum()),
                     max_code_diff=int(diff.max(initial=0)), elements=int(diff.size),
                     within_1lsb=float(np.mean(diff <= 1)), max_lsb=float(diff.max(initial=0)))
        return entry
    if consumer_scale is not None:
        lsb = 1.0 / float(consumer_scale)
    else:  # an output blob: one step of an int8 grid spanning its own range
        lsb = float(np.abs(sim).max(initial=0)) / 127 or 1.0
    entry.update(lsb=lsb, elements=int(sim.size), **_lsb_stats(ncnn_values, sim, lsb))
    if consumer_scale is not None:
        entry['code_mismatches'] = int((reference.quantize(sim, consumer_scale)
                                        != reference.quantize(ncnn_values, consumer_scale)).sum())
    return entry


def consumer_scales(manifest):
    """{blob: the input scale of the first int8 layer reading it} (for a requantized blob, the
    scale of the int8 codes ncnn hands over)."""
    scales = {}
    for layer in manifest['layers']:
        if layer['int8']:
            for blob in layer['inputs']:
                scales.setdefault(blob, layer['input_scale'])
    return scales


def _run_ncnn(folder, name, samples, blobs, outputs, threads, packing):
    """({blob: [per-sample array]} of the int8 model, the same of the fp32 model for the
    blobs ``outputs``) of the export ``name`` in ``folder``, with the exact-comparison
    options."""
    names = file_names(name)
    options = dict(EXACT_OPTIONS, use_packing_layout=packing)
    model8 = NcnnModel(os.path.join(folder, names['int8_param']),
                       os.path.join(folder, names['int8_bin']), threads, **options)
    model32 = NcnnModel(os.path.join(folder, names['param']), os.path.join(folder, names['bin']),
                        threads, **options)
    ncnn8, ncnn32 = {blob: [] for blob in blobs}, {blob: [] for blob in outputs}
    for sample in progress(samples, label='verify (ncnn)', unit='image'):
        for blob, value in model8.run(sample, blobs).items():
            ncnn8[blob].append(value)
        for blob, value in model32.run(sample, outputs).items():
            ncnn32[blob].append(value)
    return ncnn8, ncnn32


INT32_CODES = 2.0 ** 31  # ncnn's float -> int8 goes through int32


def overflow_notes(manifest, sim, samples):
    """Why ncnn's codes may differ where the net's activations outrun their ranges: one
    line per int8 layer whose input reaches ``|x| * scale >= 2^31`` (ncnn converts
    ``x * scale`` to int32 before saturating to int8; beyond int32 the conversion is
    undefined, and x86 wraps it to the most negative code). ``sim``: {source: values} of
    the simulated layers; ``samples``: the input batch."""
    by_name = {layer['name']: layer for layer in manifest['layers']}
    notes = []
    for layer in manifest['layers']:
        if not layer['int8']:
            continue
        producer = by_name[layer['inputs'][0]]
        values = samples if producer['kind'] == 'Input' else sim.get(producer['source'])
        if values is None:
            continue
        peak = float(np.abs(values).max(initial=0))
        codes = peak * layer['input_scale']
        if codes >= INT32_CODES:
            notes.append(f"{layer['name']}: its input reaches {peak:.3g}, {codes:.3g} codes "
                         f"at its scale (beyond int32: ncnn's float -> int8 conversion "
                         f"wraps there; the activations outrun the calibrated range "
                         f"{codes / 127:.3g}x: an untrained or diverged net?)")
    return notes


def _missed(checks, limits):
    """One line per ({threshold: value}) check that misses its limit (NaN misses all)."""
    return [f"{key}: {value:.6g} (limit {limits[key]:.6g})" for key, value in checks.items()
            if not (value <= limits[key] if key.startswith('max') else value >= limits[key])]


def _failures(report, limits):
    """One line per threshold the report misses (a NaN misses every threshold)."""
    checks = {'min_top1_agreement': report['int8']['top1_agreement'],
              'min_within_1lsb': report['int8']['within_1lsb'],
              'max_fp32_relative_error': report['fp32']['max_relative_error']}
    return _missed(checks, limits)


def verify(net, folder, data, name='model', report_path=None, max_samples=None, threads=1,
           packing=True, per_layer=True, **thresholds):
    """Run ``folder``'s ncnn models on ``data`` and compare with ``net``.

    data: iterable of batches (NDArray / numpy, or (data, label)); labels add accuracies.
    thresholds: override THRESHOLDS (and a detector's DETECTION_THRESHOLDS). Returns the
    report (``report['passed']``)."""
    unknown = set(thresholds) - set(THRESHOLDS) - set(DETECTION_THRESHOLDS)
    if unknown:
        raise UserError(f"unknown verify threshold(s) {sorted(unknown)}; valid: "
                         f"{sorted(THRESHOLDS) + sorted(DETECTION_THRESHOLDS)}")
    manifest = read_manifest(folder, name)
    decoder = detection.detector_layer(manifest)
    limits = {**THRESHOLDS, **(DETECTION_THRESHOLDS if decoder is not None else {}),
              **thresholds}
    if not quant_blocks(net):
        raise UserError(f"{net.name} has no quantized blocks: verify needs the converted net")
    batches, labels = labeled_batches(data, max_samples)
    layers = [layer for layer in manifest['layers'] if layer['kind'] != 'Input'
              and layer['source']]
    # the outputs compared: a detector's raw heads, else the net's outputs
    finals = [head['name'] for head in head_layers(manifest, decoder)] \
        if decoder is not None else manifest['outputs']
    if not per_layer:
        layers = [layer for layer in layers if layer['name'] in finals]
    output = manifest['outputs'][0]
    by_name = {layer['name']: layer for layer in manifest['layers']}
    # The simulation as deployed: BN folded with its running statistics (the same function
    # in inference, rounded as ncnn rounds it) and the tracked ranges.
    with temporary_mode(net, bn_frozen=True, online=False):
        sim = simulate(net, batches, [layer['source'] for layer in layers],
                       arithmetic=ncnn_arithmetic(manifest))
    samples = np.concatenate([b.asnumpy() for b in batches])
    if decoder is not None:
        return _detector_report(net, manifest, folder, batches, samples, layers, sim, limits,
                                threads, packing, report_path)
    with temporary_mode(net, quantize=False):
        float_out = simulate(net, batches, [by_name[output]['source']])
    ncnn8, ncnn32 = _run_ncnn(folder, name, samples, [layer['name'] for layer in layers],
                              [output], threads, packing)
    scales = consumer_scales(manifest)
    per_layer_report = []
    for layer in layers:
        theirs = np.stack(ncnn8[layer['name']]).reshape(len(samples), -1)
        ours = sim[layer['source']].reshape(len(samples), -1)
        per_layer_report.append(_compare_layer(layer, ours, theirs,
                                               scales.get(layer['name'])))
    out_sim = sim[by_name[output]['source']].reshape(len(samples), -1)
    out8 = np.stack(ncnn8[output]).reshape(len(samples), -1)
    out_float = float_out[by_name[output]['source']].reshape(len(samples), -1)
    out32 = np.stack(ncnn32[output]).reshape(len(samples), -1)
    final = _compare_layer(by_name[output], out_sim, out8, None)
    report = {
        'name': name, 'folder': folder, 'samples': int(len(samples)),
        'options': {'threads': threads, 'packing': packing, 'fp16': False},
        'int8': {'top1_agreement': top1(out8, out_sim.argmax(1)),
                 'max_abs_error': float(np.abs(out8 - out_sim).max()),
                 'output_lsb': final['lsb'], 'max_lsb': final['max_lsb'],
                 'within_1lsb': final['within_1lsb']},
        'fp32': {'max_relative_error': float(np.abs(out32 - out_float).max()
                                             / max(np.abs(out_float).max(), 1e-30)),
                 'top1_agreement': top1(out32, out_float.argmax(1))},
        'layers': per_layer_report,
        'thresholds': limits,
    }
    if labels is not None:
        report['accuracy'] = {key: top1(values, labels) for key, values in
                              (('float', out_float), ('simulated', out_sim),
                               ('ncnn_fp32', out32), ('ncnn_int8', out8))}
    report['failures'] = _failures(report, limits)
    report['passed'] = not report['failures']
    report['notes'] = overflow_notes(manifest, sim, samples)
    if report_path is not None:
        write_json(report_path, report)
    return report


def decoder_inputs(manifest, decoder, values, weights, sample, params):
    """The decoder's input blobs for one sample: ``values`` ({source: (N, ...) array}) for
    the heads, ncnn's Softmax of its input where the decoder reads a Softmax, the priors
    from the .bin, and the fp32 layers in between (a YOLOv3's rows for DetectionOutput)
    computed in numpy from ``params`` ({layer name: params}, the .param)."""
    by_name = {layer['name']: layer for layer in manifest['layers']}
    found = {}

    def blob(name):
        if name not in found:
            layer = by_name[name]
            if layer['kind'] == 'MemoryData':
                found[name] = weights[name]['data']
            elif layer['kind'] == 'Softmax':
                found[name] = detection.softmax(blob(layer['inputs'][0]))
            elif layer['source']:
                found[name] = values[layer['source']][sample]
            else:
                found[name] = detection.fp32_layer(layer['kind'], params[name],
                                                   [blob(b) for b in layer['inputs']])
        return found[name]
    return [blob(name) for name in decoder['inputs']]


def head_layers(manifest, decoder):
    """The raw prediction layers the decoder (a manifest entry) reads, through its fp32
    layers (a Softmax's input in its place), in order of first use."""
    by_name = {layer['name']: layer for layer in manifest['layers']}
    heads, pending = [], list(decoder['inputs'])
    while pending:
        layer = by_name[pending.pop(0)]
        if layer['kind'] == 'Softmax':
            layer = by_name[layer['inputs'][0]]
        if layer['kind'] == 'MemoryData' or layer in heads:
            continue
        if layer['source']:
            heads.append(layer)
        else:
            pending.extend(layer['inputs'])
    return heads


def _detector_report(net, manifest, folder, batches, samples, layers, sim, limits, threads,
                     packing, report_path):
    """verify's report of a detector: per layer as for any net, the heads in LSBs, fp32 heads
    against the float net, and ncnn's detections (int8 and fp32) against the reference
    decoding of the simulated (float) heads."""
    decoder = detection.detector_layer(manifest)
    heads = head_layers(manifest, decoder)
    names = file_names(manifest['name'])
    params = {layer[1]: layer[4] for layer in read_param(os.path.join(folder,
                                                                      names['int8_param']))}
    weights = read_weights(os.path.join(folder, names['int8_param']),
                           os.path.join(folder, names['int8_bin']))
    with temporary_mode(net, quantize=False):
        float_heads = simulate(net, batches, [head['source'] for head in heads])
    blobs = list(dict.fromkeys([layer['name'] for layer in layers] + [decoder['name']]))
    ncnn8, ncnn32 = _run_ncnn(folder, manifest['name'], samples, blobs,
                              [head['name'] for head in heads] + [decoder['name']], threads,
                              packing)
    count = len(samples)
    scales = consumer_scales(manifest)
    per_layer = [_compare_layer(layer, sim[layer['source']].reshape(count, -1),
                                np.stack(ncnn8[layer['name']]).reshape(count, -1),
                                scales.get(layer['name'])) for layer in layers]
    by_layer = {entry['layer']: entry for entry in per_layer}
    head_entries = [by_layer[head['name']] for head in heads]
    relative = max(float(np.abs(np.stack(ncnn32[head['name']]).reshape(count, -1)
                                - float_heads[head['source']].reshape(count, -1)).max()
                         / max(np.abs(float_heads[head['source']]).max(), 1e-30))
                   for head in heads)
    threshold = float(params[decoder['name']][detection_threshold_id(decoder['kind'])])
    # DetectionOutput keeps at most keep_top_k rows: near-equal scores at that cut may differ
    cap = int(params[decoder['name']].get(3, 100)) if decoder['kind'] == 'DetectionOutput' \
        else None
    matches = {}
    for precision, values, outputs in (('int8', sim, ncnn8), ('fp32', float_heads, ncnn32)):
        per_sample = []
        for k in range(count):
            ours = detection.decode(decoder['kind'], params[decoder['name']],
                                    decoder_inputs(manifest, decoder, values, weights, k,
                                                   params))
            per_sample.append(detection.match(ours, outputs[decoder['name']][k].reshape(-1, 6),
                                              threshold, cap=cap))
        matches[precision] = detection.merge_matches(per_sample)
    report = {
        'name': manifest['name'], 'folder': folder, 'samples': int(count),
        'options': {'threads': threads, 'packing': packing, 'fp16': False},
        'detector': decoder['kind'], 'score_threshold': threshold,
        'int8': {'heads_max_lsb': max(e['max_lsb'] for e in head_entries),
                 'within_1lsb': min(e['within_1lsb'] for e in head_entries),
                 'detections': matches['int8']},
        'fp32': {'max_relative_error': relative, 'detections': matches['fp32']},
        'layers': per_layer, 'thresholds': limits,
    }
    report['failures'] = _detector_failures(report, limits)
    report['passed'] = not report['failures']
    report['notes'] = overflow_notes(manifest, sim, samples)
    if report_path is not None:
        write_json(report_path, report)
    return report


def detection_threshold_id(kind):
    """The ncnn param id of a detection layer's score threshold."""
    return {'DetectionOutput': 4, 'Yolov3DetectionOutput': 2}[kind]


def _detector_failures(report, limits):
    found = report['int8']['detections']
    checks = {'min_within_1lsb': report['int8']['within_1lsb'],
              'max_fp32_relative_error': report['fp32']['max_relative_error'],
              'min_detection_iou': found['min_iou'],
              'max_score_lsb': found['max_score_lsb'],
              'max_unmatched_detections': found['missing'] + found['extra']}
    return _missed(checks, limits)


def _format_detections(label, found):
    return (f"{label}: {found['matched']}/{found['reference']} reference detections matched "
            f"(min IoU {found['min_iou']:.6f}, max score difference "
            f"{found['max_score_diff']:.3g} = {found['max_score_lsb']:.3g} LSB), "
            f"{found['missing']} missing, {found['extra']} extra, "
            f"{found['borderline']} borderline"
            + (f", {found['ties']} ties (overlapping boxes of equal scores, NMS kept the "
               f"other)" if found.get('ties') else ''))


def format_report(report):
    """The report as a text table: per-layer agreement, then the summary."""
    rows = [f"{'layer':<44} {'kind':<13} {'int8':<4} {'LSB':>10} {'max LSB':>8} "
            f"{'<=1 LSB':>8} {'code diffs':>10}"]
    for entry in report['layers']:
        rows.append(f"{entry['layer'][:44]:<44} {entry['kind']:<13} "
                    f"{'yes' if entry['int8'] else '':<4} {entry['lsb']:>10.3g} "
                    f"{entry['max_lsb']:>8.3g} {100 * entry['within_1lsb']:>7.2f}% "
                    f"{entry.get('code_mismatches', ''):>10}")
    i8, f32 = report['int8'], report['fp32']
    rows.append('')
    if 'detector' in report:
        rows.append(f"int8 heads: max {i8['heads_max_lsb']:.3g} LSB, "
                    f"{100 * i8['within_1lsb']:.3f}% within 1 LSB; fp32 heads: max relative "
                    f"error {f32['max_relative_error']:.3g}")
        rows.append(_format_detections('int8 ncnn vs reference decoding', i8['detections']))
        rows.append(_format_detections('fp32 ncnn vs reference decoding', f32['detections']))
        rows.append('PASSED' if report['passed'] else 'FAILED: ' + '; '.join(report['failures']))
        return '\n'.join(rows + _note_lines(report))
    rows.append(f"int8 ncnn vs simulated: top-1 agreement {100 * i8['top1_agreement']:.2f}%, "
                f"max error {i8['max_abs_error']:.4g} ({i8['max_lsb']:.3g} LSB), "
                f"{100 * i8['within_1lsb']:.3f}% within 1 LSB")
    rows.append(f"fp32 ncnn vs float: max relative error {f32['max_relative_error']:.3g}, "
                f"top-1 agreement {100 * f32['top1_agreement']:.2f}%")
    if 'accuracy' in report:
        rows.append('accuracy: ' + ', '.join(f"{k} {100 * v:.2f}%"
                                             for k, v in report['accuracy'].items()))
    rows.append('PASSED' if report['passed'] else 'FAILED: ' + '; '.join(report['failures']))
    return '\n'.join(rows + _note_lines(report))


def _note_lines(report):
    return [f"note: {note}" for note in report.get('notes', [])]
