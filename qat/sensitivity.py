"""Layer-wise quantization error analysis: sensitivity per layer and float-vs-int8 comparison.

* ``sensitivity``: each quantized layer quantized *alone* (every other layer float): cosine
  similarity and SQNR of the network output and of the layer's own output against float, and
  the accuracy drop on a labeled set. The layers are ranked most sensitive first.
* ``layer_comparison``: the fully quantized net layer by layer against float, both as
  simulated and as measured with the ncnn int8 model of an export.

Both write a Markdown table and a PNG plot (``write_report``). The metric formulas and the
probes (running a converted net with forward hooks, as deployed) are shared with
``qat.easyquant`` and ``qat.mixed_precision``.
"""
import contextlib
import logging
import math
import os

import numpy as np

from .benchmarks import format_table
from .convert import quant_blocks, temporary_mode, walk
from .data import labeled_batches
from .train import atomic_path, atomic_write

log = logging.getLogger(__name__)


# ----- the formulas ---------------------------------------------------------------------------
def cosine_from_sums(dot, aa, bb):
    """Cosine similarity from its sums, elementwise (float64, any broadcastable shapes):
    ``dot / sqrt(aa * bb)`` with ``dot = <a, b>``, ``aa = |a|^2``, ``bb = |b|^2``; 1 where both
    vectors are zero, 0 where exactly one is."""
    dot, aa, bb = (np.asarray(v, np.float64) for v in (dot, aa, bb))
    denominator = np.sqrt(aa * bb)
    both_zero = (aa == 0) & (bb == 0)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, dot / safe, np.where(both_zero, 1.0, 0.0))


def cosine_similarity(a, b):
    """Per-sample cosine similarity (N,) of two arrays (N, ...), computed in float64."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return cosine_from_sums((a * b).sum(1), (a * a).sum(1), (b * b).sum(1))


def sqnr_db(signal_power, noise_power):
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - test)^2)`` in dB
    from the two sums: +inf without noise, -inf for a zero signal with noise."""
    if noise_power == 0:
        return math.inf
    if signal_power == 0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


class ErrorStats:
    """Streaming comparison of a test tensor with its reference, batch by batch: mean per-sample
    cosine, SQNR over all elements, largest absolute error."""

    def __init__(self):
        self.cosines, self.signal, self.noise, self.max_error = [], 0.0, 0.0, 0.0

    def add(self, reference, test):
        reference = np.asarray(reference, np.float64)
        test = np.asarray(test, np.float64)
        self.cosines.append(cosine_similarity(reference, test))
        self.signal += float((reference ** 2).sum())
        self.noise += float(((reference - test) ** 2).sum())
        self.max_error = max(self.max_error, float(np.abs(reference - test).max(initial=0)))
        return self

    @property
    def cosine(self):
        return float(np.concatenate(self.cosines).mean()) if self.cosines else float('nan')

    @property
    def sqnr(self):
        return sqnr_db(self.signal, self.noise)


# ----- probes: running a converted net as deployed ------------------------------------------
DEPLOYED_FLAGS = {'bn_frozen': True, 'ranges_frozen': True, 'online': False}


@contextlib.contextmanager
def deployed(net, imperative=True):
    """Every quantized block computes what the export runs (BN folded with running
    statistics, the tracked input ranges, no tracker updates); with ``imperative`` the net
    runs block by block so forward hooks fire. Restores only these flags and the
    hybridization: other mode changes made inside (``quantize``) persist."""
    blocks = [block for _, block in quant_blocks(net)]
    if not blocks:
        raise ValueError(f"{net.name} has no quantized blocks: call convert_model first")
    saved = [{flag: block.mode[flag] for flag in DEPLOYED_FLAGS} for block in blocks]
    active = {}
    if imperative:
        active = {b: b._active for b in [net] + [b for *_, b in walk(net)]
                  if hasattr(b, '_active')}
    try:
        for block in blocks:
            block.set_mode(**DEPLOYED_FLAGS)
        for block in active:
            block._active = False
        for block in [net] + [b for *_, b in walk(net)]:
            if hasattr(block, '_clear_cached_op'):
                block._clear_cached_op()
        yield net
    finally:
        for block, flags in zip(blocks, saved):
            block.set_mode(**flags)
        for block, was_active in active.items():
            block._active = was_active
            block._clear_cached_op()
        net._clear_cached_op()


@contextlib.contextmanager
def quantized_only(net, enabled):
    """Quantization on for the blocks in ``enabled`` and off for every other quantized block;
    each block's own ``quantize`` flag is restored afterwards."""
    blocks = [block for _, block in quant_blocks(net)]
    saved = [block.mode['quantize'] for block in blocks]
    try:
        for block in blocks:
            block.set_mode(quantize=block in enabled)
        net._clear_cached_op()
        yield net
    finally:
        for block, flag in zip(blocks, saved):
            block.set_mode(quantize=flag)
        net._clear_cached_op()


class _Captured(Exception):
    """Stops a forward pass once the wanted tensor has been seen."""


def capture(net, x, block, output=False):
    """The input (or, with ``output``, the output) of ``block`` on the first call of the
    block while ``net`` runs on ``x``; the rest of the forward pass is skipped. ``net`` must
    run imperatively (``deployed``)."""
    seen = []

    def pre_hook(_, inputs):
        seen.append(inputs[0])
        raise _Captured

    def post_hook(_, inputs, out):
        seen.append(out)
        raise _Captured

    handle = (block.register_forward_hook(post_hook) if output
              else block.register_forward_pre_hook(pre_hook))
    try:
        net(x)
    except _Captured:
        pass
    finally:
        handle.detach()
    if not seen:
        raise ValueError(f"{block.name} did not run in {net.name}'s forward pass (is the net "
                         f"hybridized outside `deployed`?)")
    return seen[0]


def run_with_layer(net, x, block):
    """(net output, input of ``block``, output of ``block``) for one imperative forward."""
    seen = {}
    handle = block.register_forward_hook(
        lambda _, inputs, out: seen.setdefault('io', (inputs[0], out)))
    try:
        out = net(x)
    finally:
        handle.detach()
    if 'io' not in seen:
        raise ValueError(f"{block.name} did not run in {net.name}'s forward pass")
    return (out,) + seen['io']


def execution_order(net, x):
    """The quantized blocks of ``net`` in the order they first run on ``x`` (blocks that never
    run are left out, with a warning)."""
    order = []
    handles = [block.register_forward_pre_hook(
        lambda b, _: order.append(b) if b not in order else None)
        for _, block in quant_blocks(net)]
    try:
        with deployed(net):
            net(x[:1])
    finally:
        for handle in handles:
            handle.detach()
    unused = [block.name for _, block in quant_blocks(net) if block not in order]
    if unused:
        log.warning("quantized blocks that never ran: %s", unused)
    return order


def check_calibrated(blocks):
    """Raise naming the first block whose input quantization has no range."""
    for block in blocks:
        if block.mode['quantize_input'] and block.input_threshold() is None:
            raise ValueError(f"{block.name}: input range is unset; run qat.calibrate first")


# ----- sensitivity ----------------------------------------------------------------------------
def _accuracy(outputs, labels):
    return 100.0 * float(np.mean(np.concatenate(outputs).argmax(1) == labels))


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
        for number, block in enumerate(order, 1):
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


def _fmt(value, digits):
    if value is None:
        return ''
    if isinstance(value, float) and math.isinf(value):
        return 'inf' if value > 0 else '-inf'
    return f"{value:.{digits}f}"


def format_sensitivity(rows):
    """``sensitivity`` rows as a Markdown table (network order)."""
    labeled = 'accuracy' in rows[0]
    headers = ['rank', 'layer', 'bits', 'output cosine', 'output SQNR (dB)', 'layer cosine',
               'layer SQNR (dB)'] + (['accuracy (%)', 'drop (points)'] if labeled else [])
    table = []
    for row in rows:
        values = [row['rank'], row['layer'], row['bits'], _fmt(row['output_cosine'], 6),
                  _fmt(row['output_sqnr'], 2), _fmt(row['layer_cosine'], 6),
                  _fmt(row['layer_sqnr'], 2)]
        if labeled:
            values += [_fmt(row['accuracy'], 2), _fmt(row['accuracy_drop'], 2)]
        table.append(values)
    text = format_table(table, headers)
    if labeled:
        text += f"\n\nfloat accuracy: {rows[0]['float_accuracy']:.2f}%"
    return text


def _finite(values, fallback):
    return [v if math.isfinite(v) else fallback for v in values]


def plot_sensitivity(rows, path):
    """Bar plots of the output and layer SQNR per layer (network order), and the accuracy
    drop when measured; written atomically as PNG."""
    labeled = 'accuracy_drop' in rows[0]
    names = [row['layer'] for row in rows]
    panels = [('network output SQNR (dB)', [row['output_sqnr'] for row in rows]),
              ('layer output SQNR (dB)', [row['layer_sqnr'] for row in rows])]
    if labeled:
        panels.append(('accuracy drop (points)', [row['accuracy_drop'] for row in rows]))
    return _bar_panels(names, panels, 'Sensitivity: each layer quantized alone', path)


def _bar_panels(names, panels, title, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.35 * len(names) + 2),
                                                         2.6 * len(panels)), sharex=True,
                                squeeze=False)
    positions = np.arange(len(names))
    for axis, (label, values) in zip(axes[:, 0], panels):
        groups = values if isinstance(values, dict) else {None: values}
        width = 0.8 / len(groups)
        for offset, (legend, series_values) in enumerate(groups.items()):
            finite = [v for v in series_values if math.isfinite(v)]
            ceiling = max(finite, default=0.0)
            axis.bar(positions + (offset - (len(groups) - 1) / 2) * width,
                     _finite(series_values, ceiling), width, label=legend)
        if len(groups) > 1:
            axis.legend(fontsize=7)
        axis.set_ylabel(label, fontsize=8)
        axis.grid(axis='y', alpha=0.3)
    axes[-1, 0].set_xticks(positions)
    axes[-1, 0].set_xticklabels(names, rotation=90, fontsize=7)
    axes[0, 0].set_title(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format='png', dpi=100)
    plt.close(figure)
    return path


def write_report(text, plot, folder, name):
    """Write ``<name>.md`` (``text``) and ``<name>.png`` (``plot(path)``) into ``folder``,
    each atomically. Returns {'table': path, 'plot': path}."""
    os.makedirs(folder, exist_ok=True)
    table_path = os.path.join(folder, f"{name}.md")
    atomic_write(table_path, text + '\n')
    plot_path = plot(os.path.join(folder, f"{name}.png"))
    return {'table': table_path, 'plot': plot_path}


# ----- layer by layer: float vs simulated vs ncnn int8 ---------------------------------------
def layer_comparison(net, data, folder, name='model', max_samples=16, threads=1, ncnn=True):
    """Every layer of an export (``qat.deploy.export(net, folder, ..., name)``) against
    float: the simulated quantized net (as deployed) and, with ``ncnn``, the ncnn int8 model
    run by the ncnn runtime (requantized int8 blobs divided by their scale).

    Returns one dict per exported layer (graph order): ``layer``, ``kind``, ``int8``,
    ``sim_cosine``, ``sim_max_error`` and, with ncnn, ``ncnn_cosine``, ``ncnn_max_error``
    (per-sample cosine averaged over the samples; max |float - quantized|)."""
    import json
    from .deploy.export import file_names
    from .deploy.verify import EXACT_OPTIONS, NcnnModel, consumer_scales, simulate
    names = file_names(name)
    manifest_path = os.path.join(folder, names['manifest'])
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"no export manifest {manifest_path}: run qat.deploy.export "
                                f"first")
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    batches, _ = labeled_batches(data, max_samples)
    layers = [layer for layer in manifest['layers']
              if layer['kind'] != 'Input' and layer['source']]
    sources = [layer['source'] for layer in layers]
    with temporary_mode(net, bn_frozen=True, online=False):
        sim = simulate(net, batches, sources)
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
                  _fmt(row['sim_cosine'], 6), f"{row['sim_max_error']:.4g}"]
        if measured:
            values += [_fmt(row['ncnn_cosine'], 6), f"{row['ncnn_max_error']:.4g}"]
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
    return _bar_panels(names, panels, 'Float vs int8, layer by layer', path)
