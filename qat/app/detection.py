"""Detection recipes (``model.task: detection``): GluonCV SSD and YOLOv3 trained, quantized,
exported with ncnn's own detection layers and verified, through the same stages as
classification.

Everything detection-specific is here: the data sources (``SOURCES``: the embedded digits
canvases, GluonCV's ``VOCDetection``, ``COCODetection`` and ``RecordFileDetection``), the
batches (images preprocessed as ncnn will, boxes in network pixels, labels padded with -1 to
the batch's most objects), the model families (``FAMILIES``: how GluonCV trains each one, its
train transform, target generator and loss) and ``DetectionStages``, the hooks that
``qat.app.stages`` mixes into its run for detection. The metric is GluonCV's VOC07 mAP (in
percent, so that the tables read like top-1).

Randomness of training augmentation comes from a generator seeded with (seed, epoch, rank,
sample), so a resumed run sees the same augmented batches.
"""
import importlib.util
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

import mxnet as mx
import numpy as np
from mxnet import autograd

from ..analysis.tasks import add_detections, voc07_metric
from ..batches import Reiterable
from ..convert import unmatched
from ..deploy import YOLO_DECODERS, detection as decoding
from ..deploy import verify
from ..deploy.export import file_names, read_manifest
from ..deploy.ncnn import read_param, read_weights
from ..deploy.verify import NcnnModel, decoder_inputs, head_layers, ncnn_arithmetic, simulate
from ..errors import DataError, MissingFileError, UserError, reason
from ..modes import temporary_mode
from .checks import check_devices
from .detection_data import DigitsDetection
from .detectors import gluon_backbone
from .data import epoch_order

AUGMENTS = ('none', 'flip', 'gluoncv')


# ----- datasets: len(), item(i) -> (HWC RGB uint8 image, (objects, 6) float32 label) ----------
class DetectionSet:
    """A detection dataset in one form: GluonCV label rows ``[xmin, ymin, xmax, ymax, class,
    difficult]`` in image pixels; ``classes`` its class names."""

    def __init__(self, dataset, classes, name):
        self.dataset, self.classes, self.name = dataset, tuple(classes), name

    def __len__(self):
        return len(self.dataset)

    def item(self, i):
        try:
            image, label = self.dataset[int(i)]
        except (OSError, ValueError, mx.base.MXNetError) as err:
            raise DataError(f"{self.name}: sample {i} cannot be read: {reason(err)}") from None
        image = image.asnumpy() if isinstance(image, mx.nd.NDArray) else np.asarray(image)
        label = np.asarray(label, np.float32).reshape(len(label), -1)
        rows = np.zeros((len(label), 6), np.float32)  # COCO / RecordIO: no difficult column
        rows[:, :min(6, label.shape[1])] = label[:, :6]
        return image.astype(np.uint8), rows[rows[:, 4] >= 0]


def _split_path(section, split):
    return os.path.join(section['root'], section[split])


def _digits(section, options, split):
    count = options['train_samples' if split == 'train' else 'val_samples']
    return DetectionSet(DigitsDetection(split, count, size=options['canvas'],
                                        max_objects=options['max_objects'],
                                        max_scale=min(28, options['canvas']),
                                        val_fraction=section['val_fraction']),
                        DigitsDetection.classes, f"digits_detection {split}")


def _voc_splits(text, key):
    """'2007/trainval,2012/trainval' -> [(2007, 'trainval'), (2012, 'trainval')]."""
    splits = []
    for part in text.split(','):
        year, _, name = part.strip().partition('/')
        if not year.isdigit() or not name:
            raise UserError(f"{key}: a VOC split is YEAR/NAME (e.g. 2007/trainval, several "
                            f"separated by commas), got {text!r}")
        splits.append((int(year), name))
    return splits


def _voc(section, options, split):
    from gluoncv.data import VOCDetection
    classes = options['classes'] or VOCDetection.CLASSES
    # GluonCV's way to other classes: a VOCDetection whose CLASSES are them
    voc = type('VOCDetection', (VOCDetection,), {'CLASSES': tuple(c.lower() for c in classes)})
    splits = _voc_splits(section[split], f"data.{split}")
    for year, name in splits:
        listing = os.path.join(section['root'], f"VOC{year}", 'ImageSets', 'Main', name + '.txt')
        if not os.path.isfile(listing):
            raise MissingFileError(f"data.{split}: file not found: {listing}")
    try:
        dataset = voc(root=section['root'], splits=splits)
    except (OSError, AttributeError) as err:  # (a missing XML tag is an AttributeError)
        raise DataError(f"data.{split}: VOC folder {section['root']}: {reason(err)}") from None
    return DetectionSet(dataset, voc.CLASSES, f"voc {section[split]}")


def _coco_classes(path):
    with open(path) as handle:
        categories = json.load(handle).get('categories', [])
    return [c['name'] for c in categories]  # (the order pycocotools lists them in)


def _coco(section, options, split):
    from gluoncv.data import COCODetection
    if importlib.util.find_spec('pycocotools') is None:  # (GluonCV would pip-install it)
        raise UserError("data.source: coco needs pycocotools (pip install pycocotools, or "
                        "gluon-qat[coco])")
    path = os.path.join(section['root'], 'annotations', section[split] + '.json')
    if not os.path.isfile(path):
        raise MissingFileError(f"data.{split}: file not found: {path}")
    try:
        names = _coco_classes(path)
        # (COCODetection takes the json's categories when CLASSES names them all, in order)
        coco = type('COCODetection', (COCODetection,), {'CLASSES': names})
        dataset = coco(root=section['root'], splits=(section[split],), skip_empty=False)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"data.{split}: COCO annotations {path}: {reason(err)}") from None
    return DetectionSet(dataset, names, f"coco {section[split]}")


def _recordio(section, options, split):
    from gluoncv.data import RecordFileDetection
    path = _split_path(section, split)
    if not options['classes']:
        raise UserError(f"detection.classes: a RecordIO file ({path}) holds class ids only: "
                        f"name the classes")
    return DetectionSet(RecordFileDetection(path, coord_normalized=True), options['classes'],
                        path)


def _files(section):
    return [(f'data.{k}', _split_path(section, k), 'file') for k in ('train', 'val')] + \
        [(f'data.{k}', os.path.splitext(_split_path(section, k))[0] + '.idx', 'file')
         for k in ('train', 'val')]


# data.source -> (open(data section, detection section, split), files(data section))
SOURCES = {
    'digits_detection': (_digits, lambda s: []),
    'voc': (_voc, lambda s: [('data.root', s['root'], 'folder')]),
    'coco': (_coco, lambda s: [('data.root', s['root'], 'folder')]),
    'detection_recordio': (_recordio, _files),
}


def missing_files(section):
    """(key, problem) for each file or folder a detection ``data`` section needs and lacks."""
    files = SOURCES[section['source']][1](section)
    if files and not section['root']:
        return [('data.root', f"data.source {section['source']!r} needs data.root")]
    return [(key, f"{kind} not found: {path}") for key, path, kind in files
            if not (os.path.isdir(path) if kind == 'folder' else os.path.isfile(path))]


def open_split(recipe, split):
    section = recipe['data']
    problems = missing_files(section)
    if problems:
        raise MissingFileError('; '.join(f"{k}: {p}" for k, p in problems))
    dataset = SOURCES[section['source']][0](section, recipe['detection'], split)
    if len(dataset) == 0:
        raise DataError(f"data.{split}: no samples in {dataset.name}")
    return dataset


# ----- batches -------------------------------------------------------------------------------
def _flip(image, label, rng):
    from gluoncv.data.transforms import bbox as tbbox
    if rng.rand() < 0.5:
        label = label.copy()
        label[:, :4] = tbbox.flip(label[:, :4], (image.shape[1], image.shape[0]), flip_x=True)
        image = image[:, ::-1]
    return image, label


def _gluoncv_default(image, label, rng, family, preprocess):
    """GluonCV's default detection train transform (colour distortion, random expansion and
    crop, flip), without its targets, drawing from ``rng``; back in pixel units."""
    seed = int(rng.randint(2 ** 31 - 1))
    random.seed(seed)  # (GluonCV's transforms draw from the global generators)
    np.random.seed(seed)
    height, width = preprocess.size
    transform = family.train_transform(width, height, mean=(0, 0, 0), std=(1, 1, 1))
    image, label = transform(mx.nd.array(image, dtype='uint8'), label)
    image = np.clip(image.asnumpy().transpose(1, 2, 0) * 255, 0, 255)
    return image, np.asarray(label, np.float32)


def _to_network(image, label, preprocess):
    """Boxes scaled from the image's size to the network input's."""
    height, width = preprocess.size
    label = label.copy()
    label[:, (0, 2)] *= width / image.shape[1]
    label[:, (1, 3)] *= height / image.shape[0]
    return label


def padded(labels):
    """(B, M, 6) float32: each sample's rows, padded with -1 to the most objects."""
    most = max([len(label) for label in labels] + [1])
    out = -np.ones((len(labels), most, 6), np.float32)
    for k, label in enumerate(labels):
        out[k, :len(label)] = label
    return out


def detection_batches(dataset, preprocess, batch_size, order=None, start=0, augment='none',
                      augment_seed=(0,), family=None, workers=0, classes=None):
    """Yield (data (B, C, H, W), labels (B, M, 6)) NDArray batches of ``dataset`` taken in
    ``order`` from batch number ``start``: images through ``preprocess``, boxes in network
    pixels. ``augment`` (training; ``AUGMENTS``) draws per sample from (augment_seed,
    position in ``order``); threads only decode. ``classes``: ids must lie in [0, classes)."""
    order = np.arange(len(dataset)) if order is None else np.asarray(order)
    pool = ThreadPoolExecutor(workers) if workers else None
    fetch = pool.map if pool else map
    try:
        for number in range(start, (len(order) + batch_size - 1) // batch_size):
            first = number * batch_size
            items = list(fetch(dataset.item, order[first:first + batch_size]))
            images, labels = [], []
            for position, (image, label) in enumerate(items, first):
                if classes is not None and len(label) and \
                        (label[:, 4].min() < 0 or label[:, 4].max() >= classes):
                    raise DataError(f"{dataset.name}: class id {int(label[:, 4].max())} is "
                                    f"outside [0, {classes}) (the model's classes)")
                if augment != 'none':
                    rng = np.random.RandomState(list(augment_seed) + [position])
                    image, label = _flip(image, label, rng) if augment == 'flip' else \
                        _gluoncv_default(image, label, rng, family, preprocess)
                labels.append(_to_network(image, label, preprocess))
                images.append(image)
            yield mx.nd.array(preprocess(images)), mx.nd.array(padded(labels))
    finally:
        if pool:
            pool.shutdown()


# ----- model families ------------------------------------------------------------------------
def _without_side_effects(net, function):
    """``function()``'s result, with every untrained state of ``net`` (BN statistics, range
    trackers) put back afterwards: a training-mode pass run only to read shapes."""
    kept = [(p, [a.copy() for a in p.list_data()]) for p in net.collect_params().values()
            if p.grad_req == 'null' and p._data is not None]
    try:
        return function()
    finally:
        for param, arrays in kept:
            for target, value in zip(param.list_data(), arrays):
                value.copyto(target)


def _ssd_setup(net, input_shape, ctx):
    from gluoncv.loss import SSDMultiBoxLoss
    from gluoncv.model_zoo.ssd.target import SSDTargetGenerator

    def anchors():
        with autograd.train_mode():
            return net(mx.nd.zeros((1,) + tuple(input_shape), ctx=ctx))[2]
    # negatives are mined by the loss (ratio 3), as GluonCV's train_ssd does
    return {'anchors': _without_side_effects(net, anchors).copyto(mx.cpu()),
            'targets': SSDTargetGenerator(iou_thresh=0.5, stds=(0.1, 0.1, 0.2, 0.2),
                                          negative_mining_ratio=-1),
            'loss': SSDMultiBoxLoss()}


def _ssd_losses(net, state, xs, ys):
    """Per-sample SSD multibox losses (GluonCV's: normalized by the positives of the whole
    batch, so scaled by the batch size for the trainer's mean)."""
    cls_targets, box_targets = [], []
    with autograd.pause():
        for y in ys:
            cls_t, box_t, _ = state['targets'](state['anchors'].as_in_context(y.context), None,
                                               y[:, :, :4], y[:, :, 4:5])
            cls_targets.append(cls_t)
            box_targets.append(box_t)
    outputs = [net(x) for x in xs]
    losses, _, _ = state['loss']([o[0] for o in outputs], [o[1] for o in outputs],
                                 cls_targets, box_targets)
    batch = sum(x.shape[0] for x in xs)
    return [loss * batch for loss in losses]


def _yolo3_setup(net, input_shape, ctx):
    from gluoncv.model_zoo.yolo.yolo_target import YOLOV3PrefetchTargetGenerator
    fake = mx.nd.zeros((1,) + tuple(input_shape), ctx=ctx)

    def shapes():
        with autograd.train_mode():
            return net(fake)[1:4]
    anchors, offsets, maps = _without_side_effects(net, shapes)
    return {'fake': fake.copyto(mx.cpu()), 'anchors': [a.copyto(mx.cpu()) for a in anchors],
            'offsets': [o.copyto(mx.cpu()) for o in offsets],
            'maps': [m.copyto(mx.cpu()) for m in maps],
            'targets': YOLOV3PrefetchTargetGenerator(num_class=len(net.classes))}


def _yolo3_losses(net, state, xs, ys):
    """Per-sample YOLOv3 losses: the net in training mode computes them from GluonCV's
    prefetched targets (objectness, centers, scales, weights, classes)."""
    losses = []
    for x, y in zip(xs, ys):
        with autograd.pause():
            boxes, ids = y[:, :, :4].copyto(mx.cpu()), y[:, :, 4:5].copyto(mx.cpu())
            targets = state['targets'](state['fake'], state['maps'], state['anchors'],
                                       state['offsets'], boxes, ids)
        parts = net(x, y[:, :, :4], *[t.as_in_context(x.context) for t in targets])
        losses.append(sum(parts))
    return losses


class Family(NamedTuple):
    """How GluonCV trains one detector family."""
    classes: Callable      # () -> the GluonCV classes of the family's nets
    train_transform: Callable  # GluonCV's default train transform (width, height, mean, std)
    setup: Callable        # (net, input_shape, ctx) -> state the losses need
    losses: Callable       # (net, state, [x per device], [labels per device]) -> [loss]


def _ssd_class():
    from gluoncv.model_zoo.ssd import SSD
    return SSD


def _yolo3_class():
    from gluoncv.model_zoo.yolo import YOLOV3
    return YOLOV3


def _ssd_transform(*args, **kwargs):
    from gluoncv.data.transforms.presets.ssd import SSDDefaultTrainTransform
    return SSDDefaultTrainTransform(*args, **kwargs)


def _yolo3_transform(*args, **kwargs):
    from gluoncv.data.transforms.presets.yolo import YOLO3DefaultTrainTransform
    return YOLO3DefaultTrainTransform(*args, **kwargs)


# The detector families a detection recipe trains (a net is of the first family whose
# GluonCV class it is an instance of).
FAMILIES = {
    'ssd': Family(_ssd_class, _ssd_transform, _ssd_setup, _ssd_losses),
    'yolo3': Family(_yolo3_class, _yolo3_transform, _yolo3_setup, _yolo3_losses),
}


def family_of(net):
    """(name, Family) of a detector; a UserError naming the model otherwise."""
    for name, family in FAMILIES.items():
        if isinstance(net, family.classes()):
            return name, family
    raise UserError(f"model.name: {type(net).__name__} is not a detector this recipe can "
                    f"train (model.task: detection takes GluonCV's {', '.join(FAMILIES)} nets)")


# ----- the metric (qat.analysis.tasks: GluonCV's VOC07 mAP) -----------------------------------
def mean_ap(net, batches, classes, ctx):
    """VOC07 mAP (%) of ``net`` (GluonCV's own decoding) on (data, labels) batches."""
    metric = voc07_metric(classes)
    for data, labels in batches:
        ids, scores, boxes = net(data.as_in_context(ctx))
        add_detections(metric, ids, scores, boxes, labels)
    return 100.0 * float(metric.get()[1][-1])


def _rows_metric(metric, rows, label, input_shape):
    """Add one sample's ncnn rows ``[label, score, x1, y1, x2, y2]`` to a VOC metric."""
    ids, scores, boxes = decoding.to_gluoncv(rows, input_shape[2], input_shape[1])
    if not len(ids):  # (the metric wants one row: -1 is its padding)
        ids, scores, boxes = -np.ones((1, 1)), np.zeros((1, 1)), np.zeros((1, 4))
    add_detections(metric, ids[None], scores[None], boxes[None], label[None])


def ncnn_mean_ap(folder, name, batches, classes, input_shape):
    """VOC07 mAP (%) of the exported ncnn int8 detector ``name`` in ``folder`` on (data,
    labels) batches."""
    files = file_names(name)
    model = NcnnModel(os.path.join(folder, files['int8_param']),
                      os.path.join(folder, files['int8_bin']))
    metric = voc07_metric(classes)
    for data, labels in batches:
        for sample, label in zip(data.asnumpy(), labels.asnumpy()):
            _rows_metric(metric, model.run(sample, ['detection_out'])['detection_out'], label,
                         input_shape)
    return 100.0 * float(metric.get()[1][-1])


def reference_mean_ap(net, folder, name, batches, classes, input_shape):
    """VOC07 mAP (%) of the simulated net decoded as the export decodes (the numpy
    reference of ncnn's DetectionOutput / Yolov3DetectionOutput on the simulated heads):
    what the ncnn model's mAP should equal. (With ``yolo_decoder='Yolov3DetectionOutput'``
    a YOLOv3 keeps one class per box and is suppressed across classes, GluonCV's decoding
    does neither: their mAPs differ.)"""
    manifest = read_manifest(folder, name)
    decoder = decoding.detector_layer(manifest)
    files = file_names(name)
    param = os.path.join(folder, files['int8_param'])
    params = {layer[1]: layer[4] for layer in read_param(param)}
    weights = read_weights(param, os.path.join(folder, files['int8_bin']))
    sources = [head['source'] for head in head_layers(manifest, decoder)]
    metric = voc07_metric(classes)
    for data, labels in batches:
        with temporary_mode(net, bn_frozen=True, online=False):  # as verify simulates it
            heads = simulate(net, [data], sources, arithmetic=ncnn_arithmetic(manifest))
        for k, label in enumerate(labels.asnumpy()):
            rows = decoding.decode(decoder['kind'], params[decoder['name']],
                                   decoder_inputs(manifest, decoder, heads, weights, k,
                                                  params))
            _rows_metric(metric, rows, label, input_shape)
    return 100.0 * float(metric.get()[1][-1])


# ----- the stages' hooks ---------------------------------------------------------------------
class DetectionStages:
    """Mixed into ``qat.app.stages.Run`` before it for ``model.task: detection``: the data,
    losses, metric, export options and verification of a detector."""

    metric_name = 'val mAP'

    # ----- checks, data and model --------------------------------------------------------
    def _validate(self):
        """Before anything is written: devices, both splits open with the same classes and
        a first sample that decodes, the model is a detector of a registered family with as
        many classes, every ``quantize.exclude`` pattern names a layer."""
        check_devices(self.devices.contexts, self.recipe['run']['devices'])
        self.train_set = open_split(self.recipe, 'train')
        self.val_set = open_split(self.recipe, 'val')
        if tuple(self.train_set.classes) != tuple(self.val_set.classes):
            raise DataError(f"data.val: classes {self.val_set.classes} differ from the "
                            f"training classes {self.train_set.classes}")
        for dataset in (self.train_set, self.val_set):
            dataset.item(0)  # decodes, or a DataError naming the file
        # the class names in the resolved recipe (saved with the run, compared on resume)
        self.recipe['model'] = self.model_section()
        augment = self.recipe['detection']['augment']
        if augment == 'gluoncv' and (self.preprocess.channels, self.preprocess.pixel) != \
                (3, 'RGB'):
            raise UserError("detection.augment: gluoncv's transform works on RGB images "
                            "(preprocess.channels 3, pixel RGB)")
        net = self._float_net()
        _, self.family = family_of(net)
        self.classes = len(net.classes)
        if self.classes != len(self.train_set.classes):
            raise UserError(f"model.kwargs: the model has {self.classes} classes, the data "
                            f"{len(self.train_set.classes)} ({', '.join(self.train_set.classes)})")
        missing = unmatched(net, self.recipe['quantize']['exclude'])
        if missing:
            raise UserError(f"quantize.exclude: {missing[0]!r} matches no layer or block of "
                            f"the model")

    def model_section(self):
        """The ``model`` section with the data's class names as ``classes`` for factories
        and GluonCV's ``*_custom`` nets: unless names are given; a count (the recipe's
        default ``classes: 10``) must be the data's."""
        section = dict(self.recipe['model'])
        if section['source'] == 'factory' or section['name'].endswith('_custom'):
            given = section['kwargs'].get('classes')
            names = list(self.train_set.classes)
            if isinstance(given, int) and not isinstance(given, bool):
                if given != len(names):
                    raise UserError(f"model.kwargs.classes: {given}, but the data has "
                                    f"{len(names)} classes ({', '.join(names)}); give the "
                                    f"class names or leave it out")
                given = None
            if given is None:
                section['kwargs'] = dict(section['kwargs'], classes=names)
        return section

    def _float_net(self):
        net = super()._float_net()
        gluon_backbone(net)  # a zoo SSD's SymbolBlock backbone as Gluon layers
        net._qat_training_graph = None  # (the next call traces its graph anew)
        return net

    def _graph(self, net, training):
        # GluonCV's detectors trace a different graph in training: clear the cached one
        if getattr(net, '_qat_training_graph', None) is not training:
            net._clear_cached_op()
            net._qat_training_graph = training

    def _batches(self, split, order=None, start=0, augment='none', seed=(0,)):
        dataset = self.train_set if split == 'train' else self.val_set
        size = self.recipe['run']['batch_size' if split == 'train' else 'eval_batch_size']
        return detection_batches(dataset, self.preprocess, size, order=order, start=start,
                                 augment=augment, augment_seed=seed, family=self.family,
                                 workers=self.recipe['data']['workers'], classes=self.classes)

    def val_batches(self, limit=None):
        return self._batches('val', order=np.arange(len(self.val_set))[:limit or None])

    def calibration_batches(self):
        return calibration_batches(self.recipe, self.train_set, self.preprocess, self.seed,
                                   self.classes)

    def calibration_inputs(self):
        return Reiterable(lambda: (x for x, _ in self.calibration_batches()))

    def _calibrate(self, net):
        self._graph(net, False)
        super()._calibrate(net)

    def evaluate(self, net):
        self._graph(net, False)
        return mean_ap(net, self.val_batches(), self.train_set.classes,
                       self.devices.contexts[0])

    # ----- training ------------------------------------------------------------------------
    def train_batches(self, epoch, step):
        return self._batches('train', self.shard(epoch), step,
                             self.recipe['detection']['augment'],
                             (self.seed, epoch, self.devices.rank))

    def batch_losses(self, net, xs, ys):
        self._graph(net, True)
        if getattr(self, '_family_state', None) is None or self._family_state[0] is not net:
            net._clear_cached_op()
            with autograd.pause():  # (a shape-reading pass: not part of the step)
                state = self.family.setup(net, self.preprocess.input_shape,
                                          self.devices.contexts[0])
            net._clear_cached_op()
            self._family_state = (net, state)
        return self.family.losses(net, self._family_state[1], xs, ys)

    # ----- export and verify ---------------------------------------------------------------
    def export_options(self):
        return export_options(self.recipe)

    def final_net(self):
        net = super().final_net()
        self._graph(net, False)
        return net

    def verify_stage(self, report_path):
        return verify_detector(self.final_net(), self.folder.path('export'),
                               self.recipe['export']['name'], self.val_batches,
                               self.train_set.classes, self._export_shape(), report_path,
                               self.out, samples=self.recipe['verify']['samples'],
                               **self.recipe['verify']['thresholds'])

    def _export_shape(self):
        return tuple(self.recipe['export']['input_shape']) or self.preprocess.input_shape


def export_options(recipe):
    """``qat.deploy.export``'s detection options of a detection recipe (a YOLOv3's decoder
    only where the net is one: the option means nothing to an SSD)."""
    section = recipe['detection']
    options = {'confidence_threshold': section['confidence_threshold']}
    if section['yolo_decoder'] != YOLO_DECODERS[0]:
        options['yolo_decoder'] = section['yolo_decoder']
    return {'detection': options}


def calibration_batches(recipe, train_set, preprocess, seed, classes=None):
    """The first ``calibrate.batches`` training batches of a detection recipe, (data,
    labels), in a fixed order, re-iterable: what its PTQ stage calibrates on."""
    size = recipe['run']['batch_size']
    order = epoch_order(len(train_set), seed, 0)[:size * recipe['calibrate']['batches']]
    return Reiterable(lambda: detection_batches(train_set, preprocess, size, order=order,
                                                workers=recipe['data']['workers'],
                                                classes=classes))


def validation(recipe, preprocess):
    """(classes, ``batches(limit=None)``: (data, labels) batches of the recipe's validation
    split, in order) of a detection recipe: what ``qat verify`` reads for a detection run."""
    dataset = open_split(recipe, 'val')

    def batches(limit=None):
        return detection_batches(dataset, preprocess, recipe['run']['eval_batch_size'],
                                 order=np.arange(len(dataset))[:limit or None],
                                 workers=recipe['data']['workers'])
    return dataset.classes, batches


def verify_detector(net, folder, name, batches, classes, input_shape, report_path,
                    out=print, samples=0, **options):
    """verify's report on the first ``samples`` (0: all) of ``batches(limit)``'s images (data
    only: detections are matched against the reference decoder), then on all of them the
    VOC07 mAP of the ncnn int8 model ('ncnn') and of the simulation decoded as ncnn decodes
    ('ncnn_decoding'). Returns (report, {'ncnn', 'ncnn_decoding'}); ``options``: verify's."""
    report = verify(net, folder, [x for x, _ in batches(samples)], name=name,
                    report_path=report_path, **options)
    ncnn = ncnn_mean_ap(folder, name, batches(), classes, input_shape)
    reference = reference_mean_ap(net, folder, name, batches(), classes, input_shape)
    found = report['int8']['detections']
    out(f"verify: {'passed' if report['passed'] else 'FAILED: '}"
        f"{'; '.join(report['failures'])} ({found['matched']}/{found['reference']} "
        f"detections matched; on the validation split ncnn int8 mAP {ncnn:.2f}%, "
        f"the simulation decoded as ncnn decodes {reference:.2f}%; report {report_path})")
    for note in report.get('notes', []):
        out(f"verify: note: {note}")
    return report, {'ncnn': ncnn, 'ncnn_decoding': reference}
