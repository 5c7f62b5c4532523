"""Float vs PTQ vs QAT accuracy on the bundled digits at W8A8 / W4A4 / W3A3 / W2A2 (mean over
three seeds), through the recipe trainer.

    python -m benchmarks.accuracy [--seeds 0 1 2] [--bits 8 4 3 2]
                                  [--out checkpoints/bench-accuracy] [--set key=value ...]

The recipe is ``recipes/digits.yaml`` (cifar_resnet20_v1 at 16x16), per-channel weights, the
first layer at 8 bits, no export. Per seed: one float run (which also measures post-training
quantization, MSE-calibrated, at every width), then one QAT run per width starting from its
float parameters (schedule ``BENCH_QAT``). The table gives the mean validation top-1 per
method and width, its difference to float and the per-seed values. Runs are resumed: a
second call reuses finished runs (in ``--out``) and continues killed ones.
"""
import math
import os
import statistics

from qat.app.stages import run_recipe
from qat.errors import NonFiniteError
from qat.report import format_table

from .common import parser

BENCH_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            'recipes', 'digits.yaml')
# One schedule for every bit width. Ranges and BN statistics are frozen from the start: at 2
# bits, tracked max ranges feed back (each surviving code dequantizes to the range itself, so
# the next layer's range grows) and training diverged; with ranges from MSE calibration and
# BN frozen, every width trains stably.
BENCH_QAT = {'calibrate.method': 'mse', 'qat.epochs': 6, 'qat.lr': 0.01,
             'qat.schedule': 'cosine', 'qat.freeze_bn_epoch': 0, 'qat.freeze_ranges_epoch': 0}


def _quiet(*args):
    pass


def common_overrides(out_dir, qat=None, overrides=()):
    """The recipe overrides of every benchmark run: no export, no logs, per-channel weights,
    first layer at 8 bits, the QAT schedule ``qat`` ({key: value}), then ``overrides``
    (later ones win)."""
    return ['export.enabled=false', 'run.tensorboard=false', 'run.progress=false',
            f'run.out={out_dir}', 'quantize.weight_granularity=channel',
            'quantize.first_layer_bits=8'] + [f'{k}={v}' for k, v in (qat or {}).items()] \
        + list(overrides)


def float_run(recipe, common, seed, bits=(), name='float'):
    """The float run of ``seed`` (QAT off), which also measures PTQ at ``bits``; resumed."""
    return run_recipe(recipe, common + [
        f'run.name={name}-s{seed}', f'run.seed={seed}', 'qat.epochs=0',
        'qat.freeze_bn_epoch=null', 'qat.freeze_ranges_epoch=null',
        f'calibrate.report_bits={list(bits)}'], resume=True, out=_quiet)


def qat_run(recipe, common, base, seed, bits, name, extra=()):
    """A QAT run at W``bits``A``bits`` from the float run ``base``'s weights; resumed.
    Returns its top-1, NaN when training diverged (the trainer stops on a non-finite value)."""
    try:
        return _qat_top1(recipe, common, base, seed, bits, name, extra)
    except NonFiniteError:
        return math.nan


def _qat_top1(recipe, common, base, seed, bits, name, extra):
    return run_recipe(recipe, common + [
        f'run.name={name}-w{bits}-s{seed}', f'run.seed={seed}', 'float.epochs=0',
        f"model.checkpoint={os.path.join(base['folder'], 'float.params')}",
        f'quantize.weight_bits={bits}', f'quantize.input_bits={bits}',
        'calibrate.report_bits=[]'] + list(extra), resume=True, out=_quiet)['qat']


def mean_table(rows, title, reference='float'):
    """Markdown table of {name: [per-seed top-1]}: mean, difference to ``reference``'s mean,
    the per-seed values."""
    base = statistics.mean(rows[reference])
    table = []
    for name, values in rows.items():
        finite = [v for v in values if not math.isnan(v)]
        mean = statistics.mean(finite) if finite else math.nan
        diverged = len(values) - len(finite)
        table.append((name, f"{mean:.2f}" + (f" ({diverged} diverged)" if diverged else ''),
                      f"{mean - base:+.2f}", ' / '.join(
                          'diverged' if math.isnan(v) else f"{v:.2f}" for v in values)))
    return format_table(table, [title, 'mean top-1 (%) of the finished runs',
                                f'vs {reference}', 'per seed'])


def accuracy_table(seeds=(0, 1, 2), bits=(8, 4, 3, 2), out_dir='checkpoints/bench-accuracy',
                   recipe=BENCH_RECIPE, qat=None, overrides=(), out=print):
    """Mean val top-1 over ``seeds`` of float, PTQ and QAT at W``b``A``b`` for each of ``bits``
    (per-channel, first layer at 8 bits), on the recipe's data (digits). Per seed: one float
    run (which also measures PTQ at every width), then one QAT run per width starting from its
    float parameters. ``qat``: {recipe key: value} of the QAT schedule (default BENCH_QAT).
    Runs are resumed, so a second call reuses finished runs and continues killed ones.
    Returns (rows {name: [per-seed accuracy]}, Markdown table)."""
    common = common_overrides(out_dir, dict(BENCH_QAT, **(qat or {})), overrides)
    rows = {}
    for seed in seeds:
        base = float_run(recipe, common, seed, bits)
        rows.setdefault('float', []).append(base['float'])
        for b in bits:
            rows.setdefault(f'W{b}A{b} PTQ', []).append(base['ptq'][f'W{b}A{b}'])
        for b in bits:
            rows.setdefault(f'W{b}A{b} QAT', []).append(qat_run(recipe, common, base, seed, b,
                                                                'qat'))
        out(f"seed {seed}: " + ', '.join(f"{k} {v[-1]:.2f}" for k, v in rows.items()))
    return rows, mean_table(rows, f"digits, {len(seeds)} seeds")


def main(argv=None):
    arguments = parser('benchmarks.accuracy', __doc__)
    arguments.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    arguments.add_argument('--bits', type=int, nargs='+', default=[8, 4, 3, 2])
    arguments.add_argument('--out', default='checkpoints/bench-accuracy', help='run folders')
    arguments.add_argument('--set', dest='overrides', action='append', default=[],
                           metavar='KEY=VALUE', help='recipe override for every run')
    args = arguments.parse_args(argv)
    print(accuracy_table(args.seeds, args.bits, args.out, overrides=args.overrides)[1])


if __name__ == '__main__':
    main()
