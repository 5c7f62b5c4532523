"""What a run leaves to look at: TensorBoard scalars (the ``tensorboard`` package's own writer
and protos, no TensorFlow), the final table and the loss / accuracy curves of every stage
(``summary.md``, ``curves.png`` in the run folder)."""
import os
import time

from ..fileio import atomic_write
from ..report import format_table, label_axis, pyplot, save_figure


class Scalars:
    """Scalar summaries in a TensorBoard event folder."""

    def __init__(self, folder, resume_step=None):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self._event, self._summary = event_pb2, summary_pb2
        _after_existing_event_files(folder)
        self._writer = EventFileWriter(folder)
        if resume_step is not None:
            # TensorBoard drops the events of the killed run from this step on.
            self._writer.add_event(event_pb2.Event(
                wall_time=time.time(), step=resume_step,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def add(self, step, values):
        """Write {tag: value} at global ``step``."""
        summary = self._summary.Summary(value=[
            self._summary.Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in values.items()])
        self._writer.add_event(self._event.Event(wall_time=time.time(), step=int(step),
                                                 summary=summary))

    def close(self):
        self._writer.close()


def _after_existing_event_files(folder):
    """Wait until a new event file name (timestamped in whole seconds) sorts after the
    existing ones, since TensorBoard reads the files in name order."""
    os.makedirs(folder, exist_ok=True)
    stamps = [int(name.split('.')[3]) for name in os.listdir(folder)
              if name.startswith('events.out.tfevents.') and name.split('.')[3].isdigit()]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


def scheme_name(section, bits=None):
    """'W8A8' for a recipe's ``quantize`` section (``bits`` replacing both widths)."""
    return f"W{bits or section['weight_bits']}A{bits or section['input_bits']}"


def _pct(value):
    return '-' if value is None else f"{value:.2f}"


def results_table(recipe, results, metric='val top-1'):
    """The final Markdown table of a run's accuracies (``metric``, in %)."""
    q = recipe['quantize']
    rows = [('float32', 'float', _pct(results.get('float')))]
    ptq = results.get('ptq', {})
    order = [scheme_name(q)] + [scheme_name(q, b) for b in recipe['calibrate']['report_bits']]
    # the recipe's order (a resumed run reads the results back from key-sorted JSON)
    rows += [(scheme, 'PTQ (simulated)', _pct(ptq[scheme]))
             for scheme in dict.fromkeys(order) if scheme in ptq]
    if 'qat' in results:
        rows.append((scheme_name(q), f"QAT {recipe['qat']['epochs']} epochs (simulated)",
                     _pct(results['qat'])))
    if results.get('ncnn_decoding') is not None:  # a detector: the export's own decoding
        rows.append((scheme_name(q), "QAT, decoded as ncnn decodes (simulated)",
                     _pct(results['ncnn_decoding'])))
    if results.get('ncnn') is not None:
        rows.append((scheme_name(q), 'ncnn int8 (measured)', _pct(results['ncnn'])))
    return format_table(rows, [recipe['run']['name'], 'method', f'{metric} (%)'])


def plot_curves(history, path, metric='val top-1'):
    """Per training stage, the epoch loss and validation accuracy against the epoch (two
    panels); PNG at ``path``, atomic. Returns the path, or None with no history."""
    if not history:
        return None
    plt = pyplot()
    fig, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    for stage in dict.fromkeys(record['stage'] for record in history):
        records = [r for r in history if r['stage'] == stage]
        epochs = [r['epoch'] for r in records]
        loss_axis.plot(epochs, [r['loss'] for r in records], 'o-', label=stage)
        acc_axis.plot(epochs, [r['accuracy'] for r in records], 'o-', label=stage)
    label_axis(loss_axis, 'epoch', 'training loss')
    label_axis(acc_axis, 'epoch', f'{metric} (%)')
    return save_figure(fig, path)


def write_summary(folder, recipe, state, metric='val top-1'):
    """``summary.md`` (the table, each epoch's figures and the curves) and ``curves.png`` in
    the run folder. Returns the table."""
    table = results_table(recipe, state['results'], metric)
    plot = plot_curves(state['history'], os.path.join(folder, 'curves.png'), metric)
    epochs = format_table(
        [(r['stage'], r['epoch'], f"{r['loss']:.4f}", f"{r['accuracy']:.2f}", f"{r['lr']:.3g}",
          f"{r['seconds']:.1f}") for r in state['history']],
        ['stage', 'epoch', 'loss', f'{metric} (%)', 'lr (last)', 'seconds'])
    parts = [f"# Run {recipe['run']['name']}", '', table, '']
    if state['history']:
        parts += ['## Epochs', '', epochs, '']
    if plot:
        parts += ['![loss and accuracy per epoch](curves.png)', '']
    if 'verify_passed' in state['results']:
        parts += [f"ncnn verify: {'passed' if state['results']['verify_passed'] else 'FAILED'}"
                  " (verify.json)", '']
    atomic_write(os.path.join(folder, 'summary.md'), '\n'.join(parts))
    return table
