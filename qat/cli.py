"""The ``qat`` command: each subcommand is one call into the package."""
import argparse
import logging
import os
import sys

from .app import demo, models, ptq, simulate
from .app.stages import export_options, load_run, run_recipe, verify_run
from .deploy import WINOGRAD_POLICIES, export
from .errors import UserError


def _at_least(low):
    """An argparse type: an integer >= ``low``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value
    return parse


def _train(args):
    results = run_recipe(args.recipe, args.overrides, resume=args.resume)
    return 0 if results.get('verify_passed', True) else 1


def _export(args):
    net, recipe, preprocess = load_run(args.run)
    folder = args.out or os.path.join(args.run, 'export')
    shape = tuple(recipe['export']['input_shape']) or preprocess.input_shape
    paths = export(net, folder, shape, name=args.name or recipe['export']['name'],
                   winograd=args.winograd or recipe['export']['winograd'],
                   **export_options(recipe))
    print('\n'.join(f"{kind:<11} {path}" for kind, path in paths.items()))
    return 0


def _verify(args):
    net, recipe, preprocess = load_run(args.run)
    folder = args.folder or os.path.join(args.run, 'export')
    # the run's own export is judged in <run>/verify.json, as `qat train` writes it; another
    # export folder gets its report beside its files
    default_report = os.path.join(args.run if args.folder is None else folder, 'verify.json')
    report = verify_run(net, recipe, preprocess, folder, args.report or default_report,
                        samples=args.samples, name=args.name, packing=not args.no_packing,
                        threads=args.threads)
    return 0 if report['passed'] else 1


def _calibrate(args):
    return ptq.run(args) or 0


def _simulate(args):
    simulate.run(args)
    return 0


def _demo(args):
    problem = models.name_problem(models.source_of(args.model), args.model)
    if problem:
        raise models.ModelError(f"--model {args.model}: {problem}")
    os.makedirs(args.folder, exist_ok=True)
    demo.run(model=args.model, size=args.size, epochs=args.epochs, seed=args.seed,
             folder=args.folder)
    return 0


def _run_command(commands, name, help_text, handler):
    """A subcommand working on a run folder written by ``qat train``."""
    command = commands.add_parser(name, help=help_text)
    command.add_argument('run', help='run folder (checkpoints/<name>)')
    command.add_argument('--name', help="file name stem (default: the recipe's export.name)")
    command.set_defaults(handler=handler)
    return command


def _parser():
    parser = argparse.ArgumentParser(prog='qat', description='Quantization-aware training for '
                                     'MXNet Gluon, exported to ncnn int8.')
    parser.add_argument('-v', '--verbose', action='store_true', help='debug logging')
    commands = parser.add_subparsers(dest='command', required=True)

    train = commands.add_parser('train', help='run a YAML recipe (float, PTQ, QAT, export, '
                                'verify)')
    train.add_argument('recipe', help='YAML recipe file (see recipes/)')
    train.add_argument('--set', dest='overrides', action='append', default=[],
                       metavar='KEY=VALUE', help='override a recipe key, e.g. qat.epochs=5')
    train.add_argument('--resume', action='store_true',
                       help="continue the run folder's last checkpoint")
    train.set_defaults(handler=_train)

    exporting = _run_command(commands, 'export', 'write Caffe, the ncnn table and ncnn '
                             'fp32/int8 models of a trained run', _export)
    exporting.add_argument('--out', help='output folder (default: <run>/export)')
    exporting.add_argument('--winograd', choices=sorted(WINOGRAD_POLICIES),
                           help="Winograd policy (default: the recipe's)")

    check = _run_command(commands, 'verify', "run the exported ncnn models on the run's "
                         'validation data and compare with the simulation', _verify)
    check.add_argument('--folder', help='export folder (default: <run>/export)')
    check.add_argument('--samples', type=_at_least(0), default=0,
                       help='validation images (0: all)')
    check.add_argument('--threads', type=_at_least(1), default=1, help='ncnn threads')
    check.add_argument('--no-packing', action='store_true',
                       help='ncnn packing layout off (the bit-exact path)')
    check.add_argument('--report', help='JSON report path (default: <run>/verify.json for '
                       "the run's own export, as `qat train` writes it; else <folder>/verify.json)")

    calibrating = commands.add_parser('calibrate', help='post-training quantization of a '
                                      'float model from images: table and ncnn int8 model '
                                      '(like ncnn2table + ncnn2int8)')
    ptq.add_arguments(calibrating)
    calibrating.set_defaults(handler=_calibrate)

    simulating = commands.add_parser('simulate', help='top-1 of a float model over a grid of '
                                     'post-training quantization schemes (bits, granularity, '
                                     'signed input, BN, first layer, method)')
    simulate.add_arguments(simulating)
    simulating.set_defaults(handler=_simulate)

    demo_command = commands.add_parser('demo', help='float vs simulated int8/int4 on the '
                                       'bundled digits')
    demo_command.add_argument('--model', default='cifar_resnet20_v1', help='GluonCV model name')
    demo_command.add_argument('--size', type=_at_least(1), default=16,
                              help='input size (pixels)')
    demo_command.add_argument('--epochs', type=_at_least(0), default=6,
                              help='float training epochs')
    demo_command.add_argument('--seed', type=int, default=0)
    demo_command.add_argument('--folder', default='checkpoints',
                              help='where the float weights are kept (created)')
    demo_command.set_defaults(handler=_demo)
    return parser


def main(argv=None):
    """Run one subcommand. A UserError (or an OSError: a full disk, a folder that cannot be
    written) is one line on stderr and exit status 2, its traceback only with ``-v``; Ctrl-C
    is status 130 with a hint how to continue."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format='%(levelname)s %(name)s: %(message)s')
    try:
        return args.handler(args)
    except (UserError, OSError) as err:
        if args.verbose:
            raise
        print(f"qat {args.command}: {str(err).strip()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ' (continue with --resume)' if args.command == 'train' else ''
        print(f"qat {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
