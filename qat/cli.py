"""The ``qat`` command."""
import argparse
import logging
import sys


def _demo(args):
    from .demo import run
    run(model=args.model, size=args.size, epochs=args.epochs, seed=args.seed)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='qat', description='Quantization-aware training for '
                                     'MXNet Gluon, exported to ncnn int8.')
    parser.add_argument('-v', '--verbose', action='store_true', help='debug logging')
    commands = parser.add_subparsers(dest='command', required=True)
    demo = commands.add_parser('demo', help='float vs simulated int8/int4 on the bundled digits')
    demo.add_argument('--model', default='cifar_resnet20_v1', help='GluonCV model name')
    demo.add_argument('--size', type=int, default=16, help='input size (pixels)')
    demo.add_argument('--epochs', type=int, default=6, help='float training epochs')
    demo.add_argument('--seed', type=int, default=0)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format='%(levelname)s %(name)s: %(message)s')
    args.run(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
