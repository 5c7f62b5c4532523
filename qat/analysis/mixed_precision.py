"""Automatic mixed precision: keep the most sensitive layers in higher precision until an
accuracy budget is met (the "search the strategy until the accuracy requirement is met" of
Sophon's auto_cali, with ncnn's mixed precision: a layer without table lines runs fp32).

Greedy, fewest layers first: the layers ranked by ``qat.sensitivity.sensitivity`` (each
layer quantized alone, most damaging first) are promoted one by one, the accuracy of the
whole net is measured after each step (as deployed), and the search stops at the first
step whose drop versus float is within the budget. The net is left in the chosen
configuration, so ``qat.deploy.export`` then writes the mixed-precision ncnn model.
"""
import logging
import math

import numpy as np

from ..batches import labeled_batches
from ..errors import UserError
from ..metrics import top1
from ..modes import deployed, quantized_only
from ..nn import quant_blocks
from ..report import format_table, label_axis, pyplot, save_figure, write_report
from .sensitivity import ranked_layers, sensitivity

log = logging.getLogger(__name__)

PROMOTED_BITS = 8


def _to_float(block):
    """Quantization off: exported as an fp32 layer with no table lines."""
    block.set_mode(quantize=False)


def _to_8_bits(block):
    """8-bit weights and inputs (the input range is kept as calibrated)."""
    block.config = block.config.updated(weight_bits=PROMOTED_BITS, input_bits=PROMOTED_BITS)


# action -> how a sensitive layer is promoted
ACTIONS = {'float': _to_float, 'bits': _to_8_bits}


def _snapshot(block):
    return block.mode['quantize'], block.config


def _restore(block, state):
    block.set_mode(quantize=state[0])
    block.config = state[1]


def accuracy(net, batches, labels):
    """Top-1 accuracy (%) of ``net`` as deployed on NDArray ``batches`` with ``labels``."""
    with deployed(net, imperative=False):
        return 100.0 * top1(np.concatenate([net(x).asnumpy() for x in batches]), labels)


def mixed_precision(net, data, budget, max_layers=None, action='float', ranking=None,
                    max_samples=None, progress=None):
    """Promote the most sensitive layers of ``net`` (converted, calibrated) until its accuracy
    on the labeled ``data`` is within ``budget`` points of float.

    max_layers: at most this many promoted layers (default: all); ranking: layer names most
        sensitive first (default: measured with ``qat.sensitivity.sensitivity`` on ``data``);
        action: a key of ACTIONS ('float': the layer stays fp32; 'bits': 8-bit).
    The net is left in the chosen configuration: the first step within the budget, or, when
    no step meets it, the most accurate step tried (fewest layers on ties), with a warning.
    Returns a dict: ``float_accuracy``, ``budget``, ``action``, ``steps`` (one per number of
    promoted layers: ``layers`` (tuple), ``accuracy``, ``drop``), ``chosen`` (index into
    steps), ``layers`` (the promoted layers), ``met`` (bool), ``total_layers``."""
    if action not in ACTIONS:
        raise UserError(f"unknown mixed-precision action {action!r}; valid: {sorted(ACTIONS)}")
    if not budget >= 0:
        raise UserError(f"accuracy budget must be >= 0 points, got {budget!r}")
    batches, labels = labeled_batches(data, max_samples)
    if labels is None:
        raise UserError("mixed precision needs labeled data: batches of (data, label)")
    blocks = {block.name: block for _, block in quant_blocks(net)}
    if ranking is None:
        pairs = zip(batches, np.split(labels, np.cumsum([len(x) for x in batches])[:-1]))
        ranking = ranked_layers(sensitivity(net, list(pairs), progress=progress))
    unknown = [name for name in ranking if name not in blocks]
    if unknown:
        raise UserError(f"ranking names unknown layers {unknown}; valid: {sorted(blocks)}")
    candidates = [name for name in ranking if blocks[name].mode['quantize']]
    limit = len(candidates) if max_layers is None else min(max_layers, len(candidates))
    with deployed(net, imperative=False):
        with quantized_only(net, ()):
            float_accuracy = accuracy(net, batches, labels)
    originals = {name: _snapshot(blocks[name]) for name in candidates}
    steps = []
    for count in range(limit + 1):
        if count:
            ACTIONS[action](blocks[candidates[count - 1]])
        value = accuracy(net, batches, labels)
        steps.append({'layers': tuple(candidates[:count]), 'accuracy': value,
                      'drop': float_accuracy - value})
        if progress:
            progress(f"mixed precision: {count} layer(s) {action}: accuracy {value:.2f}% "
                     f"(drop {float_accuracy - value:.2f}, budget {budget})")
        if float_accuracy - value <= budget:
            break
    met = steps[-1]['drop'] <= budget
    chosen = len(steps) - 1 if met else max(range(len(steps)),
                                            key=lambda i: (steps[i]['accuracy'], -i))
    for name in candidates[chosen:len(steps) - 1]:
        _restore(blocks[name], originals[name])
    if not met:
        log.warning("accuracy budget %.2f points not met with up to %d promoted layers; "
                    "kept the best step (%d layers, drop %.2f)", budget, limit, chosen,
                    steps[chosen]['drop'])
    return {'float_accuracy': float_accuracy, 'budget': float(budget), 'action': action,
            'steps': steps, 'chosen': chosen, 'layers': list(steps[chosen]['layers']),
            'met': met, 'total_layers': len(blocks)}


def format_mixed_precision(result):
    """Accuracy vs number of promoted layers as a Markdown table (the chosen step marked)."""
    rows = []
    for index, step in enumerate(result['steps']):
        added = step['layers'][-1] if step['layers'] else '(all quantized)'
        rows.append([len(step['layers']), added, f"{step['accuracy']:.2f}",
                     f"{step['drop']:.2f}", '<-' if index == result['chosen'] else ''])
    verb = 'float' if result['action'] == 'float' else f'{PROMOTED_BITS}-bit'
    table = format_table(rows, [f'{verb} layers', 'layer added', 'accuracy (%)',
                                'drop (points)', 'chosen'])
    status = 'met' if result['met'] else 'NOT met'
    return (f"{table}\n\nfloat accuracy {result['float_accuracy']:.2f}%, budget "
            f"{result['budget']:.2f} points: {status} with {len(result['layers'])} of "
            f"{result['total_layers']} layers {verb}")


def plot_mixed_precision(result, path):
    """Accuracy vs number of promoted layers, with the float accuracy and the budget; PNG,
    written atomically."""
    plt = pyplot()
    counts = [len(step['layers']) for step in result['steps']]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(counts, [step['accuracy'] for step in result['steps']], 'o-', label='quantized')
    axis.axhline(result['float_accuracy'], color='k', linestyle='--', label='float')
    axis.axhline(result['float_accuracy'] - result['budget'], color='r', linestyle=':',
                 label='budget')
    chosen = result['steps'][result['chosen']]
    axis.plot([len(chosen['layers'])], [chosen['accuracy']], 's', color='g', label='chosen')
    axis.set_xticks(counts)
    label_axis(axis, 'float layers' if result['action'] == 'float' else 'layers promoted',
               'top-1 accuracy (%)')
    return save_figure(figure, path)


def write_mixed_precision_report(result, folder, name='mixed_precision'):
    """``<name>.md`` and ``<name>.png`` in ``folder`` (atomic). Returns the paths."""
    return write_report(format_mixed_precision(result),
                        lambda path: plot_mixed_precision(result, path), folder, name)


def max_layers_for(net, fraction):
    """The largest number of layers that is at most ``fraction`` of the quantized layers."""
    return int(math.floor(fraction * len(quant_blocks(net)) + 1e-9))
