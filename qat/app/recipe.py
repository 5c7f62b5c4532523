"""Recipes: one YAML file = one reproducible run.

``SCHEMA`` below is the whole recipe language: every key with its default, type and meaning.
A recipe file gives some of these keys; ``--set a.b=value`` overrides (typed by the schema)
come on top; ``load`` validates everything (unknown keys, types, impossible values, missing
files) before any work starts and returns plain nested dicts. ``schema_markdown`` renders the
schema for the README, so the docs cannot drift from the code.
"""
import difflib
import logging
import math
import os
import re
from typing import NamedTuple

import yaml

from . import data as data_module
from . import detection
from . import models
from ..calibration import METHODS as CALIBRATION_METHODS
from ..config import BITS as BIT_RANGE, GRANULARITIES, RANGE_TRACKERS, QuantScheme
from ..deploy import DETECTION_THRESHOLDS, THRESHOLDS, WINOGRAD_POLICIES, YOLO_DECODERS
from ..errors import UserError
from ..fileio import atomic_write
from .trainer import OPTIMIZERS, SCHEDULES

log = logging.getLogger(__name__)


class RecipeError(UserError):
    """A recipe (file or override) that cannot run; the message names the file and the key."""


class Key(NamedTuple):
    """One recipe key: default value, type (a key of ``TYPES``), meaning, optional rule."""
    default: object
    type: str
    doc: str
    rule: tuple = None  # (predicate(value) -> bool, description) from the helpers below


# ----- rules: (predicate, description) -------------------------------------------------------
def between(low, high):
    return (lambda v: low <= v <= high), f"in {low}..{high}"


def at_least(low):
    return (lambda v: v >= low), f">= {low}"


def fraction():
    return (lambda v: 0 <= v < 1), "in [0, 1)"


def plain_name():
    """A file or folder name, not a path: it cannot reach outside its parent folder."""
    return ((lambda v: bool(re.fullmatch(r'[\w][\w.+-]*', v))),
            "a plain name (letters, digits, . _ + -; no / or ..)")


def positive():
    return (lambda v: v > 0), "> 0"


def one_of(choices):
    """``choices``: a tuple or a registry (its keys)."""
    valid = tuple(sorted(choices) if isinstance(choices, dict) else choices)
    return (lambda v: v in valid), (lambda: valid)


def each(rule):
    """Apply ``rule`` to every item of a list."""
    predicate, description = rule
    return (lambda v: all(predicate(x) for x in v)), description


BITS = between(*BIT_RANGE)
KVSTORES = ('local', 'device', 'dist_sync', 'dist_device_sync')
TASKS = ('classification', 'detection')
VERIFY_THRESHOLDS = dict(THRESHOLDS, **DETECTION_THRESHOLDS)


def _training(epochs, lr, doc):
    """The keys of one training stage (float pre-training and QAT share them)."""
    return {
        'epochs': Key(epochs, 'int', doc, at_least(0)),
        'optimizer': Key('sgd', 'str', 'optimizer name', one_of(OPTIMIZERS)),
        'lr': Key(lr, 'float', 'peak learning rate (per sample-averaged batch)', positive()),
        'momentum': Key(0.9, 'float', 'momentum (sgd, nag)', fraction()),
        'wd': Key(1e-4, 'float', 'weight decay', at_least(0)),
        'schedule': Key('cosine', 'str', 'learning-rate schedule over the stage '
                        '(`mx.lr_scheduler`), times the warm-up', one_of(SCHEDULES)),
        'warmup_epochs': Key(0.0, 'float', 'linear warm-up from 0 over this many epochs',
                             at_least(0)),
        'milestones': Key([], 'ints', 'step schedule: epochs at which lr is multiplied by '
                          '`factor`', each(at_least(1))),
        'factor': Key(0.1, 'float', 'step schedule: lr multiplier at each milestone',
                      positive()),
    }


# The recipe language. Defaults are the main job: cifar_resnet20_v1 on the bundled digits.
SCHEMA = {
    'run': {
        'name': Key('', 'str', 'run name; outputs go to `<out>/<name>/` (empty: the recipe '
                    "file's name)", (lambda v: v == '' or plain_name()[0](v),
                                     plain_name()[1])),
        'out': Key('checkpoints', 'str', 'folder holding the run folders'),
        'seed': Key(0, 'int', 'seeds python, numpy and mxnet; the data order of an epoch is '
                    'derived from seed and epoch, so a resumed run sees the same batches'),
        'devices': Key(['cpu(0)'], 'strs', 'contexts, e.g. `[cpu(0), cpu(1)]` or `[gpu(0), '
                       'gpu(1)]`; each batch is split over them'),
        'kvstore': Key('device', 'str', 'gradient aggregation; `dist_sync` / '
                       '`dist_device_sync` train on several machines (launch with DMLC_* '
                       'variables, see the README)', one_of(KVSTORES)),
        'batch_size': Key(64, 'int', 'samples per step and worker (split over its devices; '
                          'gradients are averaged over all workers\' samples)',
                          at_least(1)),
        'eval_batch_size': Key(256, 'int', 'samples per evaluation batch', at_least(1)),
        'checkpoint_steps': Key(0, 'int', 'also checkpoint every N steps inside an epoch '
                                '(0: at epoch ends only)', at_least(0)),
        'tensorboard': Key(True, 'bool', 'write TensorBoard event files to '
                           '`<out>/<name>/tensorboard`'),
        'log_steps': Key(10, 'int', 'TensorBoard loss / learning rate every N steps',
                         at_least(1)),
        'progress': Key(True, 'bool', 'progress bar on stderr (when it is a terminal)'),
    },
    'model': {
        'task': Key('classification', 'str', '`classification` (class scores) or `detection` '
                    '(a GluonCV SSD / YOLOv3, trained with its own losses; metric VOC07 mAP; '
                    'see the `detection` section)', one_of(TASKS)),
        'source': Key('gluoncv', 'str', '`gluoncv` (model zoo name), `factory` (a Python '
                      'function `module:function` returning a Gluon HybridBlock) or `file` (a '
                      'model file, imported: `x-symbol.json`, `x.onnx`, `x.prototxt`, '
                      '`x.param`; chosen by such a name when `source` is not given)',
                      one_of(models.SOURCES)),
        'name': Key('cifar_resnet20_v1', 'str', 'GluonCV model name, `module:function`, or the '
                    'model file (its preprocessing, e.g. a Caffe `transform_param`, is the '
                    'default of `preprocess`)'),
        'weights': Key('', 'path', '`file`: its weights file (empty: next to it, '
                       '`x-0000.params`, `x.caffemodel`, `x.bin`)'),
        'kwargs': Key({'classes': 10}, 'dict', 'keyword arguments of the constructor (GluonCV: '
                      'e.g. `classes`; `pretrained: true` needs the weights on disk)'),
        'checkpoint': Key('', 'path', 'float parameters (`.params`) to start from, e.g. '
                          '`<run>/float.params`; empty: Xavier initialization'),
    },
    'data': {
        'source': Key('digits', 'str', '`digits` (bundled, no files), `folder` (one subfolder '
                      'per class), `list` (lines `path label`), `recordio` (`.rec` + `.idx`), '
                      '`cifar10` (MXNet\'s CIFAR-10 binary files in `root`); detection: '
                      '`digits_detection` (bundled digits on canvases, no files), `voc` (a '
                      'VOC-layout `root`, GluonCV\'s VOCDetection), `coco` (`root` with '
                      '`annotations/<split>.json` and the images, GluonCV\'s COCODetection), '
                      '`detection_recordio` (GluonCV\'s RecordFileDetection)',
                      one_of(dict(data_module.SOURCES, **detection.SOURCES))),
        'root': Key('', 'str', 'dataset folder; `train` / `val` are relative to it'),
        'train': Key('train', 'str', 'training split: a folder (`folder`), a list file '
                     '(`list`), a `.rec` file (`recordio`, `detection_recordio`), `YEAR/NAME` '
                     '(`voc`, e.g. `2007/trainval`, several joined by commas), an annotation '
                     'name (`coco`, e.g. `instances_train2017`)'),
        'val': Key('val', 'str', 'validation split (same forms as `train`)'),
        'val_fraction': Key(0.2, 'float', '`digits`: fraction held out for validation',
                            (lambda v: 0 < v < 1, 'in (0, 1)')),
        'workers': Key(2, 'int', 'threads decoding images', at_least(0)),
        'flip': Key(False, 'bool', 'training augmentation: random horizontal flip'),
        'pad_crop': Key(0, 'int', 'training augmentation: pad by N pixels (with the mean), '
                        'crop back at a random offset', at_least(0)),
    },
    'preprocess': {
        'size': Key([16, 16], 'ints', 'network input `[height, width]`; images are resized to '
                    'it', each(at_least(1))),
        'channels': Key(3, 'int', '1 (gray) or 3', one_of((1, 3))),
        'mean': Key([127.5, 127.5, 127.5], 'floats', 'per-channel mean in pixel units '
                    '(0..255), in `pixel` order'),
        'std': Key([127.5, 127.5, 127.5], 'floats', 'per-channel std in pixel units '
                   '(give `std` or `norm`)', each(positive())),
        'norm': Key([], 'floats', "ncnn's form `1/std` (replaces `std` when given)",
                    each(positive())),
        'pixel': Key('RGB', 'str', 'channel order the network sees', one_of(('RGB', 'BGR'))),
    },
    'quantize': {
        'weight_bits': Key(8, 'int', 'weight bits', BITS),
        'input_bits': Key(8, 'int', 'activation (layer input) bits', BITS),
        'weight_granularity': Key('channel', 'str', 'weight scales per output `channel` (per '
                                  'group for grouped convs) or per `tensor`',
                                  one_of(GRANULARITIES)),
        'input_signed': Key(True, 'bool', 'signed activation codes; false: unsigned '
                            '(0..2^b-1, twice the levels after a ReLU; exported up to 7 '
                            'bits)'),
        'fake_bn': Key(True, 'bool', 'fold each BatchNorm into its conv while training'),
        'range_momentum': Key(0.9, 'float', 'EMA momentum of the activation ranges',
                              fraction()),
        'range_tracker': Key('auto', 'str', '`ema` (tracked in training), `max` (running '
                             'max kept by calibration), `lsq` (input and weight ranges '
                             'learned, LSQ, started from calibration) or `auto` (`lsq` for '
                             'layers of 4 bits or fewer, `ema` above)', one_of(RANGE_TRACKERS)),
        'first_layer_bits': Key(8, 'int?', 'weight and input bits of the first conv / dense '
                                '(it sees the raw image); null: like the others', BITS),
        'winograd_weight_bits': Key(None, 'int?', 'weight bits of every 3x3 stride-1 conv (the '
                                    'convs ncnn may run with int8 Winograd; ncnn2table uses 6); '
                                    'null: no rule', BITS),
        'unsigned_after_relu': Key(False, 'bool', 'unsigned input codes (`0..2^b-1`, twice '
                                   'the levels) for the layers of 7 input bits or fewer whose '
                                   'input is >= 0 by construction (after a ReLU, a sigmoid, '
                                   'through pooling, concat, sums of such); exported exactly'),
        'exclude': Key([], 'strs', 'glob patterns of block names or paths left float'),
        'layers': Key({}, 'dict', 'per-layer overrides: `{glob pattern of block name or path: '
                      '{QuantConfig field: value}}`, or `null` for a layer left float; the '
                      'first matching pattern wins'),
    },
    'float': _training(0, 0.1, 'float pre-training epochs (0: use the model as it is)'),
    'calibrate': {
        'method': Key('mse', 'str', 'how the float activations become one range (the start '
                      'of learned ranges)',
                      one_of(CALIBRATION_METHODS)),
        'batches': Key(8, 'int', 'calibration batches (training data, fixed order)',
                       at_least(1)),
        'choose_from': Key([], 'strs', 'calibration methods the PTQ stage tries (e.g. '
                           '`[percentile, kl, mse]`): the one whose quantized net scores best '
                           '(top-1, or VOC07 mAP for detection) on the calibration batches '
                           'and their labels replaces `method` for the whole run',
                           each(one_of(CALIBRATION_METHODS))),
        'report_bits': Key([], 'ints', 'also report post-training accuracy at these bit '
                           'widths (W`b`A`b`, first layer as above)', each(BITS)),
    },
    'qat': dict(_training(2, 0.005, 'quantization-aware fine-tuning epochs'), **{
        'input_quant_epoch': Key(0, 'int', 'epoch at which input quantization turns on '
                                 '(before it: weights only; ranges are re-calibrated then)',
                                 at_least(0)),
        'freeze_bn_epoch': Key(None, 'int?', 'epoch from which BN statistics are frozen '
                               '(null: at the end)', at_least(0)),
        'freeze_ranges_epoch': Key(None, 'int?', 'epoch from which activation ranges are '
                                   'frozen (null: at the end)', at_least(0)),
        'range_lr': Key(1e-3, 'float?', 'learned ranges (LSQ): Adam on log T at this '
                        'rate, following the schedule (each step moves a range by about '
                        'this fraction at most); null: the stage\'s optimizer and `lr`, as '
                        'the weights (plain LSQ)', positive()),
        'distill': Key(0.0, 'float', 'knowledge distillation from the float net '
                       '(`float.params`) at this temperature T: the loss is T^2 times the '
                       'cross-entropy of the softened outputs to the float net\'s, no label '
                       'term (Hinton et al. 2015); 0: the labels only (classification)',
                       at_least(0)),
    }),
    'detection': {
        'train_samples': Key(2000, 'int', '`digits_detection`: training canvases',
                             at_least(1)),
        'val_samples': Key(300, 'int', '`digits_detection`: validation canvases',
                           at_least(1)),
        'canvas': Key(64, 'int', '`digits_detection`: canvas side in pixels (resized to '
                      '`preprocess.size`)', at_least(8)),
        'max_objects': Key(4, 'int', '`digits_detection`: digits per canvas, one to this',
                           at_least(1)),
        'classes': Key([], 'strs', 'class names: `voc` (default VOC\'s 20), '
                       '`detection_recordio` (required); `coco` reads them from the json'),
        'augment': Key('flip', 'str', 'training augmentation: `none`, `flip` (random '
                       'horizontal flip) or `gluoncv` (GluonCV\'s default SSD / YOLOv3 train '
                       'transform: colour, expansion, crop, flip)', one_of(detection.AUGMENTS)),
        'confidence_threshold': Key(0.01, 'float', 'score threshold of the exported ncnn '
                                    'decoding (DetectionOutput / Yolov3DetectionOutput)',
                                    (lambda v: 0 <= v <= 1, 'in [0, 1]')),
        'yolo_decoder': Key('DetectionOutput', 'str', "a YOLOv3's ncnn decoding: "
                            "`DetectionOutput` (GluonCV's: every class of a box, NMS per "
                            "class) or `Yolov3DetectionOutput` (ncnn's YOLOv3 layer: the best "
                            "class of each box, NMS across classes)", one_of(YOLO_DECODERS)),
    },
    'export': {
        'enabled': Key(True, 'bool', 'write the ncnn int8 model (`<out>/<name>/export/`)'),
        'name': Key('model', 'str', 'file name stem of the exported model', plain_name()),
        'input_shape': Key([], 'ints', '`[C, H, W]` of the exported input; empty: from '
                           '`preprocess`', each(at_least(1))),
        'winograd': Key('off', 'str', "ncnn's int8 3x3 Winograd path is exact only for small "
                        "accumulations: `off` disables it per layer (31=64; measured fastest "
                        "here), `bound` only where the bound cannot prove it exact, `unsafe` "
                        "never (speed tests only)", one_of(WINOGRAD_POLICIES)),
    },
    'verify': {
        'enabled': Key(True, 'bool', 'run the exported model in ncnn on validation images and '
                       'compare with the simulation'),
        'samples': Key(0, 'int', 'validation images to run (0: all)', at_least(0)),
        'thresholds': Key({}, 'dict', 'pass thresholds replacing `qat.deploy.verify`\'s '
                          'defaults, e.g. `{min_top1_agreement: 0.99}`',
                          ((lambda v: set(v) <= set(VERIFY_THRESHOLDS)),
                           lambda: sorted(VERIFY_THRESHOLDS))),
    },
}

# Keys of earlier versions -> their names now (read with a warning, so old run folders load).
RENAMED = {'quantize.granularity': 'quantize.weight_granularity',
           'quantize.signed': 'quantize.input_signed'}


# ----- types: name -> coerce(value) (raises ValueError with the expected form) ----------------
def _int(v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("an integer")
    return v


def _float(v):
    if isinstance(v, bool):
        raise ValueError("a number")
    if isinstance(v, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            raise ValueError("a number") from None
    if not isinstance(v, (int, float)):
        raise ValueError("a number")
    if not math.isfinite(v):  # .nan / .inf would train at chance and deploy garbage
        raise ValueError("a finite number")
    return float(v)


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


def _str(v):
    if isinstance(v, bool):  # YAML 1.1 reads off/on/yes/no as booleans
        raise ValueError("a string (quote it: YAML reads off/on/yes/no as true/false)")
    if not isinstance(v, str):
        raise ValueError("a string")
    return v


def _list_of(item, name):
    def coerce(v):
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"a list of {name}")
        try:
            return [item(x) for x in v]
        except ValueError:
            raise ValueError(f"a list of {name}") from None
    return coerce


def _dict(v):
    if not isinstance(v, dict):
        raise ValueError("a mapping")
    return v


def _optional(coerce):
    return lambda v: None if v is None else coerce(v)


TYPES = {
    'int': _int, 'int?': _optional(_int), 'float': _float, 'float?': _optional(_float),
    'bool': _bool, 'str': _str,
    'path': _str, 'ints': _list_of(_int, 'integers'), 'floats': _list_of(_float, 'numbers'),
    'strs': _list_of(_str, 'strings'), 'dict': _dict,
}


# ----- loading -------------------------------------------------------------------------------
def defaults():
    """The default recipe as nested dicts (fresh copies)."""
    return {section: {name: _copy(key.default) for name, key in keys.items()}
            for section, keys in SCHEMA.items()}


def _copy(value):
    return yaml.safe_load(yaml.safe_dump(value))


def _valid_keys(section=None):
    return sorted(SCHEMA) if section is None else sorted(SCHEMA[section])


def _unknown(path, valid, origin):
    close = difflib.get_close_matches(path.split('.')[-1], valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ''
    return f"{origin}: {path}: unknown key{hint}; valid: {', '.join(valid)}"


def parse_override(text):
    """'a.b=value' -> ('a.b', raw string value)."""
    if '=' not in text:
        raise RecipeError(f"--set {text}: expected key=value, e.g. qat.epochs=3")
    key, value = text.split('=', 1)
    return key.strip(), value


def _override_value(key, raw):
    """The string of ``--set key=raw`` as the schema type of ``key`` wants it."""
    if key.type in ('str', 'path'):
        return raw
    if key.type == 'strs' and not raw.lstrip().startswith('['):
        return [s.strip() for s in raw.split(',') if s.strip()]
    value = yaml.safe_load(raw) if raw.strip() else None
    if key.type == 'float' and isinstance(value, str):
        return value  # coerced (or rejected) by the type
    return value


def _read(path):
    """The mapping in the YAML file ``path`` ({} for None)."""
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise RecipeError(f"{path}: recipe file not found")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML: {' '.join(str(err).split())}") \
                from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections "
                          f"({', '.join(_valid_keys())}), got {type(raw).__name__}")
    return raw


def _renamed(dotted, where):
    if dotted in RENAMED:
        log.warning("%s: %s is now called %s", where, dotted, RENAMED[dotted])
        return RENAMED[dotted]
    return dotted


def _apply_file(recipe, raw, origin, given, problems):
    """Put the file's keys into ``recipe``; record where each came from in ``given``."""
    for section, values in raw.items():
        if section not in SCHEMA:
            problems.append(_unknown(str(section), _valid_keys(), origin))
            continue
        if not isinstance(values, dict):
            problems.append(f"{origin}: {section}: a section is a mapping of keys, got "
                            f"{values!r}")
            continue
        for name, value in values.items():
            name = _renamed(f"{section}.{name}", origin).partition('.')[2]
            if name not in SCHEMA[section]:
                problems.append(_unknown(f"{section}.{name}", _valid_keys(section), origin))
                continue
            recipe[section][name] = value
            given[f"{section}.{name}"] = origin


def _apply_overrides(recipe, overrides, given, problems):
    """Put the ``--set`` overrides into ``recipe`` (typed by the schema)."""
    where = '--set'
    for item in overrides:
        dotted, value = parse_override(item) if isinstance(item, str) else item
        dotted = _renamed(dotted, where)
        section, _, rest = dotted.partition('.')
        name, _, inner = rest.partition('.')
        if section not in SCHEMA:
            problems.append(_unknown(section, _valid_keys(), where))
            continue
        if name not in SCHEMA[section]:
            problems.append(_unknown(dotted, _valid_keys(section), where))
            continue
        key = SCHEMA[section][name]
        if isinstance(value, str):
            value = _override_value(key if not inner else Key(None, 'dict', ''), value)
        if inner:  # into a mapping key: --set model.kwargs.classes=10
            if key.type != 'dict':
                problems.append(f"{where}: {section}.{name}: is not a mapping, so "
                                f"{dotted} cannot be set")
                continue
            value = dict(recipe[section][name] or {}, **{inner: value})
        recipe[section][name] = value
        given[f"{section}.{name}"] = where


def _check_types_and_rules(recipe, origin, given, problems):
    """Coerce every value to its schema type and check its rule."""
    for section, keys in SCHEMA.items():
        for name, key in keys.items():
            dotted = f"{section}.{name}"
            where = given.get(dotted, origin)
            try:
                value = TYPES[key.type](recipe[section][name])
            except ValueError as err:
                problems.append(f"{where}: {dotted}: must be {err}, got "
                                f"{recipe[section][name]!r}")
                continue
            recipe[section][name] = value
            if key.rule is not None and value is not None:
                predicate, describe = key.rule
                if not predicate(value):
                    expected = (f"one of {', '.join(map(str, describe()))}"
                                if callable(describe) else describe)
                    problems.append(f"{where}: {dotted}: must be {expected}, got {value!r}")


def load(path=None, overrides=(), check_files=True):
    """Read, override and validate a recipe. Returns nested dicts (every key present).

    path: YAML file (None: the defaults). overrides: 'a.b=value' strings (or (key, value)
    pairs of already-typed values). check_files: also require data files, the model
    checkpoint and factory module to exist. Raises RecipeError listing every problem, each
    naming the file (or --set) and the key."""
    origin = path or '<defaults>'
    recipe, given, problems = defaults(), {}, []
    _apply_file(recipe, _read(path), origin, given, problems)
    _apply_overrides(recipe, overrides, given, problems)
    _model_file_preprocess(recipe, given, problems)
    _check_types_and_rules(recipe, origin, given, problems)
    if not problems:
        problems += [f"{given.get(k, origin)}: {k}: {msg}"
                     for k, msg in _consistency(recipe, given, check_files)]
    if problems:
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(problems))
    if not recipe['run']['name']:
        recipe['run']['name'] = (os.path.splitext(os.path.basename(path))[0] if path
                                 else 'default')
    if recipe['preprocess']['norm']:  # resolved to std, so the saved recipe reloads
        recipe['preprocess']['std'] = [1.0 / n for n in recipe['preprocess']['norm']]
        recipe['preprocess']['norm'] = []
    return recipe


def _model_file_preprocess(recipe, given, problems):
    """A model file (``source: file``, or a name with a model file's suffix): its own
    preprocessing (Caffe transform_param, the input size) as the defaults of the
    ``preprocess`` keys the recipe does not give."""
    model = recipe['model']
    if 'model.source' not in given and models.source_of(str(model['name'])) == 'file':
        model['source'] = 'file'  # the suffix says it
    if model['source'] != 'file' or models.name_problem('file', str(model['name'])):
        return
    try:
        found = models.file_preprocess(model['name'], model['weights'] or None)
    except UserError as err:
        problems.append(f"{given.get('model.name', '<defaults>')}: model.name: {err}")
        return
    pre = recipe['preprocess']
    if not any(f'preprocess.{key}' in given for key in ('mean', 'std', 'norm')):
        channels = found.get('shape', (pre['channels'],))[0]
        for key in ('mean', 'norm'):
            if key in found and len(found[key]) in (1, channels):
                pre[key] = list(found[key]) * (channels if len(found[key]) == 1 else 1)
    if 'pixel' in found and 'preprocess.pixel' not in given:
        pre['pixel'] = found['pixel']
    if len(found.get('shape', ())) == 3:
        if 'preprocess.size' not in given:
            pre['size'] = list(found['shape'][1:])
        if 'preprocess.channels' not in given:
            pre['channels'] = found['shape'][0]


def _consistency(recipe, given, check_files):
    """(key, problem) for what no single key can tell."""
    pre, qat = recipe['preprocess'], recipe['qat']
    if len(pre['size']) != 2:
        yield 'preprocess.size', f"must be [height, width], got {pre['size']}"
    for name in ('mean', 'std', 'norm'):
        if (name != 'norm' or pre['norm']) and len(pre[name]) != pre['channels']:
            yield (f'preprocess.{name}', f"needs one value per channel "
                   f"({pre['channels']}), got {pre[name]}")
    if pre['norm'] and 'preprocess.std' in given:
        yield 'preprocess.norm', "give std or norm (= 1/std), not both"
    for stage in ('float', 'qat'):
        s = recipe[stage]
        if s['epochs'] and s['warmup_epochs'] > s['epochs']:
            yield f'{stage}.warmup_epochs', f"{s['warmup_epochs']} is beyond " \
                f"{stage}.epochs = {s['epochs']}"
        if s['milestones'] != sorted(set(s['milestones'])) \
                or any(m > s['epochs'] for m in s['milestones']):
            yield f'{stage}.milestones', f"must increase and lie in 1..{stage}.epochs " \
                f"({s['epochs']}), got {s['milestones']}"
    for name in ('input_quant_epoch', 'freeze_bn_epoch', 'freeze_ranges_epoch'):
        if qat[name] is not None and qat[name] > qat['epochs']:
            yield f'qat.{name}', f"{qat[name]} is beyond qat.epochs = {qat['epochs']}"
    task, source = recipe['model']['task'], recipe['data']['source']
    if qat['distill'] and task != 'classification':
        yield 'qat.distill', f"distillation is for classification; model.task is {task}"
    if (task == 'detection') != (source in detection.SOURCES):
        valid = detection.SOURCES if task == 'detection' else data_module.SOURCES
        yield 'data.source', f"{source!r} is not a {task} source (model.task: {task}); " \
            f"valid: {', '.join(sorted(valid))}"
    shape = recipe['export']['input_shape']
    if shape and len(shape) != 3:
        yield 'export.input_shape', f"must be [C, H, W], got {shape}"
    for device in recipe['run']['devices']:
        if not re.fullmatch(r'(cpu|gpu)\(\d+\)', device):
            yield 'run.devices', f"{device!r} is not cpu(N) or gpu(N)"
    try:
        QuantScheme.from_dict(recipe['quantize'])
    except ValueError as err:  # "quantize.<key>: <problem>"
        key, _, problem = str(err).partition(': ')
        yield key, problem
    model = recipe['model']
    problem = models.name_problem(model['source'], model['name'], check_module=check_files)
    if problem:
        yield 'model.name', f"{model['name']!r}: {problem}"
    if check_files:
        if model['checkpoint'] and not os.path.isfile(model['checkpoint']):
            yield 'model.checkpoint', f"file not found: {model['checkpoint']}"
        if model['weights'] and not os.path.isfile(model['weights']):
            yield 'model.weights', f"file not found: {model['weights']}"
        files = detection.missing_files if recipe['data']['source'] in detection.SOURCES \
            else data_module.missing_files
        for key, problem in files(recipe['data']):
            yield key, problem


def dump(recipe, path):
    """Write ``recipe`` as YAML at ``path``, atomically (temporary file, then rename)."""
    atomic_write(path, yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None))


def schema_markdown():
    """The recipe schema as Markdown (one table per section), for the README."""
    lines = []
    for section, keys in SCHEMA.items():
        lines += [f"**`{section}`**", '', '| key | type | default | meaning |', '|---|---|---|---|']
        for name, key in keys.items():
            doc = key.doc
            if key.rule is not None:
                _, describe = key.rule
                doc += (f" (one of: {', '.join(f'`{c}`' for c in describe())})"
                        if callable(describe) else f" ({describe})")
            default = yaml.safe_dump(key.default, default_flow_style=True).strip()
            default = default[:-4].strip() if default.endswith('...') else default
            lines.append(f"| `{name}` | {key.type} | `{default}` | {doc.replace('|', '/')} |")
        lines.append('')
    return '\n'.join(lines)
