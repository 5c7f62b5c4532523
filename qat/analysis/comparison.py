"""The fully quantized net layer by layer against float: as simulated, and as measured with
the ncnn int8 model of an export (``qat.deploy.export``)."""
import os

import numpy as np

from ..batches import labeled_batches
from ..deploy.export import file_names, read_manifest
from ..deploy.verify import (EXACT_OPTIONS, NcnnModel, consumer_scales, ncnn_arithmetic,
                             simulate)
from ..metrics import cosine_similarity
from ..modes import temporary_mode
from ..report import bar_panels, fmt_number, format_table


def layer_comparison(net, data, folder, name='model', max_samples=16, threads=1, ncnn=True):
    """Every layer of an export (``qat.deploy.export(net, folder, ..., name)``) against
    float: the simulated quantized net (as deployed) and, with ``ncnn``, the ncnn int8 model
    run by the ncnn runtime (requantized int8 blobs divided by their scale).

    Returns one dict per exported layer (graph order): ``layer``, ``kind``, ``int8``,
    ``sim_cosine``, ``sim_max_error`` and, with ncnn, ``ncnn_cosine``, ``ncnn_max_error``
    (per-sample cosine averaged over the samples; max |float - quantized|)."""
    names = file_names(name)
    manifest = read_manifest(folder, name)
    batches, _ = labeled_batches(data, max_samples)
    layers = [layer for layer in manifest['layers']
              if layer['kind'] != 'Input' and layer['source']]
    sources = [layer['source'] for layer in layers]
    with temporary_mode(net, bn_frozen=True, online=False):
        sim = simulate(net, batches, sources, arithmetic=ncnn_arithmetic(manifest))
    with temporary_mode(net, quantize=False):
        reference = simulate(net, batches, sources)
    measured = None
    if ncnn:
        model = NcnnModel(os.path.join(folder, names['int8_param']),
                          os.path.join(folder, names['int8_bin']), threads, **EXACT_OPTIONS)
        blobs = [layer['name'] for layer in layers]
        runs = [model.run(sample, blobs) for batch in batches for sample in batch.asnumpy()]
        scales = consumer_scales(manifest)
        measured = {}
        for layer in layers:
            values = np.stack([run[layer['name']] for run in runs])
            if layer.get('requantized'):
                values = values / np.float32(scales[layer['name']])
            measured[layer['name']] = values
    rows = []
    for layer in layers:
        ref = reference[layer['source']].reshape(len(reference[layer['source']]), -1)
        ours = sim[layer['source']].reshape(len(ref), -1)
        row = {'layer': layer['name'], 'kind': layer['kind'], 'int8': layer['int8'],
               'sim_cosine': float(cosine_similarity(ref, ours).mean()),
               'sim_max_error': float(np.abs(ref - ours).max(initial=0))}
        if measured is not None:
            theirs = measured[layer['name']].reshape(len(ref), -1)
            row.update(ncnn_cosine=float(cosine_similarity(ref, theirs).mean()),
                       ncnn_max_error=float(np.abs(ref - theirs).max(initial=0)))
        rows.append(row)
    return rows


def format_comparison(rows):
    """``layer_comparison`` rows as a Markdown table."""
    measured = 'ncnn_cosine' in rows[0]
    headers = ['layer', 'kind', 'int8', 'sim cosine', 'sim max error'] + (
        ['ncnn cosine', 'ncnn max error'] if measured else [])
    table = []
    for row in rows:
        values = [row['layer'], row['kind'], 'yes' if row['int8'] else '',
                  fmt_number(row['sim_cosine'], 6), f"{row['sim_max_error']:.4g}"]
        if measured:
            values += [fmt_number(row['ncnn_cosine'], 6), f"{row['ncnn_max_error']:.4g}"]
        table.append(values)
    return format_table(table, headers)


def plot_comparison(rows, path):
    """Per layer: 1 - cosine (log scale would hide exact layers, so linear) and max error,
    simulated and ncnn side by side; PNG, atomic."""
    names = [row['layer'] for row in rows]
    kinds = [('simulated', 'sim')] + ([('ncnn int8', 'ncnn')] if 'ncnn_cosine' in rows[0]
                                      else [])
    panels = [('1 - cosine vs float', {label: [1.0 - row[f'{key}_cosine'] for row in rows]
                                       for label, key in kinds}),
              ('max |error| vs float', {label: [row[f'{key}_max_error'] for row in rows]
                                        for label, key in kinds})]
    return bar_panels(names, panels, 'Float vs int8, layer by layer', path)
