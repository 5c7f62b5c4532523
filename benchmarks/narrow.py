"""QAT at the narrow widths: float, post-training (best calibration method) and QAT with EMA
ranges and with learned ranges (LSQ) at W8A8 ... W2A2, mean of three seeds, through the
recipe trainer on the bundled digits; and 6-bit vs 8-bit weights on the 3x3 stride-1 convs
(ncnn2table's Winograd rule).

    python -m benchmarks.narrow [--nets resnet20 compact] [--seeds 0 1 2] [--bits 8 4 3 2]
                                [--variants ema lsq lsq-unsigned] [--out checkpoints/bench-narrow]

Nets (``NETS``): ``resnet20`` is ``recipes/digits.yaml`` as it is (cifar_resnet20_v1 at
16x16, 3 QAT epochs, its schedule): the default recipe path, measured the way the earlier
MXNet design was (its figures are the ``EARLIER`` row); ``compact`` is mobilenet0.25 at 32x32,
where post-training W4A4 already loses points, with a longer QAT (``QAT_SETTINGS``: 40
epochs, distillation from the float net at T = 4) that starts from the float net with its
depthwise-conv inputs range-equalized (``EQUALIZE``, ``qat.equalize``: the same function,
its top-1 is the ``float, equalized`` row). The QAT variants (``VARIANTS``) differ only in
the range settings; ``recipes/digits.yaml``'s default (``auto``, unsigned after ReLU) is LSQ
with unsigned codes after ReLUs at 4 bits and below, EMA above (``DEFAULT``); the compact net's
runs are signed unless the variant says otherwise. PTQ is the best of ``PTQ_METHODS`` per width (``qat simulate`` on the float
run, and on the equalized float net). Runs are resumed: a second call reuses finished runs
(in ``--out``) and continues killed ones.
"""
import math
import os

import mxnet as mx

from qat.app.checks import open_splits
from qat.app.data import Preprocess
from qat.app.recipe import load as load_recipe
from qat.app.simulate import simulate
from qat.app.stages import build_model, calibration_batches, validation_batches
from qat.equalize import equalize_depthwise_inputs
from qat.metrics import accuracy
from qat.config import AUTO_LSQ_BITS
from qat.report import format_table

from .accuracy import BENCH_RECIPE, common_overrides, float_run, mean_table, qat_run
from .common import parser

# name -> recipe overrides of its float and QAT runs
NETS = {
    'resnet20': [],
    'compact': ['model.name=mobilenet0.25', 'preprocess.size=[32,32]', 'float.epochs=15',
                'qat.epochs=15', 'qat.lr=0.01', 'qat.freeze_bn_epoch=0',
                'qat.freeze_ranges_epoch=null', 'quantize.unsigned_after_relu=false'],
}
# net -> recipe overrides of its QAT runs only (the float runs stay the ones above). On the
# compact net (seed 0, W3A3, LSQ; one run each) 40 epochs instead of 15 gained 1.7 points,
# distillation at T = 4 4.7 (at T = 1 nothing), both with equalized inputs 5.6; see the README.
QAT_SETTINGS = {
    'resnet20': [],
    'compact': ['qat.epochs=40', 'qat.distill=4'],
}
# nets whose QAT (and the second PTQ row) starts from the float net with equalized depthwise
# inputs (qat.equalize): one input channel of a depthwise conv of mobilenet0.25 ranges 14x
# the median channel in seed 2, and its W3A3 QAT stayed at 22 % without it (90 % with).
EQUALIZE = {'compact'}
# QAT variant -> (tag of its runs, its range settings, the most bits it changes anything at)
VARIANTS = {
    'QAT, EMA ranges': ('ema', ['quantize.range_tracker=ema', 'calibrate.method=ema',
                                'quantize.unsigned_after_relu=false'], 8),
    'QAT, LSQ': ('lsq', ['quantize.range_tracker=lsq', 'calibrate.method=mse',
                         'quantize.unsigned_after_relu=false'], 8),
    # unsigned codes are for 7 bits or fewer (8-bit unsigned codes do not fit int8)
    'QAT, LSQ, unsigned after ReLU': ('lsq-unsigned', [
        'quantize.range_tracker=lsq', 'calibrate.method=mse',
        'quantize.unsigned_after_relu=true'], 7),
}
TAGS = [tag for tag, *_ in VARIANTS.values()]
# digits.yaml's default (range_tracker 'auto', mse calibration, unsigned after ReLU) at each
# width: LSQ (and unsigned codes after ReLUs) up to
# AUTO_LSQ_BITS, EMA tracking (from the mse start) above.
DEFAULT = {bits: 'QAT, LSQ, unsigned after ReLU' if bits <= AUTO_LSQ_BITS
           else 'QAT, EMA ranges' for bits in range(2, 9)}
PTQ_METHODS = ('ema', 'kl', 'mse', 'percentile', 'aciq')
# The earlier MXNet design on digits / resnet20 at 16x16, 3 QAT epochs, mean of 3 seeds
# (issue 15's table: its PTQ / QAT).
EARLIER = {4: (99.07, 98.89), 3: (97.12, 98.51), 2: (20.4, 24.2)}


def best_ptq(folder, bits, params=None):
    """{bits: (top-1, method)} of the best calibration method per width (of the float
    parameters ``params``, default the run's)."""
    rows = simulate(folder, {'bits': [str(b) for b in bits], 'method': list(PTQ_METHODS)},
                    params=params, out=lambda *a: None, show_progress=False)[1:]
    best = {}
    for row in rows:
        b = row['weight_bits']
        if b not in best or row['top1'] > best[b][0]:
            best[b] = (row['top1'], row['method'])
    return best


def equalized_float(folder, path):
    """Write the float net of the run ``folder`` with its depthwise inputs equalized
    (``qat.equalize``, from the run's calibration batches) to ``path`` (kept when it exists).
    Returns its validation top-1 (the float net's: the same function)."""
    recipe = load_recipe(os.path.join(folder, 'recipe.yaml'), check_files=False)
    preprocess = Preprocess.from_recipe(recipe['preprocess'])
    net = build_model(dict(recipe['model'], checkpoint=os.path.join(folder, 'float.params')),
                      preprocess.input_shape, [mx.cpu()], recipe['run']['seed'])
    if not os.path.exists(path):
        train_set, _ = open_splits(recipe['data'])
        equalize_depthwise_inputs(net, calibration_batches(recipe, train_set, preprocess,
                                                           recipe['run']['seed']))
        net.save_parameters(path + '.tmp')
        os.replace(path + '.tmp', path)
    else:
        net.load_parameters(path)
    return accuracy(net, validation_batches(recipe, preprocess))


def narrow_table(net, seeds, bits, out_dir, variants=TAGS, out=print):
    """(rows {name: [per-seed top-1]}, Markdown table) of one net of ``NETS``, with the QAT
    ``variants`` (tags of ``VARIANTS``)."""
    common = common_overrides(os.path.join(out_dir, net), overrides=NETS[net])
    rows, methods = {}, {}
    for seed in seeds:
        base = float_run(BENCH_RECIPE, common, seed)
        rows.setdefault('float', []).append(base['float'])
        for b, (top1, method) in best_ptq(base['folder'], bits).items():
            rows.setdefault(f'W{b}A{b} PTQ (best method)', []).append(top1)
            methods.setdefault(b, []).append(method)
        qat_extra = list(QAT_SETTINGS[net])
        if net in EQUALIZE:
            path = os.path.join(out_dir, net, f'float-s{seed}-equalized.params')
            rows.setdefault('float, equalized', []).append(equalized_float(base['folder'],
                                                                           path))
            qat_extra.append(f'model.checkpoint={path}')
            for b, (top1, method) in best_ptq(base['folder'], bits, path).items():
                rows.setdefault(f'W{b}A{b} PTQ (best method), equalized', []).append(top1)
        for name, (tag, extra, most_bits) in VARIANTS.items():
            if tag not in variants:
                continue
            for b in [b for b in bits if b <= most_bits]:
                rows.setdefault(f'W{b}A{b} {name}', []).append(
                    qat_run(BENCH_RECIPE, common, base, seed, b, f'qat-{tag}',
                            qat_extra + extra))
        if net == 'resnet20':  # ncnn2table's 6-bit 3x3 weights, with the default QAT
            rows.setdefault('W8A8 QAT (default), 6-bit 3x3 weights', []).append(
                qat_run(BENCH_RECIPE, common, base, seed, 8, 'qat-wino6',
                        ['calibrate.method=mse', 'quantize.winograd_weight_bits=6']))
            rows.setdefault('W8A8 QAT (default), 8-bit weights', []).append(
                qat_run(BENCH_RECIPE, common, base, seed, 8, 'qat-default',
                        ['calibrate.method=mse']))
        out(f"{net} seed {seed}: " + ', '.join(f"{k} {v[-1]:.2f}" for k, v in rows.items()))
    order = ['float', 'float, equalized'] + [f'W{b}A{b} {kind}' for b in bits
                         for kind in ['PTQ (best method)', 'PTQ (best method), equalized']
                         + list(VARIANTS)]
    order = [name for name in order if name in rows]
    ordered = {name: rows[name] for name in order + sorted(set(rows) - set(order))}
    notes = '; '.join(f"W{b}: {', '.join(ms)}" for b, ms in methods.items())
    table = mean_table(ordered, f"{net}, {len(seeds)} seeds")
    if net == 'resnet20':
        table += '\n' + _against_earlier(ordered, [b for b in bits if b in EARLIER])
    return ordered, f"{table}\nbest PTQ methods per seed: {notes}\n"


def _against_earlier(rows, bits):
    """The earlier design's PTQ / QAT next to ours (means), one column per width."""
    def ours(name, b):  # diverged runs (NaN) left out, as in the main table
        values = [v for v in rows[f'W{b}A{b} {name}'] if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan
    table = [['earlier MXNet design'] + [f"{EARLIER[b][0]:.2f} / {EARLIER[b][1]:.2f}"
                                         for b in bits]]
    for name in VARIANTS:
        if f'W{bits[0]}A{bits[0]} {name}' not in rows:
            continue
        table.append([f'ours, {name}'] + [f"{ours('PTQ (best method)', b):.2f} / "
                                          f"{ours(name, b):.2f}" for b in bits])
    if all(f'W{b}A{b} {DEFAULT[b]}' in rows for b in bits):
        table.append(['ours, the recipe defaults'] + [f"{ours('PTQ (best method)', b):.2f} / "
                                                      f"{ours(DEFAULT[b], b):.2f}" for b in bits])
    return format_table(table, ['PTQ / QAT top-1 (%)'] + [f'W{b}A{b}' for b in bits])


def main(argv=None):
    arguments = parser('benchmarks.narrow', __doc__)
    arguments.add_argument('--nets', nargs='+', default=list(NETS), choices=list(NETS))
    arguments.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    arguments.add_argument('--bits', type=int, nargs='+', default=[8, 4, 3, 2])
    arguments.add_argument('--variants', nargs='+', default=TAGS, choices=TAGS,
                           help='QAT range variants to run')
    arguments.add_argument('--out', default='checkpoints/bench-narrow', help='run folders')
    args = arguments.parse_args(argv)
    for net in args.nets:
        print(narrow_table(net, args.seeds, args.bits, args.out, args.variants)[1])


if __name__ == '__main__':
    main()
