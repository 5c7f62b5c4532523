"""The GluonCV zoo sweep: one representative of every classification family of
``gluoncv.model_zoo.get_model_list()``, exported to ncnn int8 and verified with the ncnn
runtime.

    python -m benchmarks.zoo [--samples 4] [--repeats 10] [--families name ...]

Each model (``FAMILIES``: the smallest variant of the family at the smallest input it
accepts) gets random weights and randomized BN statistics and is converted and calibrated
('max', random inputs) by ``qat.app.models.calibrated_random``, exported with
``qat.export`` (default Winograd policy) and verified by ``qat.verify`` on ``--samples``
random images, twice:

* packing off (ncnn's exact path): how many int8 layers are bit-identical to the simulation
  (0 code differences, 0 LSB);
* ncnn's default options (packing on): the int8 output's top-1 agreement with the
  simulation, the fraction of its elements within 1 LSB and its max error in LSB; the fp32
  model's max relative error vs the float net.

Latency: the median of ``--repeats`` interleaved single-image runs of the int8 and the fp32
model after 3 warm-up rounds (one thread, ncnn's default options). A model passes when every
int8 layer is exact with packing off, top-1 agreement is 100 %, >= 99.9 % of the output is
within 1 LSB and the fp32 error is <= 1e-4; otherwise the status names the missed criterion,
or the stage (convert, export, verify, latency) that raised and the error's informative line.
Progress goes to stderr, the Markdown table to stdout.
"""
import os
import sys
import tempfile

import mxnet as mx
import numpy as np

from qat.app.models import calibrated_random
from qat.deploy.export import export, file_names, read_manifest
from qat.deploy.verify import NcnnModel, verify
from qat.errors import reason
from qat.report import format_table

from .common import interleaved_medians, parser, stopwatch

# (family, GluonCV model, input size): the smallest variant of every classification family,
# at the smallest square input it runs (fixed-size final pooling: squeezenet 13x13, densenet,
# googlenet, residual attention 7x7, inceptionv3 8x8; alexnet's 3 max pools)
FAMILIES = (
    ('resnet_v1', 'resnet18_v1', 32),
    ('resnet_v2', 'resnet18_v2', 32),
    ('resnet_v1b', 'resnet18_v1b', 32),
    ('resnet_v1b_pruned', 'resnet18_v1b_0.89', 32),
    ('resnet_v1b_groupnorm', 'resnet50_v1b_gn', 32),
    ('resnet_v1c', 'resnet50_v1c', 32),
    ('resnet_v1d', 'resnet50_v1d', 32),
    ('resnet_v1e', 'resnet50_v1e', 32),
    ('resnet_v1s', 'resnet50_v1s', 32),
    ('resnext', 'resnext50_32x4d', 32),
    ('resnext_e', 'resnext101e_64x4d', 32),
    ('se_resnet_v1', 'se_resnet18_v1', 32),
    ('se_resnet_v2', 'se_resnet18_v2', 32),
    ('se_resnext', 'se_resnext50_32x4d', 32),
    ('se_resnext_e', 'se_resnext101e_64x4d', 32),
    ('senet', 'senet_154', 32),
    ('senet_e', 'senet_154e', 32),
    ('resnest', 'resnest14', 32),
    ('mobilenet_v1', 'mobilenet0.25', 32),
    ('mobilenet_v2', 'mobilenetv2_0.25', 32),
    ('mobilenet_v3', 'mobilenetv3_small', 32),
    ('shufflenet_v1', 'shufflenet_v1', 32),
    ('shufflenet_v2', 'shufflenet_v2', 32),
    ('squeezenet', 'squeezenet1.1', 209),
    ('densenet', 'densenet121', 221),
    ('vgg', 'vgg11', 32),
    ('vgg_bn', 'vgg11_bn', 32),
    ('alexnet', 'alexnet', 63),
    ('googlenet', 'googlenet', 223),
    ('inception_v3', 'inceptionv3', 299),
    ('xception', 'xception', 32),
    ('nasnet', 'nasnet_4_1056', 32),
    ('darknet', 'darknet53', 32),
    ('dla', 'dla34', 32),
    ('hrnet', 'hrnet_w18_small_v1_c', 32),
    ('residual_attention', 'residualattentionnet56', 221),
    ('cifar_residual_attention', 'cifar_residualattentionnet56', 32),
    ('cifar_resnet_v1', 'cifar_resnet20_v1', 32),
    ('cifar_resnet_v2', 'cifar_resnet20_v2', 32),
    ('cifar_wide_resnet', 'cifar_wideresnet16_10', 32),
    ('cifar_resnext', 'cifar_resnext29_32x4d', 32),
)


STATUS_CHARS = 160  # an error's line is cut there in the table


def _stderr(message):
    print(message, file=sys.stderr, flush=True)


def _latency(folder, size, repeats):
    """{'int8', 'fp32': median ms} of interleaved single-image runs, ncnn's default options."""
    names = {key: os.path.join(folder, value) for key, value in file_names('model').items()}
    output = read_manifest(folder)['outputs'][0]
    sample = np.random.RandomState(1).normal(0, 1, (3, size, size)).astype(np.float32)
    models = {'int8': NcnnModel(names['int8_param'], names['int8_bin']),
              'fp32': NcnnModel(names['param'], names['bin'])}
    runs = {key: stopwatch(model.run, sample, [output]) for key, model in models.items()}
    # 3 warm-up rounds: ncnn's first runs of a model are slower (memory pools, caches)
    return {key: 1000 * seconds
            for key, seconds in interleaved_medians(runs, repeats, warmup=3).items()}


def _misses(row):
    """The pass criteria that ``row`` misses, one phrase each."""
    misses = []
    if row['exact_layers'] < row['int8_layers']:
        misses.append(f"{row['int8_layers'] - row['exact_layers']} int8 layer(s) not exact "
                      f"with packing off (max {row['exact_max_lsb']:.3g} LSB)")
    if row['top1'] < 1:
        misses.append(f"top-1 agreement {100 * row['top1']:.1f} %")
    if row['within'] < 0.999:
        misses.append(f"{100 * row['within']:.2f} % within 1 LSB")
    if not row['fp32'] <= 1e-4:
        misses.append(f"fp32 relative error {row['fp32']:.2e}")
    return misses


def evaluate(family, name, size, samples=4, repeats=10, progress=_stderr):
    """One row of the sweep: layer counts, verify figures, latency and the status."""
    row = {'family': family, 'model': name, 'size': size}
    data = [mx.nd.array(np.random.RandomState(2).normal(0, 1, (samples, 3, size, size)))]
    stage = 'convert'
    try:
        progress(f"{name} ({size}x{size}): convert and calibrate")
        net = calibrated_random(name, size)
        with tempfile.TemporaryDirectory() as folder:
            stage = 'export'
            progress(f"{name}: export")
            export(net, folder, (3, size, size))
            layers = [layer for layer in read_manifest(folder)['layers']
                      if layer['kind'] != 'Input']
            row.update(layers=len(layers), int8_layers=sum(layer['int8'] for layer in layers))
            stage = 'verify'
            progress(f"{name}: verify, packing off and ncnn's default options")
            exact = verify(net, folder, data, packing=False)
            default = verify(net, folder, data, per_layer=False)
            errors = [layer['max_lsb'] for layer in exact['layers'] if layer['int8']]
            row.update(exact_layers=sum(error == 0 for error in errors),
                       exact_max_lsb=max(errors, default=0),
                       top1=default['int8']['top1_agreement'],
                       within=default['int8']['within_1lsb'],
                       max_lsb=default['int8']['max_lsb'],
                       fp32=default['fp32']['max_relative_error'])
            stage = 'latency'
            progress(f"{name}: latency")
            row['ms'] = _latency(folder, size, repeats)
    except Exception as err:  # noqa: BLE001 -- the sweep records every failure and goes on
        line = reason(err)
        row['status'] = f"{stage}: {type(err).__name__}: " \
            + (line if len(line) <= STATUS_CHARS else line[:STATUS_CHARS - 3] + '...')
        progress(f"{name}: FAILED {row['status']}")
        return row
    misses = _misses(row)
    row['status'] = 'passes' if not misses else 'fails: ' + '; '.join(misses)
    progress(f"{name}: {row['status']}")
    return row


def zoo_sweep(families=FAMILIES, samples=4, repeats=10, progress=_stderr):
    return [evaluate(family, name, size, samples, repeats, progress)
            for family, name, size in families]


def format_zoo_table(rows):
    headers = ['family', 'model', 'input', 'int8 layers / all layers', 'exact (packing off)?',
               'top-1 agreement', 'within 1 LSB', 'max LSB', 'fp32 max rel. error',
               'int8 / fp32 ms', 'status']
    table = []
    for r in rows:
        cells = [r['family'], r['model'], f"{r['size']}x{r['size']}"]
        cells.append(f"{r['int8_layers']}/{r['layers']}" if 'layers' in r else '')
        if 'top1' in r:
            cells += ['yes' if r['exact_layers'] == r['int8_layers'] else
                      f"no: {r['exact_layers']}/{r['int8_layers']} exact, max "
                      f"{r['exact_max_lsb']:.3g} LSB",
                      f"{100 * r['top1']:.1f} %", f"{100 * r['within']:.2f} %",
                      f"{r['max_lsb']:.3g}", f"{r['fp32']:.1e}"]
        else:
            cells += [''] * 5
        cells.append(f"{r['ms']['int8']:.2f} / {r['ms']['fp32']:.2f}" if 'ms' in r else '')
        cells.append(r['status'].replace('|', '\\|'))
        table.append(cells)
    return format_table(table, headers)


def main(argv=None):
    arguments = parser('benchmarks.zoo', __doc__)
    arguments.add_argument('--families', nargs='+', metavar='NAME',
                           help='families (or model names) to run; default: all of FAMILIES')
    arguments.add_argument('--samples', type=int, default=4, help='random images per model')
    arguments.add_argument('--repeats', type=int, default=10,
                           help='interleaved timed runs per model and precision')
    args = arguments.parse_args(argv)
    families = FAMILIES
    if args.families:
        wanted = set(args.families)
        known = {key for entry in FAMILIES for key in entry[:2]}
        unknown = wanted - known
        if unknown:
            arguments.error(f"unknown families {sorted(unknown)}; valid: "
                            f"{', '.join(family for family, _, _ in FAMILIES)}")
        families = [entry for entry in FAMILIES if wanted & set(entry[:2])]
    print(format_zoo_table(zoo_sweep(families, args.samples, args.repeats)))


if __name__ == '__main__':
    main()
