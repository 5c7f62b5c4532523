"""The post-training tools on a detector: the small SSD of ``recipes/digits_ssd.yaml`` trained
float, then quantized at a narrow width without training.

    python -m benchmarks.detection_ptq [--recipe digits_ssd] [--bits 4] [--budget 2]
                                       [--methods max percentile kl mse]
                                       [--out checkpoints/bench-detection]

Rows, each a VOC07 mAP (%) on the validation canvases: float; PTQ with each calibration
method; the method ``qat.analysis.selection.choose_method`` picks by mAP on held-out
*training* canvases, and the one it picks from unlabeled images (the heads' agreement with
float); then, from the labeled choice, automatic mixed precision
(``qat.analysis.mixed_precision``, layers ranked by ``sensitivity`` with the heads as one
more unit, budget in mAP points on the training canvases) promoting layers to 8 bits and,
separately, to fp32. The float run is resumed when it exists.
"""
import contextlib
import os

import mxnet as mx

from qat.analysis import mixed_precision, selection, sensitivity, tasks
from qat.app import detection, stages
from qat.app.data import Preprocess, epoch_order
from qat.app.recipe import load as load_recipe
from qat.calibration import calibrate
from qat.convert import convert_model
from qat.modes import deployed, quantized_only
from qat.report import format_table

from .common import parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIBRATION = 256  # training canvases calibrated on (8 batches of 32, as the recipe)
TUNING = 256       # further training canvases the tools score on


def _quiet(*args):
    pass


class Setup:
    """The float run of a detection recipe and its data, as the tools take them."""

    def __init__(self, name, out):
        path = os.path.join(ROOT, 'recipes', f'{name}.yaml')
        results = stages.run_recipe(path, [f'run.out={out}', f'run.name={name}-float',
                                           'run.tensorboard=false', 'run.progress=false',
                                           'qat.epochs=0', 'qat.freeze_bn_epoch=null',
                                           'qat.freeze_ranges_epoch=null', 'export.enabled=false',
                                           'calibrate.report_bits=[]'], resume=True,
                                    out=_quiet)
        self.folder = results['folder']
        self.recipe = load_recipe(os.path.join(self.folder, 'recipe.yaml'), check_files=False)
        self.preprocess = Preprocess.from_recipe(self.recipe['preprocess'])
        train = detection.open_split(self.recipe, 'train')
        order = epoch_order(len(train), self.recipe['run']['seed'], 0)
        size = self.recipe['run']['batch_size']

        def batches(first, count):
            return list(detection.detection_batches(train, self.preprocess, size,
                                                    order=order[first:first + count]))
        self.calibration = [x for x, _ in batches(0, CALIBRATION)]
        self.tuning = batches(CALIBRATION, TUNING)
        _, val = detection.validation(self.recipe, self.preprocess)
        self.val = list(val())

    def net(self, bits=None):
        """The float net, converted at ``bits`` (default the recipe's); not calibrated."""
        section = dict(self.recipe['model'],
                       checkpoint=os.path.join(self.folder, 'float.params'))
        net = stages.build_model(section, self.preprocess.input_shape, [mx.cpu()],
                                 self.recipe['run']['seed'])
        convert_model(net, config=stages.quant_scheme(self.recipe['quantize'], bits))
        return net

    def val_map(self, net, quantized=True):
        """VOC07 mAP (%) on the validation canvases, as deployed (``quantized`` False: the
        float net)."""
        task = tasks.Detection(net)
        with deployed(net, imperative=True):
            with contextlib.nullcontext() if quantized else quantized_only(net, ()):
                return task.score([task.run(net, x)[1] for x, _ in self.val],
                                  [y for _, y in self.val])


def detection_ptq(name='digits_ssd', bits=4, budget=2.0, methods=('max', 'percentile', 'kl',
                                                                   'mse'),
                  out='checkpoints/bench-detection', progress=print):
    """The rows of the table: (what, method, layers kept in higher precision, val mAP)."""
    progress(f"{name}: the float run (trained or resumed)")
    setup = Setup(name, out)
    rows = []
    float_net = setup.net(bits)
    rows.append(('float', '', '', setup.val_map(float_net, quantized=False)))
    for method in methods:
        progress(f"PTQ W{bits}A{bits} with {method}")
        net = setup.net(bits)
        calibrate(net, setup.calibration, method)
        rows.append((f'PTQ W{bits}A{bits}', method, '', setup.val_map(net)))
    chosen = {}
    for label, scored in (('labels', setup.tuning), ('no labels', None)):
        progress(f"choose_method ({label})")
        net = setup.net(bits)
        result = selection.choose_method(net, setup.calibration, methods, scored=scored,
                                         max_samples=TUNING)
        chosen[label] = (net, result['chosen'])
        rows.append((f'PTQ W{bits}A{bits}, method chosen by {result["metric"]} on '
                     f'{"training canvases" if scored else "calibration images"}',
                     result['chosen'], '', setup.val_map(net)))
    method = chosen['labels'][1]
    progress("sensitivity")
    net = setup.net(bits)
    calibrate(net, setup.calibration, method)
    ranking = sensitivity.ranked_units(sensitivity.sensitivity(net, setup.tuning))
    for action, verb in (('bits', '8-bit'), ('float', 'fp32')):
        progress(f"mixed precision ({verb})")
        net = setup.net(bits)
        calibrate(net, setup.calibration, method)
        result = mixed_precision.mixed_precision(net, setup.tuning, budget, action=action,
                                                 ranking=[unit for unit, _ in ranking])
        added = [step['added'] for step in result['steps'][1:result['chosen'] + 1]]
        rows.append((f'mixed precision ({verb}, budget {budget:g} mAP points on training '
                     f'canvases{"" if result["met"] else ": NOT met"})', method,
                     f"{len(result['layers'])} of {result['total_layers']}: "
                     f"{', '.join(added) or '-'}", setup.val_map(net)))
    return rows, ranking


def main(argv=None):
    arguments = parser('benchmarks.detection_ptq', __doc__)
    arguments.add_argument('--recipe', default='digits_ssd', help='detection recipe name')
    arguments.add_argument('--bits', type=int, default=4, help='weight and input bits')
    arguments.add_argument('--budget', type=float, default=2.0,
                           help='mixed precision: mAP points below float allowed')
    arguments.add_argument('--methods', nargs='+', default=['max', 'percentile', 'kl', 'mse'],
                           help='calibration methods compared and chosen from')
    arguments.add_argument('--out', default='checkpoints/bench-detection',
                           help='folder of the float run')
    args = arguments.parse_args(argv)
    rows, ranking = detection_ptq(args.recipe, args.bits, args.budget, args.methods, args.out)
    print(format_table([(what, method, kept, f"{value:.2f}")
                        for what, method, kept, value in rows],
                       ['what', 'method', 'layers in higher precision', 'val mAP (%)']))
    print(f"\nsensitivity ranking (most sensitive first): "
          f"{', '.join(unit for unit, _ in ranking)}")


if __name__ == '__main__':
    main()
