"""A small SSD and a small YOLOv3 trained on the digits detection set: VOC07 mAP of float,
PTQ and QAT at W8A8 and W4A4 and of the ncnn int8 model measured in the runtime; int8 / fp32
latency of the exported detectors at their trained size and at larger inputs.

    python -m benchmarks.detection [--recipes digits_ssd digits_yolo3] [--sizes 300 416]
                                   [--out checkpoints/bench-detection] [--repeats 20]
                                   [--threads 1] [--set key=value ...]

Per recipe (``recipes/<name>.yaml``): one run of the recipe as it is (float pre-training,
PTQ at W8A8 and W4A4, QAT at W8A8, export, ncnn verify and the ncnn model's mAP on the whole
validation split, and the QAT net's decoded as ncnn decodes, which it should equal: GluonCV's
own decoding, since YOLOv3 deploys through DetectionOutput too), then one QAT run at W4A4 from
its float parameters (the same QAT schedule).
Latency: the exported model at the trained size, and the QAT W8A8 net exported again at each
``--sizes`` input (same weights and ranges), each timed on one validation canvas, fp32 and
int8 interleaved (median ms). Runs are resumed: a second call reuses finished runs.
"""
import os
import tempfile

import numpy as np

from qat.app.data import Preprocess
from qat.app.detection import open_split
from qat.app.stages import load_run, run_recipe
from qat.deploy import export
from qat.deploy.verify import NcnnModel
from qat.report import format_table

from .common import interleaved_medians, parser, stopwatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ('digits_ssd', 'digits_yolo3')


def _quiet(*args):
    pass


def _runs(name, out, overrides):
    """(results of the recipe's own run, QAT W4A4 mAP from its float parameters)."""
    recipe = os.path.join(ROOT, 'recipes', f'{name}.yaml')
    common = [f'run.out={out}', 'run.tensorboard=false', 'run.progress=false'] + \
        list(overrides)
    main = run_recipe(recipe, common + [f'run.name={name}', 'calibrate.report_bits=[4]'],
                      resume=True, out=_quiet)
    w4 = run_recipe(recipe, common + [
        f'run.name={name}-w4a4', 'float.epochs=0', 'export.enabled=false',
        f"model.checkpoint={os.path.join(main['folder'], 'float.params')}",
        'quantize.weight_bits=4', 'quantize.input_bits=4', 'calibrate.report_bits=[]'],
        resume=True, out=_quiet)
    return main, w4['qat']


def _latency(paths, sample, threads, repeats):
    """{'fp32': ms, 'int8': ms}: medians of interleaved single-image runs."""
    models = {'fp32': NcnnModel(paths['param'], paths['bin'], threads),
              'int8': NcnnModel(paths['int8_param'], paths['int8_bin'], threads)}
    runs = {key: stopwatch(model.run, sample, ['detection_out'])
            for key, model in models.items()}
    return {key: 1000 * seconds
            for key, seconds in interleaved_medians(runs, repeats, warmup=1).items()}


def _sample(recipe, preprocess, size):
    """The first validation canvas as the network input of ``size`` pixels."""
    image, _ = open_split(recipe, 'val').item(0)
    shaped = Preprocess((size, size), preprocess.channels, preprocess.mean, preprocess.std,
                        preprocess.pixel)
    return shaped([image])[0]


def latencies(folder, sizes, threads, repeats):
    """[(input size, {'fp32': ms, 'int8': ms})]: the run's own export, then the QAT net
    exported at each of ``sizes``."""
    net, recipe, preprocess = load_run(folder, task='detection')
    trained = preprocess.size[0]
    options = {'confidence_threshold': recipe['detection']['confidence_threshold']}
    name = recipe['export']['name']
    own = {key: os.path.join(folder, 'export', f'{name}{suffix}') for key, suffix in
           (('param', '.param'), ('bin', '.bin'), ('int8_param', '-int8.param'),
            ('int8_bin', '-int8.bin'))}
    rows = [(trained, _latency(own, _sample(recipe, preprocess, trained), threads, repeats))]
    with tempfile.TemporaryDirectory() as temporary:
        for size in sizes:
            paths = export(net, os.path.join(temporary, str(size)), (3, size, size),
                           detection=options)
            rows.append((size, _latency(paths, _sample(recipe, preprocess, size), threads,
                                        repeats)))
    return rows


def detection_benchmark(recipes=RECIPES, sizes=(300, 416), out='checkpoints/bench-detection',
                        repeats=20, threads=1, overrides=(), progress=print):
    """Rows per recipe: {name, float, ptq {W8A8, W4A4}, qat {W8A8, W4A4}, ncnn,
    ncnn_decoding (QAT W8A8 simulated, decoded as ncnn decodes), verify, latency [(size,
    {fp32, int8})]}."""
    rows = []
    for name in recipes:
        progress(f"{name}: training (or resuming) the W8A8 and W4A4 runs")
        main, qat4 = _runs(name, out, overrides)
        progress(f"{name}: timing the exported detector")
        rows.append({'name': name, 'float': main['float'], 'ptq': main['ptq'],
                     'qat': {'W8A8': main['qat'], 'W4A4': qat4}, 'ncnn': main['ncnn'],
                     'ncnn_decoding': main['ncnn_decoding'],
                     'verify': main['verify_passed'],
                     'latency': latencies(main['folder'], sizes, threads, repeats)})
    return rows


def _f(value):
    return '-' if value is None or np.isnan(value) else f"{value:.2f}"


def format_tables(rows, threads):
    accuracy = format_table(
        [(r['name'], _f(r['float']), _f(r['ptq']['W8A8']), _f(r['qat']['W8A8']),
          _f(r['ncnn_decoding']), _f(r['ncnn']), _f(r['ptq']['W4A4']), _f(r['qat']['W4A4']),
          'passed' if r['verify'] else 'FAILED') for r in rows],
        ['recipe', 'float', 'PTQ W8A8', 'QAT W8A8', 'QAT W8A8, ncnn decoding (sim.)',
         'ncnn int8 (measured)', 'PTQ W4A4', 'QAT W4A4', 'ncnn verify'])
    latency = format_table(
        [(r['name'], f"{size}x{size}", f"{ms['fp32']:.2f}", f"{ms['int8']:.2f}",
          f"{ms['fp32'] / ms['int8']:.2f}x") for r in rows for size, ms in r['latency']],
        ['recipe', 'input', f'fp32 ms ({threads} thread)', 'int8 ms', 'int8 speed-up'])
    return f"VOC07 mAP (%) on the validation canvases\n\n{accuracy}\n\n" \
        f"ncnn latency (median of interleaved single-image runs)\n\n{latency}"


def main(argv=None):
    arguments = parser('benchmarks.detection', __doc__)
    arguments.add_argument('--recipes', nargs='+', default=list(RECIPES),
                           help='recipe names in recipes/')
    arguments.add_argument('--sizes', nargs='*', type=int, default=[300, 416],
                           help='extra input sizes timed')
    arguments.add_argument('--out', default='checkpoints/bench-detection',
                           help='folder of the runs')
    arguments.add_argument('--repeats', type=int, default=20, help='timed rounds')
    arguments.add_argument('--threads', type=int, default=1, help='ncnn threads')
    arguments.add_argument('--set', nargs='*', default=[], dest='overrides',
                           help='recipe overrides key=value for every run')
    args = arguments.parse_args(argv)
    rows = detection_benchmark(args.recipes, args.sizes, args.out, args.repeats, args.threads,
                               args.overrides)
    print(format_tables(rows, args.threads))


if __name__ == '__main__':
    main()
