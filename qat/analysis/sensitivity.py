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
import math


from ..batches import batches_and_labels
from ..metrics import ErrorStats
from ..modes import check_calibrated, deployed, quantized_only
from ..probes import execution_order, run_with_layer
from ..report import bar_panels, fmt_number, format_table, progress as layer_bar
from .tasks import task_for

log = logging.getLogger(__name__)


# ----- sensitivity ----------------------------------------------------------------------------
def _measure(task, net, batches, reference, labels, block=None):
    """(network output stats vs ``reference``, layer output stats or None, score or None)
    with the current modes; ``block``'s own output is compared with its float output on the
    same input."""
    out_stats, layer_stats, decoded = ErrorStats(), ErrorStats(), []
    for x, ref in zip(batches, reference):
        if block is None:
            compared, result = task.run(net, x)
        else:
            (compared, result), layer_in, layer_out = run_with_layer(net, x, block,
                                                                     forward=task.run)
            block.set_mode(quantize=False)
            layer_stats.add(block(layer_in).asnumpy(), layer_out.asnumpy())
            block.set_mode(quantize=True)
        out_stats.add(ref, compared)
        decoded.append(result)
    score = None if labels is None else task.score(decoded, labels)
    return out_stats, layer_stats if block is not None else None, score


def sensitivity(net, data, max_samples=None, progress=None, task=None, groups=None):
    """Quantize each quantized layer of ``net`` alone and measure the damage.

    data: batches (NDArray, or (data, label) tuples: labels add the task's score); at most
    ``max_samples`` samples are used. task: what is compared and scored
    (``qat.analysis.tasks``; default ``task_for(net)``: top-1 for a classifier, the raw head
    outputs and VOC07 mAP for a GluonCV detector). groups: {name: layer names} quantized
    together as one more row each (default the task's: a detector's heads).
    Each layer runs with its own configuration and ranges (calibrate first), every other
    quantized layer float, as deployed (``deployed``).
    Returns one dict per layer in execution order, then one per group: ``layer`` (the group's
    name for a group), ``layers`` (the names quantized), ``bits`` ('W8A8'), ``output_cosine`` /
    ``output_sqnr`` (the compared outputs vs float), ``layer_cosine`` / ``layer_sqnr`` (the
    layer's output vs its float output on the same float input; None for a group),
    ``accuracy`` and ``accuracy_drop`` (the task's score and its drop, points; with labels),
    ``metric`` (the task's name) and ``rank`` (1 = most sensitive: lowest output cosine, then
    largest drop, then network order)."""
    task = task or task_for(net)
    batches, labels = batches_and_labels(data, max_samples)
    order = execution_order(net, batches[0])
    check_calibrated(order)
    groups = task.groups(net) if groups is None else groups
    by_name = {block.name: block for block in order}
    units = [(block.name, (block,)) for block in order] + \
        [(name, tuple(by_name[n] for n in names if n in by_name))
         for name, names in groups.items()]
    with deployed(net):
        with quantized_only(net, ()):
            float_out, decoded = zip(*[task.run(net, x) for x in batches])
        float_score = None if labels is None else task.score(list(decoded), labels)
        rows = []
        for number, (name, blocks) in enumerate(layer_bar(units, label='sensitivity',
                                                          unit='layer'), 1):
            with quantized_only(net, set(blocks)):
                out_stats, layer_stats, score = _measure(
                    task, net, batches, float_out, labels,
                    blocks[0] if len(blocks) == 1 and name == blocks[0].name else None)
            configs = {f"W{b.config.weight_bits}A{b.config.input_bits}" for b in blocks}
            row = {'layer': name, 'layers': tuple(b.name for b in blocks),
                   'bits': '/'.join(sorted(configs)), 'metric': task.name,
                   'output_cosine': out_stats.cosine, 'output_sqnr': out_stats.sqnr,
                   'layer_cosine': None if layer_stats is None else layer_stats.cosine,
                   'layer_sqnr': None if layer_stats is None else layer_stats.sqnr}
            if labels is not None:
                row['accuracy'] = score
                row['accuracy_drop'] = float_score - score
            rows.append(row)
            if progress:
                progress(f"sensitivity {number}/{len(units)} {name}: output cosine "
                         f"{row['output_cosine']:.6f}, SQNR {row['output_sqnr']:.2f} dB")
    ranked = sorted(range(len(rows)), key=lambda i: (rows[i]['output_cosine'],
                                                     -rows[i].get('accuracy_drop', 0.0), i))
    for rank, index in enumerate(ranked, 1):
        rows[index]['rank'] = rank
    for row in rows:
        row['float_accuracy'] = float_score
    return rows


def ranked_layers(rows):
    """Layer (and group) names of ``sensitivity`` rows, most sensitive first."""
    return [row['layer'] for row in sorted(rows, key=lambda row: row['rank'])]


def ranked_units(rows):
    """(name, layer names) of ``sensitivity`` rows, most sensitive first: a layer is one
    unit, a group (a detector's heads) another."""
    return [(row['layer'], row['layers']) for row in sorted(rows, key=lambda r: r['rank'])]


def format_sensitivity(rows):
    """``sensitivity`` rows as a Markdown table (network order)."""
    labeled = 'accuracy' in rows[0]
    headers = ['rank', 'layer', 'bits', 'output cosine', 'output SQNR (dB)', 'layer cosine',
               'layer SQNR (dB)'] + ([f"{rows[0]['metric']} (%)", 'drop (points)']
                                     if labeled else [])
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
        text += f"\n\nfloat {rows[0]['metric']}: {rows[0]['float_accuracy']:.2f}%"
    return text


def plot_sensitivity(rows, path):
    """Bar plots of the output and layer SQNR per layer (network order), and the accuracy
    drop when measured; written atomically as PNG."""
    labeled = 'accuracy_drop' in rows[0]
    names = [row['layer'] for row in rows]
    panels = [('network output SQNR (dB)', [row['output_sqnr'] for row in rows]),
              ('layer output SQNR (dB)', [math.nan if row['layer_sqnr'] is None
                                          else row['layer_sqnr'] for row in rows])]
    if labeled:
        panels.append((f"{rows[0]['metric']} drop (points)",
                       [row['accuracy_drop'] for row in rows]))
    return bar_panels(names, panels, 'Sensitivity: each layer quantized alone', path)
