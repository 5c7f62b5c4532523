"""The calibration method that serves the net best: each candidate calibrates the net in
turn from the same starting state, the quantized net (as deployed) is scored on the same
samples, and the best candidate's calibration is kept.

The score is the task's (``qat.analysis.tasks``: top-1, a detector's VOC07 mAP) with labeled
data, else the agreement with float of the compared outputs (a detector's raw heads), so
that a calibration can be chosen from unlabeled images alone.
"""
from ..batches import batches_and_labels
from ..calibration import calibrate
from ..errors import UserError
from ..modes import deployed
from ..report import format_table
from .tasks import scorer, task_for

SCORED_SAMPLES = 64  # default samples scored per candidate


def _state(net):
    return {name: [a.copy() for a in param.list_data()]
            for name, param in net.collect_params().items() if param._data is not None}


def _restore(net, state):
    params = net.collect_params()
    for name, arrays in state.items():
        for target, value in zip(params[name].list_data(), arrays):
            value.copyto(target)


def choose_method(net, data, methods, scored=None, max_samples=SCORED_SAMPLES, task=None,
                  progress=None, **options):
    """Calibrate ``net`` with each of ``methods`` (keys of ``qat.calibration.METHODS``) on
    ``data``, score each result on ``scored`` (default: the first ``max_samples`` samples
    of ``data``), and leave ``net`` calibrated with the best (the first on ties).

    options: ``qat.calibrate``'s keyword arguments (``num_batches``, a method's options).
    Returns {'metric', 'rows': [{'method', 'score'}] in the order tried, 'chosen'}."""
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise UserError("choose_method: no calibration method to choose from")
    task = task or task_for(net)
    batches, labels = batches_and_labels(data if scored is None else scored, max_samples)
    start = _state(net)
    rows = []
    for number, method in enumerate(methods, 1):
        _restore(net, start)
        calibrate(net, data, method, **options)
        with deployed(net, imperative=task.imperative):
            metric, score = scorer(task, net, batches, labels)
            value = score()
        rows.append({'method': method, 'score': value})
        if progress:
            progress(f"method {number}/{len(methods)} {method}: {metric} {value:.4f}")
    best = max(range(len(rows)), key=lambda i: (rows[i]['score'], -i))
    if best != len(rows) - 1:
        _restore(net, start)
        calibrate(net, data, methods[best], **options)
    return {'metric': metric, 'rows': rows, 'chosen': methods[best]}


def format_choice(result):
    """``choose_method``'s result as a Markdown table (the chosen method marked)."""
    rows = [[row['method'], f"{row['score']:.4f}",
             '<-' if row['method'] == result['chosen'] else ''] for row in result['rows']]
    return format_table(rows, ['method', result['metric'], 'chosen'])
