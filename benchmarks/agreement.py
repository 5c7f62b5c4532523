"""ncnn vs simulation agreement of exported GluonCV models (random init, calibrated).

    python -m benchmarks.agreement [--samples 8] [--models name:size ...]

Each model (random weights and BN statistics, calibrated on random inputs:
``qat.app.models.calibrated_random``) is exported with the default Winograd policy and
verified (``qat.deploy.verify``) on ``--samples`` random images: the fp32 model's max relative
error vs the float net, the int8 model's top-1 agreement and outputs within 1 LSB of the
simulation with ncnn's default packing, and, with packing off (ncnn's exact path), the int8
output's max error and the int8 layers that are bit-exact.
"""
import tempfile

import mxnet as mx
import numpy as np

from qat.app.models import calibrated_random
from qat.deploy.export import export
from qat.deploy.verify import verify

from .common import ZOO, add_models_option, parse_models, parser


def zoo_agreement(models=ZOO, samples=8, progress=print):
    """Rows of verify figures per model: fp32 relative error, int8 top-1 agreement and LSB
    agreement with ncnn's default packing, and the max error with packing off."""
    rows = []
    for name, size in models:
        progress(f"{name} ({size}x{size}): export and verify")
        net = calibrated_random(name, size)
        data = [mx.nd.array(np.random.RandomState(2).normal(0, 1, (samples, 3, size, size)))]
        with tempfile.TemporaryDirectory() as folder:
            export(net, folder, (3, size, size))
            packed = verify(net, folder, data, per_layer=False)
            exact = verify(net, folder, data, packing=False)
        rows.append({'model': f"{name} ({size})", 'fp32': packed['fp32']['max_relative_error'],
                     'top1': packed['int8']['top1_agreement'],
                     'within': packed['int8']['within_1lsb'],
                     'max_lsb': packed['int8']['max_lsb'],
                     'exact_error': exact['int8']['max_abs_error'],
                     'exact_layers': sum(layer['max_lsb'] == 0 for layer in exact['layers']
                                         if layer['int8']),
                     'int8_layers': sum(layer['int8'] for layer in exact['layers'])})
    return rows


def format_agreement_table(rows):
    lines = ["| model (input) | fp32 ncnn vs float, max rel. error | int8 top-1 agreement | "
             "int8 output within 1 LSB | max LSB | packing off: max error | int8 layers "
             "bit-exact |", '|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['model']} | {r['fp32']:.2e} | {100 * r['top1']:.1f} % | "
                     f"{100 * r['within']:.2f} % | {r['max_lsb']:.3g} | {r['exact_error']:.3g} "
                     f"| {r['exact_layers']}/{r['int8_layers']} |")
    return '\n'.join(lines)


def main(argv=None):
    arguments = parser('benchmarks.agreement', __doc__)
    arguments.add_argument('--samples', type=int, default=8, help='random images per model')
    add_models_option(arguments)
    args = arguments.parse_args(argv)
    print(format_agreement_table(zoo_agreement(parse_models(args.models), args.samples)))


if __name__ == '__main__':
    main()
