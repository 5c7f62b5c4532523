"""Automatic mixed precision: keep the most sensitive layers in higher precision until a
budget on the task's score is met (the "search the strategy until the accuracy requirement
is met" of Sophon's auto_cali, with ncnn's mixed precision: a layer without table lines runs
fp32).

Greedy, fewest layers first: the layers ranked by ``qat.analysis.sensitivity.sensitivity``
(each layer quantized alone, most damaging first; a detector's heads also as one group) are
promoted one by one, the score of the whole net is measured after each step (as deployed:
top-1, VOC07 mAP, or without labels the agreement with float, ``qat.analysis.tasks``), and
the search stops at the first step whose drop versus float is within the budget. The net is
left in the chosen configuration, so ``qat.deploy.export`` then writes the mixed-precision
ncnn model.
"""
import logging
import math

from ..batches import batches_and_labels
from ..errors import UserError
from ..modes import deployed, quantized_only
from ..nn import quant_blocks
from ..report import format_table, label_axis, pyplot, save_figure, write_report
from .sensitivity import ranked_units, sensitivity
from .tasks import scorer, task_for

log = logging.getLogger(__name__)

PROMOTED_BITS = 8


def _to_float(block):
    """Quantization off: exported as an fp32 layer with no table lines."""
    block.set_mode(quantize=False)


def _to_8_bits(block):
    """8-bit weights and inputs (the input range is kept as calibrated), signed: unsigned
    8-bit codes would not fit ncnn's int8 (the range of a >= 0 input is the same)."""
    block.config = block.config.updated(weight_bits=PROMOTED_BITS, input_bits=PROMOTED_BITS,
                                        input_signed=True)


# action -> how a sensitive layer is promoted
ACTIONS = {'float': _to_float, 'bits': _to_8_bits}


def _snapshot(block):
    return block.mode['quantize'], block.config


def _restore(block, state):
    block.set_mode(quantize=state[0])
    block.config = state[1]


def mixed_precision(net, data, budget, max_layers=None, action='float', ranking=None,
                    max_samples=None, progress=None, task=None):
    """Promote the most sensitive layers of ``net`` (converted, calibrated) until its score
    on ``data`` is within ``budget`` points of float.

    task: what is scored (``qat.analysis.tasks``; default ``task_for(net)``): top-1 for a
        classifier, VOC07 mAP for a GluonCV detector, with labeled batches; without labels,
        the agreement with float of the compared outputs (a detector's raw heads), 100 x
        cosine (float = 100).
    max_layers: at most this many promoted layers (default: all); ranking: names most
        sensitive first, of layers or of the task's groups (a detector's 'heads', promoted
        together) (default: measured with ``qat.analysis.sensitivity.sensitivity`` on
        ``data``); action: a key of ACTIONS ('float': the layer stays fp32; 'bits': 8-bit).
    The net is left in the chosen configuration: the first step within the budget, or, when
    no step meets it, the best step tried (fewest layers on ties), with a warning.
    Returns a dict: ``metric``, ``float_accuracy`` (the float score), ``budget``, ``action``,
    ``steps`` (``added``: the layer or group promoted, ``layers``: every promoted layer
    (tuple), ``accuracy``: the score, ``drop``), ``chosen`` (index into steps), ``layers``
    (the promoted layers), ``met`` (bool), ``total_layers``."""
    if action not in ACTIONS:
        raise UserError(f"unknown mixed-precision action {action!r}; valid: {sorted(ACTIONS)}")
    if not budget >= 0:
        raise UserError(f"accuracy budget must be >= 0 points, got {budget!r}")
    task = task or task_for(net)
    batches, labels = batches_and_labels(data, max_samples)
    blocks = {block.name: block for _, block in quant_blocks(net)}
    groups = task.groups(net)
    if ranking is None:
        data = batches if labels is None else list(zip(batches, labels))
        units = ranked_units(sensitivity(net, data, task=task, groups=groups,
                                         progress=progress))
    else:
        unknown = [name for name in ranking if name not in blocks and name not in groups]
        if unknown:
            raise UserError(f"ranking names unknown layers {unknown}; valid: "
                            f"{sorted(blocks) + sorted(groups)}")
        units = [(name, groups.get(name, (name,))) for name in ranking]
    limit = len(blocks) if max_layers is None else max_layers
    promoted, plan = [], []
    for name, layers in units:  # (what is already promoted or fp32 is not a step)
        new = [n for n in layers if n in blocks and blocks[n].mode['quantize']
               and n not in promoted]
        if new and len(promoted) + len(new) <= limit:
            promoted += new
            plan.append((name, tuple(new)))
    with deployed(net, imperative=task.imperative):
        metric, score = scorer(task, net, batches, labels)
        with quantized_only(net, ()):
            float_score = score()
        originals = {n: _snapshot(blocks[n]) for n in promoted}
        steps = []
        for count in range(len(plan) + 1):
            if count:
                for layer in plan[count - 1][1]:
                    ACTIONS[action](blocks[layer])
            value = score()
            steps.append({'added': plan[count - 1][0] if count else None,
                          'layers': tuple(n for _, new in plan[:count] for n in new),
                          'accuracy': value, 'drop': float_score - value})
            if progress:
                progress(f"mixed precision: {len(steps[-1]['layers'])} layer(s) {action}: "
                         f"{metric} {value:.2f} (drop {float_score - value:.2f}, budget "
                         f"{budget})")
            if float_score - value <= budget:
                break
    met = steps[-1]['drop'] <= budget
    chosen = len(steps) - 1 if met else max(range(len(steps)),
                                            key=lambda i: (steps[i]['accuracy'], -i))
    for name in steps[-1]['layers'][len(steps[chosen]['layers']):]:
        _restore(blocks[name], originals[name])
    if not met:
        log.warning("budget %.2f points not met with up to %d promoted layers; kept the best "
                    "step (%d layers, drop %.2f)", budget, limit,
                    len(steps[chosen]['layers']), steps[chosen]['drop'])
    return {'metric': metric, 'float_accuracy': float_score, 'budget': float(budget),
            'action': action, 'steps': steps, 'chosen': chosen,
            'layers': list(steps[chosen]['layers']), 'met': met, 'total_layers': len(blocks)}


def format_mixed_precision(result):
    """The score vs number of promoted layers as a Markdown table (the chosen step marked)."""
    rows = []
    for index, step in enumerate(result['steps']):
        added = step['added'] or '(all quantized)'
        rows.append([len(step['layers']), added, f"{step['accuracy']:.2f}",
                     f"{step['drop']:.2f}", '<-' if index == result['chosen'] else ''])
    verb = 'float' if result['action'] == 'float' else f'{PROMOTED_BITS}-bit'
    table = format_table(rows, [f'{verb} layers', 'layer added', result['metric'],
                                'drop (points)', 'chosen'])
    status = 'met' if result['met'] else 'NOT met'
    return (f"{table}\n\nfloat {result['metric']} {result['float_accuracy']:.2f}, budget "
            f"{result['budget']:.2f} points: {status} with {len(result['layers'])} of "
            f"{result['total_layers']} layers {verb}")


def plot_mixed_precision(result, path):
    """The score vs number of promoted layers, with the float score and the budget; PNG,
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
               result['metric'])
    return save_figure(figure, path)


def write_mixed_precision_report(result, folder, name='mixed_precision'):
    """``<name>.md`` and ``<name>.png`` in ``folder`` (atomic). Returns the paths."""
    return write_report(format_mixed_precision(result),
                        lambda path: plot_mixed_precision(result, path), folder, name)


def max_layers_for(net, fraction):
    """The largest number of layers that is at most ``fraction`` of the quantized layers."""
    return int(math.floor(fraction * len(quant_blocks(net)) + 1e-9))
