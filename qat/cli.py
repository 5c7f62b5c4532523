"""The ``qat`` command: each subcommand is one call into the package."""
import argparse
import logging
import os
import sys

from .app import demo, ptq
from .app.models import ModelError
from .app.recipe import RecipeError
from .app.stages import load_run, run_recipe, validation_batches
from .deploy import ExportError, export, format_report, verify

# Errors whose message names the culprit: printed as one line, exit status 2.
USER_ERRORS = (RecipeError, ExportError, ModelError, FileNotFoundError, FileExistsError)


def _train(args):
    results = run_recipe(args.recipe, args.overrides, resume=args.resume)
    return 0 if results.get('verify_passed', True) else 1


def _export(args):
    net, recipe, preprocess = load_run(args.run)
    folder = args.out or os.path.join(args.run, 'export')
    shape = tuple(recipe['export']['input_shape']) or preprocess.input_shape
    paths = export(net, folder, shape, name=args.name or recipe['export']['name'],
                   winograd=args.winograd or recipe['export']['winograd'])
    print('\n'.join(f"{kind:<11} {path}" for kind, path in paths.items()))
    return 0


def _verify(args):
    net, recipe, preprocess = load_run(args.run)
    folder = args.folder or os.path.join(args.run, 'export')
    thresholds = dict(recipe['verify']['thresholds'])
    report = verify(net, folder, validation_batches(recipe, preprocess, args.samples),
                    name=args.name or recipe['export']['name'],
                    report_path=args.report or os.path.join(folder, 'verify.json'),
                    packing=not args.no_packing, threads=args.threads, **thresholds)
    print(format_report(report))
    return 0 if report['passed'] else 1


def _calibrate(args):
    return ptq.run(args) or 0


def _demo(args):
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
    exporting.add_argument('--winograd', help="Winograd policy: off, bound or unsafe "
                           "(default: the recipe's)")

    check = _run_command(commands, 'verify', "run the exported ncnn models on the run's "
                         'validation data and compare with the simulation', _verify)
    check.add_argument('--folder', help='export folder (default: <run>/export)')
    check.add_argument('--samples', type=int, default=0, help='validation images (0: all)')
    check.add_argument('--threads', type=int, default=1, help='ncnn threads')
    check.add_argument('--no-packing', action='store_true',
                       help='ncnn packing layout off (the bit-exact path)')
    check.add_argument('--report', help='JSON report path (default: <folder>/verify.json)')

    calibrating = commands.add_parser('calibrate', help='post-training quantization of a '
                                      'float model from images: table and ncnn int8 model '
                                      '(like ncnn2table + ncnn2int8)')
    ptq.add_arguments(calibrating)
    calibrating.set_defaults(handler=_calibrate)

    demo_command = commands.add_parser('demo', help='float vs simulated int8/int4 on the '
                                       'bundled digits')
    demo_command.add_argument('--model', default='cifar_resnet20_v1', help='GluonCV model name')
    demo_command.add_argument('--size', type=int, default=16, help='input size (pixels)')
    demo_command.add_argument('--epochs', type=int, default=6, help='float training epochs')
    demo_command.add_argument('--seed', type=int, default=0)
    demo_command.add_argument('--folder', default='checkpoints',
                              help='where the float weights are kept (created)')
    demo_command.set_defaults(handler=_demo)
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format='%(levelname)s %(name)s: %(message)s')
    try:
        return args.handler(args)
    except USER_ERRORS as err:
        print(f"qat {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
