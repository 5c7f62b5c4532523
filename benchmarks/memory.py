"""Peak memory: the ncnn runtime with the fp32 and the int8 model, and a float vs a QAT
training step.

    python -m benchmarks.memory [--repeats 3] [--threads 1] [--models name:size ...]
                                [--train-model cifar_resnet20_v1:32] [--batch 64]

Each figure is measured in a fresh process: after the imports (and, for training, after the
net is built), the process resets its peak resident set (``/proc/self/clear_refs``, Linux)
and the figure is the peak reached from there minus the resident set at that point. ncnn:
load the model and run one image (ncnn's default options except the thread count). Training:
5 SGD steps of the hybridized net (float, or converted and calibrated) on random data, so the
figure is what the steps add (activations, gradients, workspace). Median of ``--repeats``
processes, min and max alongside.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

from .common import add_models_option, parse_models, parser

MODELS = (('resnet18_v1', 224), ('mobilenet1.0', 224), ('mobilenetv2_1.0', 224),
          ('squeezenet1.1', 224))


def _status_mb(field):
    with open('/proc/self/status') as handle:
        line = next(line for line in handle if line.startswith(field + ':'))
    return int(line.split()[1]) / 1024


def _reset_peak():
    """Reset this process's peak resident set (Linux >= 4.0) and return the current one (MB):
    what follows is measured from here, without the imports' peak."""
    with open('/proc/self/clear_refs', 'w') as handle:
        handle.write('5')
    return _status_mb('VmRSS')


def _peak_since(start):
    return _status_mb('VmHWM') - start


def _child_ncnn(param, binary, size, threads, output):
    import ncnn
    import numpy as np
    sample = np.zeros((3, size, size), np.float32)
    start = _reset_peak()
    net = ncnn.Net()
    net.opt.num_threads = threads
    net.load_param(param)
    net.load_model(binary)
    extractor = net.create_extractor()
    extractor.input('data', ncnn.Mat(sample).clone())
    extractor.extract(output)
    return _peak_since(start)


def _child_train(name, size, batch, quantized):
    import mxnet as mx
    from mxnet import autograd, gluon
    from qat.app.models import build
    import qat
    net = build(name, input_shape=(3, size, size))
    if quantized:
        qat.convert_model(net)
        qat.calibrate(net, [mx.nd.random.normal(shape=(batch, 3, size, size))], method='max')
    net.hybridize(static_alloc=True)
    trainer = gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.01})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    data = mx.nd.random.normal(shape=(batch, 3, size, size))
    label = mx.nd.zeros((batch,))
    mx.nd.waitall()
    start = _reset_peak()
    for _ in range(5):
        with autograd.record():
            loss = loss_fn(net(data), label)
        loss.backward()
        trainer.step(batch)
    mx.nd.waitall()
    return _peak_since(start)


CHILDREN = {'ncnn': _child_ncnn, 'train': _child_train}


def _in_child(kind, *args):
    """Peak MB of ``CHILDREN[kind](*args)`` run in a fresh interpreter."""
    code = (f"import json, sys; from benchmarks.memory import CHILDREN; "
            f"print(json.dumps(CHILDREN[{kind!r}](*json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, '-c', code, json.dumps(args)], check=True,
                         capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return float(out.stdout.strip().splitlines()[-1])


def _figure(kind, repeats, *args):
    """(median, min, max) MB over ``repeats`` fresh processes."""
    values = [_in_child(kind, *args) for _ in range(repeats)]
    return statistics.median(values), min(values), max(values)


def ncnn_memory(models=MODELS, threads=1, repeats=3, progress=print):
    from qat.app.models import calibrated_random
    from qat.deploy.export import export, read_manifest
    rows = []
    for name, size in models:
        progress(f"{name} ({size}): exporting")
        net = calibrated_random(name, size)
        with tempfile.TemporaryDirectory() as folder:
            paths = export(net, folder, (3, size, size))
            output = read_manifest(folder)['outputs'][0]
            progress(f"{name}: measuring")
            row = {'model': f"{name} ({size})"}
            for variant, (param, binary) in (('fp32', (paths['param'], paths['bin'])),
                                             ('int8', (paths['int8_param'],
                                                       paths['int8_bin']))):
                row[variant] = _figure('ncnn', repeats, param, binary, size, threads, output)
            rows.append(row)
    return rows


def train_memory(name, size, batch, repeats=3, progress=print):
    progress(f"{name} ({size}), batch {batch}: float and QAT steps")
    return {'model': f"{name} ({size}), batch {batch}",
            'float': _figure('train', repeats, name, size, batch, False),
            'qat': _figure('train', repeats, name, size, batch, True)}


def _cell(figure):
    median, low, high = figure
    return f"{median:.1f} ({low:.1f}–{high:.1f})"


def format_memory_tables(ncnn_rows, train_row):
    lines = ["| model (input) | fp32 MB | int8 MB | int8/fp32 |", "|---|---|---|---|"]
    for row in ncnn_rows:
        lines.append(f"| {row['model']} | {_cell(row['fp32'])} | {_cell(row['int8'])} | "
                     f"{row['int8'][0] / row['fp32'][0]:.2f} |")
    lines += ['', "| training step | float MB | QAT MB | QAT/float |", "|---|---|---|---|",
              f"| {train_row['model']} | {_cell(train_row['float'])} | "
              f"{_cell(train_row['qat'])} | {train_row['qat'][0] / train_row['float'][0]:.2f} |"]
    return '\n'.join(lines)


def main(argv=None):
    arguments = parser('benchmarks.memory', __doc__)
    arguments.add_argument('--repeats', type=int, default=3, help='fresh processes per figure')
    arguments.add_argument('--threads', type=int, default=1, help='ncnn threads')
    arguments.add_argument('--train-model', default='cifar_resnet20_v1:32', metavar='NAME:SIZE')
    arguments.add_argument('--batch', type=int, default=64, help='training batch size')
    add_models_option(arguments, MODELS)
    args = arguments.parse_args(argv)
    ncnn_rows = ncnn_memory(parse_models(args.models), args.threads, args.repeats)
    (train_name, train_size), = parse_models([args.train_model])
    print(format_memory_tables(ncnn_rows, train_memory(train_name, train_size, args.batch,
                                                       args.repeats)))


if __name__ == '__main__':
    main()
