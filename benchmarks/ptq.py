"""Post-training quantization on digits: accuracy per calibration method and bit width,
automatic mixed precision at W4A4, and KL calibration throughput.

    python -m benchmarks.ptq [--model cifar_resnet20_v1] [--size 16] [--epochs 10] [--seed 0]

A float net is trained on the bundled digits (seeded; cached in ``checkpoints/``); the
training split is divided into a training part and a held-out validation part (``VAL_SIZE``
images: calibration, the EasyQuant search sample and the mixed-precision choice), and
accuracies are reported on the digits test split, which none of the choices sees.

* accuracy and SQNR of the test logits per calibration method (every
  ``qat.CALIBRATION_METHODS`` key) and scheme (W8A8, W7A7, W6A6, W4A4, W3A3; the first layer
  kept at 8 bits), and each method's calibration time at W8A8;
* automatic mixed precision at W4A4 (at most ``MAX_FLOAT_FRACTION`` of the layers fp32,
  budget ``BUDGET`` points on the validation part) for every method;
* KL calibration throughput on resnet18_v1 at 224x224 (random weights and images).
"""
import os
import time

import mxnet as mx
import numpy as np

from qat import (CALIBRATION_METHODS, QuantConfig, QuantScheme, calibrate, convert_model,
                 freeze_bn, load_parameters, save_parameters)
from qat.analysis.mixed_precision import max_layers_for, mixed_precision
from qat.app.data import batches, digits
from qat.app.models import build
from qat.app.trainer import evaluate, fit
from qat.metrics import ErrorStats
from qat.report import format_table

from .common import parser

# name -> weight and input bits (W3A3 added below the asked range: digits saturate above it)
SCHEMES = {'W8A8': 8, 'W7A7': 7, 'W6A6': 6, 'W4A4': 4, 'W3A3': 3}
VAL_SIZE = 300
BATCH = 64
BUDGET = 1.0               # points of accuracy vs float, on the validation part
MAX_FLOAT_FRACTION = 0.10  # at most this fraction of the layers kept fp32


def _build(model, seed):
    return build(model, {'classes': 10}, seed=seed)


def splits(size, seed):
    """(train, val, test) numpy (x, y) pairs: digits' test split, and its training split with
    ``VAL_SIZE`` images held out (a fixed permutation from ``seed``)."""
    (x_train, y_train), test = digits(size=size)
    order = np.random.RandomState(seed).permutation(len(y_train))
    val, train = order[:VAL_SIZE], order[VAL_SIZE:]
    return (x_train[train], y_train[train]), (x_train[val], y_train[val]), test


def float_model(model, size, epochs, seed, folder='checkpoints', out=print):
    """The float net trained on the training part, cached in ``folder`` (by model, size,
    epochs and seed). Returns (parameter file, test accuracy)."""
    train, _, test = splits(size, seed)
    # "pre2": digits through the recipes' Preprocess (a cache of the earlier pipeline is not
    # reused)
    path = os.path.join(folder, f"bench-ptq-pre2-{model}-{size}px-{epochs}ep-s{seed}.params")
    net = _build(model, seed)
    net(mx.nd.array(test[0][:1]))
    if os.path.isfile(path):
        load_parameters(net, path)
        out(f"float model loaded from {path}")
    else:
        os.makedirs(folder, exist_ok=True)
        net.hybridize()
        fit(net, train[0], train[1], epochs, seed=seed, progress=out)
        save_parameters(net, path)
    return path, evaluate(net, *test)


def quantized_model(model, params, bits, seed):
    """The float net converted at ``bits`` (first layer 8 bits), BN frozen."""
    net = _build(model, seed)
    load_parameters(net, params)
    convert_model(net, config=QuantScheme(QuantConfig(weight_bits=bits, input_bits=bits),
                                          first_layer_bits=8))
    freeze_bn(net)
    return net


def logits(net, x):
    return np.concatenate([net(b).asnumpy() for b, _ in batches(x, np.zeros(len(x)), 256)])


def method_accuracies(model, params, size, seed, methods=None, schemes=None, out=print):
    """{(scheme, method): (test accuracy (%), SQNR (dB) of the test logits vs float,
    seconds)} of post-training quantization calibrated on the validation part."""
    _, val, test = splits(size, seed)
    calibration = list(batches(*val, BATCH))
    reference = _build(model, seed)
    load_parameters(reference, params)
    reference = logits(reference, test[0])
    results = {}
    for scheme in schemes or SCHEMES:
        for method in methods or CALIBRATION_METHODS:
            net = quantized_model(model, params, SCHEMES[scheme], seed)
            started = time.perf_counter()
            calibrate(net, calibration, method)
            seconds = time.perf_counter() - started
            sqnr = ErrorStats().add(reference, logits(net, test[0])).sqnr
            results[scheme, method] = (evaluate(net, *test), sqnr, seconds)
            out(f"{scheme} {method}: {results[scheme, method][0]:.2f}%, logits SQNR "
                f"{sqnr:.2f} dB ({seconds:.1f} s)")
    return results


def mixed_precision_recovery(model, params, size, seed, scheme='W4A4', methods=None,
                             out=print):
    """Per method at ``scheme``: test accuracy before and after automatic mixed precision
    (chosen on the validation part, at most MAX_FLOAT_FRACTION of the layers fp32).
    Returns {method: (before, after, float layers, budget met on val)}."""
    _, val, test = splits(size, seed)
    calibration = list(batches(*val, BATCH))
    results = {}
    for method in methods or CALIBRATION_METHODS:
        net = quantized_model(model, params, SCHEMES[scheme], seed)
        calibrate(net, calibration, method)
        before = evaluate(net, *test)
        result = mixed_precision(net, calibration, BUDGET,
                                 max_layers=max_layers_for(net, MAX_FLOAT_FRACTION))
        results[method] = (before, evaluate(net, *test), result['layers'], result['met'])
        out(f"{scheme} {method} + mixed precision: {before:.2f}% -> "
            f"{results[method][1]:.2f}% with {result['layers']} float")
    return results


def kl_throughput(model='resnet18_v1', size=224, batch_size=8, num_batches=4, seed=0):
    """(images/s of ``calibrate(method='kl')`` (both passes, histograms and the KL search
    included), its seconds, images/s of one hybridized float forward pass) on a
    random-weight GluonCV net with random images."""
    net = build(model, seed=seed)
    rs = np.random.RandomState(seed)
    data = [mx.nd.array(rs.uniform(-1, 1, (batch_size, 3, size, size)).astype(np.float32))
            for _ in range(num_batches)]
    net.hybridize(static_alloc=True, static_shape=True)
    net(data[0]).wait_to_read()
    started = time.perf_counter()
    for x in data:
        net(x).wait_to_read()
    forward = batch_size * num_batches / (time.perf_counter() - started)
    convert_model(net)
    started = time.perf_counter()
    calibrate(net, data, method='kl', log_every=0)
    seconds = time.perf_counter() - started
    return batch_size * num_batches / seconds, seconds, forward


def report(model='cifar_resnet20_v1', size=16, epochs=10, seed=0, out=print):
    """Run everything and return the Markdown tables (also printed through ``out``)."""
    params, float_accuracy = float_model(model, size, epochs, seed, out=out)
    out(f"float test accuracy {float_accuracy:.2f}%")
    accuracies = method_accuracies(model, params, size, seed, out=out)
    rows = [[method] + [f"{accuracies[scheme, method][0]:.2f}" for scheme in SCHEMES]
            for method in CALIBRATION_METHODS]
    rows.insert(0, ['float'] + [f"{float_accuracy:.2f}"] * len(SCHEMES))
    tables = [f"PTQ top-1 (%) of {model} on digits test ({size}x{size}), calibrated on "
              f"{VAL_SIZE} held-out images, first layer 8-bit\n\n"
              + format_table(rows, ['method'] + list(SCHEMES))]
    rows = [[method] + [f"{accuracies[scheme, method][1]:.2f}" for scheme in SCHEMES]
            + [f"{accuracies['W8A8', method][2]:.1f}"] for method in CALIBRATION_METHODS]
    tables.append("SQNR (dB) of the test logits vs float (higher is better), and the "
                  "calibration time at W8A8\n\n"
                  + format_table(rows, ['method'] + list(SCHEMES) + ['seconds (W8A8)']))
    recovery = mixed_precision_recovery(model, params, size, seed, out=out)
    rows = [[method, f"{before:.2f}", f"{after:.2f}", len(layers), ', '.join(layers) or '-',
             'yes' if met else 'no'] for method, (before, after, layers, met) in recovery.items()]
    tables.append(f"W4A4 automatic mixed precision (budget {BUDGET} point on the held-out "
                  f"images, at most {int(MAX_FLOAT_FRACTION * 100)}% of the layers fp32); "
                  f"float {float_accuracy:.2f}%\n\n"
                  + format_table(rows, ['method', 'W4A4', 'mixed', 'fp32 layers', 'layers',
                                        'budget met (val)']))
    speed, seconds, forward = kl_throughput()
    tables.append("KL calibration throughput (random weights and images)\n\n" + format_table(
        [['resnet18_v1', '224x224', '32 (4 x 8)', f"{seconds:.1f}", f"{speed:.1f}",
          f"{forward:.1f}", f"{speed / forward:.2f}"]],
        ['model', 'input', 'images', 'KL seconds (2 passes)', 'KL images/s',
         'float forward images/s (hybridized)', 'KL / float']))
    for table in tables:
        out('\n' + table)
    return tables


def main(argv=None):
    arguments = parser('benchmarks.ptq', __doc__)
    arguments.add_argument('--model', default='cifar_resnet20_v1', help='GluonCV model name')
    arguments.add_argument('--size', type=int, default=16, help='input size (pixels)')
    arguments.add_argument('--epochs', type=int, default=10, help='float training epochs')
    arguments.add_argument('--seed', type=int, default=0)
    args = arguments.parse_args(argv)
    report(args.model, args.size, args.epochs, args.seed,
           out=lambda line: print(line, flush=True))


if __name__ == '__main__':
    main()
