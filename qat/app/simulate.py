"""``qat simulate``: post-training quantization of a float model over a grid of schemes, one
top-1 (a detector's VOC07 mAP) per scheme (the earlier MXNet quantization simulator's use
case).

The model, its data and preprocessing come from a recipe (``model``, ``data``,
``preprocess``, ``calibrate``, ``quantize``): a finished run folder (its ``recipe.yaml`` and
``float.params``), or a recipe file with the float weights in ``--params`` (or the recipe's
``model.checkpoint``). Every combination of the grid options (weight / input bits,
granularity, signed input, BN folded or kept, first-layer rule, calibration method) is
converted from the same float weights, calibrated on the recipe's calibration batches (the
ones ``qat train``'s PTQ stage uses, so a row at the recipe's own scheme repeats that stage's
figure), BN and ranges frozen, and evaluated on the validation split.
"""
import itertools
import os
from dataclasses import replace

import mxnet as mx

from ..batches import Reiterable
from ..calibration import METHODS, calibrate
from ..config import BITS
from ..convert import convert_model, first_layer
from ..errors import MissingFileError, UserError
from ..fileio import atomic_write, read_json
from ..metrics import accuracy
from ..modes import freeze_bn, freeze_ranges
from ..report import fmt_number, format_table, hbars, progress
from .data import Preprocess
from .recipe import load as load_recipe
from .checks import open_splits
from . import detection
from .detectors import gluon_backbone
from .stages import build_model, calibration_batches, quant_scheme, validation_batches

BIT_VALUES = tuple(str(b) for b in range(BITS[0], BITS[1] + 1))
FIRST_LAYER = ('recipe', 'same', 'float') + BIT_VALUES
BN_MODES = ('fold', 'keep')
GRANULARITIES = ('channel', 'tensor')
SIGNED = ('yes', 'no', 'after-relu')


def _default(**changes):
    """A grid axis that changes the default QuantConfig of the scheme."""
    def apply(scheme, value, net):
        return replace(scheme, default=scheme.default.updated(
            **{key: convert(value) for key, convert in changes.items()}))
    return apply


def _signed(scheme, value, net):
    """yes / no: every layer's input codes signed / unsigned; after-relu: unsigned where the
    input cannot be negative (``QuantScheme.unsigned_after_relu``), else signed."""
    if value == 'after-relu':
        return replace(scheme, default=scheme.default.updated(input_signed=True),
                       unsigned_after_relu=True)
    return replace(scheme, default=scheme.default.updated(input_signed=value == 'yes'),
                   unsigned_after_relu=False)


def _first_layer(scheme, value, net):
    if value == 'recipe':
        return scheme
    if value == 'same':
        return replace(scheme, first_layer_bits=None)
    if value == 'float':
        return replace(scheme, first_layer_bits=None,
                       by_name={first_layer(net): None, **scheme.by_name})
    return replace(scheme, first_layer_bits=int(value))


# grid option -> (the values it takes, how a value changes the scheme: fn(scheme, value, net));
# the method is no scheme field but the calibration's
AXES = {
    'bits': (BIT_VALUES, _default(weight_bits=int, input_bits=int)),
    'weight_bits': (BIT_VALUES, _default(weight_bits=int)),
    'input_bits': (BIT_VALUES, _default(input_bits=int)),
    'granularity': (GRANULARITIES, _default(weight_granularity=str)),
    'input_signed': (SIGNED, _signed),
    'bn': (BN_MODES, _default(fake_bn=lambda v: v == 'fold')),
    'first_layer': (FIRST_LAYER, _first_layer),
    'method': (tuple(sorted(METHODS)), None),
}
HEADERS = ['scheme', 'W bits', 'A bits', 'granularity', 'signed input', 'BN', 'first layer',
           'method', 'top-1 (%)', 'vs float']


def parse_grid(options):
    """{axis: [values]} from {axis: 'v1,v2' or None}; an unknown value is a UserError naming
    the option."""
    grid = {}
    for axis, text in options.items():
        if text is None:
            continue
        values = [v.strip() for v in str(text).split(',') if v.strip()]
        valid = AXES[axis][0]
        bad = [v for v in values if v not in valid]
        if not values or bad:
            raise UserError(f"--{axis.replace('_', '-')}: {', '.join(bad) or 'nothing'} "
                            f"not valid; valid: {', '.join(valid)}")
        grid[axis] = values
    return grid


def _sources(source, params):
    """(recipe, float params file) of a run folder or a recipe file; a run's recipe takes
    the calibration method its PTQ stage chose (``calibrate.choose_from``)."""
    if os.path.isdir(source):
        recipe_file = os.path.join(source, 'recipe.yaml')
        if not os.path.isfile(recipe_file):
            raise MissingFileError(f"{source} is not a run folder (no recipe.yaml)")
        recipe = load_recipe(recipe_file, check_files=False)
        state = os.path.join(source, 'state.json')
        chosen = read_json(state).get('results', {}).get('calibration_method') \
            if os.path.isfile(state) else None
        if chosen:
            recipe['calibrate']['method'] = chosen
        params = params or os.path.join(source, 'float.params')
    elif os.path.isfile(source):
        recipe = load_recipe(source)
        params = params or recipe['model']['checkpoint']
    else:
        raise MissingFileError(f"{source}: no such run folder or recipe file")
    if not params:
        raise UserError(f"{source}: no float weights: pass --params FILE (the float model's "
                        f"save_parameters file) or set model.checkpoint")
    if not os.path.isfile(params):
        raise MissingFileError(f"{params}: float parameters not found (did the run finish its "
                               f"float stage?)")
    return recipe, params


def _task_data(recipe, preprocess, ctx):
    """(metric name, evaluate(net) -> % on the validation split, calibration inputs) of the
    recipe's task: top-1 for classification, VOC07 mAP for detection, calibrated on the
    batches ``qat train``'s PTQ stage uses."""
    seed = recipe['run']['seed']
    if recipe['model']['task'] == 'detection':
        classes, val = detection.validation(recipe, preprocess)
        train_set = detection.open_split(recipe, 'train')
        cal = detection.calibration_batches(recipe, train_set, preprocess, seed)
        return ('mAP', lambda net: detection.mean_ap(net, val(), classes, ctx),
                Reiterable(lambda: (x for x, _ in cal)))
    train_set, _ = open_splits(recipe['data'])
    val = Reiterable(lambda: validation_batches(recipe, preprocess))
    return ('top-1', lambda net: accuracy(net, val, ctx),
            calibration_batches(recipe, train_set, preprocess, seed))


def simulate(source, grid, params=None, out=print, show_progress=True):
    """Rows (dicts) of the grid's schemes on the model of ``source`` (run folder or recipe):
    the float model first, then one per combination, in grid order. A row's ``top1`` is
    the task's metric (``metric``: top-1, or a detector's VOC07 mAP), in %."""
    recipe, params = _sources(source, params)
    preprocess = Preprocess.from_recipe(recipe['preprocess'])
    contexts = [mx.cpu()]
    seed = recipe['run']['seed']
    metric, evaluate, cal = _task_data(recipe, preprocess, contexts[0])

    def float_net():
        net = build_model(dict(recipe['model'], checkpoint=params), preprocess.input_shape,
                          contexts, seed)
        if recipe['model']['task'] == 'detection':
            gluon_backbone(net)  # as the run trained it
        net.hybridize(static_alloc=True)
        return net

    float_top1 = evaluate(float_net())
    rows = [{'scheme': 'float', 'top1': float_top1, 'metric': metric}]
    axes = [axis for axis in AXES if axis in grid]
    combos = list(itertools.product(*[grid[axis] for axis in axes]))
    for combo in progress(combos, label='simulate', unit='scheme', enabled=show_progress):
        choice = dict(zip(axes, combo))
        net = float_net()
        scheme = quant_scheme(recipe['quantize'])
        for axis, value in choice.items():
            if AXES[axis][1] is not None:
                scheme = AXES[axis][1](scheme, value, net)
        convert_model(net, config=scheme)
        method = choice.get('method', recipe['calibrate']['method'])
        calibrate(net, cal, method=method, num_batches=recipe['calibrate']['batches'])
        freeze_bn(net)
        freeze_ranges(net)
        top1 = evaluate(net)
        cfg = scheme.default
        first = scheme.first_layer_bits
        row = {'scheme': ' '.join(f"{axis}={value}" for axis, value in choice.items()) or
               'recipe', 'weight_bits': cfg.weight_bits, 'input_bits': cfg.input_bits,
               'granularity': cfg.weight_granularity,
               # the rule gives unsigned codes at 7 bits or fewer only
               'input_signed': 'after ReLU' if scheme.unsigned_after_relu
               and cfg.input_bits <= 7 else ('yes' if cfg.input_signed else 'no'),
               'bn': 'fold' if cfg.fake_bn else 'keep',
               'first_layer': 'float' if choice.get('first_layer') == 'float'
               else (str(first) if first is not None else 'same'),
               'method': method, 'top1': top1, 'metric': metric}
        rows.append(row)
        out(f"{row['scheme']}: val {metric} {top1:.2f}%")
    return rows


def format_rows(rows):
    float_top1 = rows[0]['top1']
    keys = ['weight_bits', 'input_bits', 'granularity', 'input_signed', 'bn', 'first_layer',
            'method']
    table = [[row['scheme']] + [row.get(key, '') for key in keys]
             + [fmt_number(row['top1'], 2),
                '' if row is rows[0] else fmt_number(row['top1'] - float_top1, 2)]
             for row in rows]
    metric = rows[0].get('metric', 'top-1')
    return format_table(table, HEADERS[:-2] + [f'{metric} (%)', 'vs float'])


def plot_rows(rows, path):
    hbars([row['scheme'] for row in rows], [row['top1'] for row in rows],
          'simulated post-training quantization', f"val {rows[0].get('metric', 'top-1')} (%)",
          path)
    return path


def add_arguments(parser):
    parser.add_argument('source', help='a run folder of `qat train` (its recipe and float '
                                       'weights) or a recipe file (with --params)')
    parser.add_argument('--params', help='float parameters (save_parameters) for a recipe '
                                         'file; default model.checkpoint')
    for axis, (valid, _) in AXES.items():
        what = 'weight and input bits together (W=A)' if axis == 'bits' else 'values'
        parser.add_argument(f"--{axis.replace('_', '-')}", metavar='V1,V2',
                            help=f"{what} to try ({', '.join(valid)}); default the recipe's")
    parser.add_argument('--output', metavar='FILE.md', help='also write the table here')
    parser.add_argument('--png', metavar='FILE.png', help='also draw the top-1 bars here')


def run(args, out=print):
    options = {axis: getattr(args, axis) for axis in AXES}
    grid = parse_grid(options)
    if 'bits' in grid and ('weight_bits' in grid or 'input_bits' in grid):
        raise UserError("--bits sets weight and input bits together: not with --weight-bits "
                        "/ --input-bits")
    rows = simulate(args.source, grid, params=args.params, out=out)
    table = format_rows(rows)
    if args.output:
        atomic_write(args.output, table + '\n')
    if args.png:
        plot_rows(rows, args.png)
    out(table)
    return rows
