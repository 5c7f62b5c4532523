"""Layer-wise quantization error analysis: sensitivity per layer and float-vs-int8 comparison.

* ``sensitivity``: each quantized layer quantized *alone* (every other layer float): cosine
  similarity and SQNR of the network output and of the layer's own output against float, and
  the accuracy drop on a labeled set. The layers are ranked most sensitive first.
* ``layer_comparison``: the fully quantized net layer by layer against float, both as
  simulated and as measured with the ncnn int8 model of an export.

Both write a Markdown table and a PNG plot (``qat.report.write_report``); the metrics are
``qat.metrics``, the probes ``qat.probes``.
"""
import logging

import numpy as np

from ..batches import labeled_batches
from ..metrics import ErrorStats, top1
from ..modes import check_calibrated, deployed, quantized_only
from ..probes import execution_order, run_with_layer
from ..report import bar_panels, fmt_number, format_table, progress as layer_bar

log = logging.getLogger(__name__)


# ----- sensitivity ----------------------------------------------------------------------------
def _accuracy(outputs, labels):
    return 100.0 * top1(np.concatenate(outputs), labels)


def _numpy(out):
    return (out[0] if isinstance(out, (list, tuple)) else out).asnumpy()


def sensitivity(net, data, max_samples=None, progress=None):
    """Quantize each quantized layer of ``net`` alone and measure the damage.

    data: batches (NDArray, or (data, label) tuples: labels add accuracies); at most
    ``max_samples`` samples are used. Each layer runs with its own configuration and ranges
    (calibrate first), every other quantized layer float, as deployed (``deployed``).
    Returns one dict per layer in execution order: ``layer``, ``bits`` ('W8A8'),
    ``output_cosine`` / ``output_sqnr`` (network output vs float), ``layer_cosine`` /
    ``layer_sqnr`` (the layer's output vs its float output on the same float input),
    ``accuracy`` and ``accuracy_drop`` (points; with labels), and ``rank`` (1 = most
    sensitive: lowest output cosine, then largest accuracy drop, then network order)."""
    batches, labels = labeled_batches(data, max_samples)
    order = execution_order(net, batches[0])
    check_calibrated(order)
    with deployed(net):
        with quantized_only(net, ()):
            float_out = [_numpy(net(x)) for x in batches]
        float_accuracy = None if labels is None else _accuracy(float_out, labels)
        rows = []
        for number, block in enumerate(layer_bar(order, label='sensitivity', unit='layer'), 1):
            out_stats, layer_stats, outputs = ErrorStats(), ErrorStats(), []
            with quantized_only(net, {block}):
                for x, reference in zip(batches, float_out):
                    out, layer_in, layer_out = run_with_layer(net, x, block)
                    block.set_mode(quantize=False)
                    layer_float = block(layer_in).asnumpy()
                    block.set_mode(quantize=True)
                    out = _numpy(out)
                    outputs.append(out)
                    out_stats.add(reference, out)
                    layer_stats.add(layer_float, layer_out.asnumpy())
            cfg = block.config
            row = {'layer': block.name, 'bits': f"W{cfg.weight_bits}A{cfg.input_bits}",
                   'output_cosine': out_stats.cosine, 'output_sqnr': out_stats.sqnr,
                   'layer_cosine': layer_stats.cosine, 'layer_sqnr': layer_stats.sqnr}
            if labels is not None:
                row['accuracy'] = _accuracy(outputs, labels)
                row['accuracy_drop'] = float_accuracy - row['accuracy']
            rows.append(row)
            if progress:
                progress(f"sensitivity {number}/{len(order)} {block.name}: output cosine "
                         f"{row['output_cosine']:.6f}, SQNR {row['output_sqnr']:.2f} dB")
    ranked = sorted(range(len(rows)), key=lambda i: (rows[i]['output_cosine'],
                                                     -rows[i].get('accuracy_drop', 0.0), i))
    for rank, index in enumerate(ranked, 1):
        rows[index]['rank'] = rank
    for row in rows:
        row['float_accuracy'] = float_accuracy
    return rows


def ranked_layers(rows):
    """Layer names of ``sensitivity`` rows, most sensitive first."""
    return [row['layer'] for row in sorted(rows, key=lambda row: row['rank'])]


def format_sensitivity(rows):
    """``sensitivity`` rows as a Markdown table (network order)."""
    labeled = 'accuracy' in rows[0]
    headers = ['rank', 'layer', 'bits', 'output cosine', 'output SQNR (dB)', 'layer cosine',
               'layer SQNR (dB)'] + (['accuracy (%)', 'drop (points)'] if labeled else [])
    table = []
    for row in rows:
        values = [row['rank'], row['layer'], row['bits'], fmt_number(row['output_cosine'], 6),
                  fmt_number(row['output_sqnr'], 2), fmt_number(row['layer_cosine'], 6),
                  fmt_number(row['layer_sqnr'], 2)]
        if labeled:
            values += [fmt_number(row['accuracy'], 2), fmt_number(row['accuracy_drop'], 2)]
        table.append(values)
    text = format_table(table, headers)
    if labeled:
        text += f"\n\nfloat accuracy: {rows[0]['float_accuracy']:.2f}%"
    return text


def plot_sensitivity(rows, path):
    """Bar plots of the output and layer SQNR per layer (network order), and the accuracy
    drop when measured; written atomically as PNG."""
    labeled = 'accuracy_drop' in rows[0]
    names = [row['layer'] for row in rows]
    panels = [('network output SQNR (dB)', [row['output_sqnr'] for row in rows]),
              ('layer output SQNR (dB)', [row['layer_sqnr'] for row in rows])]
    if labeled:
        panels.append(('accuracy drop (points)', [row['accuracy_drop'] for row in rows]))
    return bar_panels(names, panels, 'Sensitivity: each layer quantized alone', path)
