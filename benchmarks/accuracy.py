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
import os
import statistics

from qat.app.stages import run_recipe
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


def accuracy_table(seeds=(0, 1, 2), bits=(8, 4, 3, 2), out_dir='checkpoints/bench-accuracy',
                   recipe=BENCH_RECIPE, qat=None, overrides=(), out=print):
    """Mean val top-1 over ``seeds`` of float, PTQ and QAT at W``b``A``b`` for each of ``bits``
    (per-channel, first layer at 8 bits), on the recipe's data (digits). Per seed: one float
    run (which also measures PTQ at every width), then one QAT run per width starting from its
    float parameters. ``qat``: {recipe key: value} of the QAT schedule (default BENCH_QAT).
    Runs are resumed, so a second call reuses finished runs and continues killed ones.
    Returns (rows {name: [per-seed accuracy]}, Markdown table)."""
    qat = dict(BENCH_QAT, **(qat or {}))
    # Later overrides win: the bench's settings, then the caller's, then each run's own.
    common = ['export.enabled=false', 'run.tensorboard=false', 'run.progress=false',
              f'run.out={out_dir}', 'quantize.weight_granularity=channel',
              'quantize.first_layer_bits=8'] + [f'{k}={v}' for k, v in qat.items()] \
        + list(overrides)
    rows = {}
    for seed in seeds:
        base = run_recipe(recipe, common + [
            f'run.name=float-s{seed}', f'run.seed={seed}', 'qat.epochs=0',
            'qat.freeze_bn_epoch=null', 'qat.freeze_ranges_epoch=null',
            f'calibrate.report_bits={list(bits)}'], resume=True, out=_quiet)
        rows.setdefault('float', []).append(base['float'])
        for b in bits:
            rows.setdefault(f'W{b}A{b} PTQ', []).append(base['ptq'][f'W{b}A{b}'])
        for b in bits:
            result = run_recipe(recipe, common + [
                f'run.name=qat-w{b}-s{seed}', f'run.seed={seed}', 'float.epochs=0',
                f"model.checkpoint={os.path.join(base['folder'], 'float.params')}",
                f'quantize.weight_bits={b}', f'quantize.input_bits={b}',
                'calibrate.report_bits=[]'], resume=True, out=_quiet)
            rows.setdefault(f'W{b}A{b} QAT', []).append(result['qat'])
        out(f"seed {seed}: " + ', '.join(f"{k} {v[-1]:.2f}" for k, v in rows.items()))
    float_mean = statistics.mean(rows['float'])
    table = []
    for name, values in rows.items():
        mean = statistics.mean(values)
        table.append((name, f"{mean:.2f}", f"{mean - float_mean:+.2f}",
                      ' / '.join(f"{v:.2f}" for v in values)))
    headers = [f"digits, {len(seeds)} seeds", 'mean top-1 (%)', 'vs float', 'per seed']
    return rows, format_table(table, headers)


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
