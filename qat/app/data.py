"""Datasets and preprocessing.

The embedded default is scikit-learn's bundled digits: 1797 real 8x8 handwritten digits (no
download). Other sources (``SOURCES``): image folders (one subfolder per class), list files
(``path label`` lines), MXNet RecordIO (``.rec`` + ``.idx``) and CIFAR-10 binary files on disk.

Every source yields images as HWC arrays in RGB order and pixel units (0..255): one internal
convention. ``Preprocess`` (size, mean, std / norm, pixel order) turns them into the network's
input, written as ncnn computes it (``(x - mean) * norm`` after a resize), and is used
identically for training, calibration, export and verification.
"""
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import mxnet as mx

from ..errors import DataError, MissingFileError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.tif', '.tiff', '.webp')
CIFAR10_FILES = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']


def _load_digits():
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def _digits_test_mask(labels, test_fraction, seed):
    """A fixed stratified split: ``test_fraction`` of every digit, chosen by ``seed``."""
    rng = np.random.RandomState(seed)
    test = np.zeros(len(labels), bool)
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        test[rng.permutation(members)[:int(round(len(members) * test_fraction))]] = True
    return test


def digits(size=16, channels=3, test_fraction=0.2, seed=0):
    """((x_train, y_train), (x_test, y_test)) as float32 NCHW numpy arrays and int labels: the
    ``digits`` source preprocessed as the recipes do (``Preprocess``: resized to ``size`` x
    ``size``, pixels (x - 127.5) / 127.5). The split is a fixed stratified shuffle
    (``seed``), identical on every machine."""
    half = (127.5,) * channels
    preprocess = Preprocess(size=(size, size), channels=channels, mean=half, std=half)
    section = {'val_fraction': test_fraction, 'seed': seed}
    arrays = []
    for split in ('train', 'val'):
        dataset = digits_set(section, split)
        arrays.append((preprocess(list(dataset.images)), dataset.labels))
    return tuple(arrays)


def batches(x, y, batch_size, shuffle=False, seed=0):
    """Yield (data, label) NDArray batches of numpy arrays (the last one may be smaller)."""
    order = np.random.RandomState(seed).permutation(len(x)) if shuffle else np.arange(len(x))
    for start in range(0, len(x), batch_size):
        index = order[start:start + batch_size]
        yield mx.nd.array(x[index]), mx.nd.array(y[index])


# ----- preprocessing -------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """Image -> network input, as ncnn's ``from_pixels_resize`` + ``substract_mean_normalize``.

    size: (height, width); channels: 1 (gray) or 3; mean, std: per channel, pixel units, in
    ``pixel`` order; pixel: 'RGB' or 'BGR', the channel order the network sees."""
    size: tuple = (16, 16)
    channels: int = 3
    mean: tuple = (127.5, 127.5, 127.5)
    std: tuple = (127.5, 127.5, 127.5)
    pixel: str = 'RGB'

    @classmethod
    def from_recipe(cls, section):
        return cls(tuple(section['size']), section['channels'], tuple(section['mean']),
                   tuple(section['std']), section['pixel'])

    @property
    def norm(self):
        """ncnn's per-channel multiplier ``1 / std`` (float32)."""
        return np.float32(1.0) / np.asarray(self.std, np.float32)

    @property
    def input_shape(self):
        return (self.channels,) + tuple(self.size)

    def image(self, rgb):
        """One HWC RGB image (pixel units) -> HWC float32 in the network's size and order,
        before normalization."""
        import cv2
        img = np.asarray(rgb, np.float32)
        if img.ndim == 2:
            img = img[:, :, None]
        if img.shape[2] == 1 and self.channels == 3:
            img = np.repeat(img, 3, axis=2)
        elif img.shape[2] == 3 and self.channels == 1:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None]
        elif self.channels == 3 and self.pixel == 'BGR':
            img = img[:, :, ::-1]
        height, width = self.size
        if img.shape[:2] != (height, width):
            img = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
            img = img.reshape(height, width, self.channels)
        return img

    def __call__(self, images):
        """A list of HWC RGB images (pixel units) -> float32 NCHW ``(x - mean) * norm``."""
        batch = np.stack([self.image(img) for img in images])
        batch = (batch - np.asarray(self.mean, np.float32)) * self.norm
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)

    def ncnn(self):
        """What a deployed app passes to ncnn (``Mat::from_pixels_resize`` with this pixel
        order, then ``substract_mean_normalize(mean, norm)``)."""
        return {'pixel': self.pixel if self.channels == 3 else 'GRAY',
                'height': self.size[0], 'width': self.size[1],
                'mean': [_short(m) for m in self.mean], 'norm': [_short(n) for n in self.norm]}


def _short(value):
    """The shortest decimal that is the same float32 (ncnn's tools read at most 19
    characters of a number: 0.007843137718737125 would be misread)."""
    return float(np.format_float_positional(np.float32(value), unique=True))


@dataclass(frozen=True)
class Augment:
    """Training-only augmentation on normalized NCHW batches: random horizontal flip, and a
    pad by ``pad_crop`` pixels of zeros (= the mean after normalization) then a random crop."""
    flip: bool = False
    pad_crop: int = 0

    def __call__(self, batch, rng):
        out = batch.copy()
        n, _, h, w = batch.shape
        if self.pad_crop:
            p = self.pad_crop
            padded = np.pad(batch, ((0, 0), (0, 0), (p, p), (p, p)))
            dy, dx = rng.randint(0, 2 * p + 1, size=(2, n))
            for i in range(n):
                out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        if self.flip:
            flips = rng.rand(n) < 0.5
            out[flips] = out[flips][:, :, :, ::-1]
        return out


# ----- datasets: len() and item(i) -> (HWC RGB image in pixel units, int label) --------------
class ArraySet:
    """Images held in memory (N, H, W, C) RGB, pixel units."""

    def __init__(self, images, labels, name):
        self.images, self.labels, self.name = images, np.asarray(labels, np.int64), name

    def __len__(self):
        return len(self.labels)

    def item(self, i):
        return self.images[i], int(self.labels[i])


def _read_image(path):
    import cv2
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"cannot read image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class FileSet:
    """Image files decoded on demand."""

    def __init__(self, paths, labels, name):
        if not paths:
            raise DataError(f"{name}: no images")
        self.paths, self.labels, self.name = list(paths), np.asarray(labels, np.int64), name

    def __len__(self):
        return len(self.paths)

    def item(self, i):
        return _read_image(self.paths[i]), int(self.labels[i])


class RecordSet:
    """An MXNet RecordIO file with its index (as written by ``im2rec`` or
    ``mx.recordio.MXIndexedRecordIO`` with ``pack_img``)."""

    def __init__(self, rec_path):
        self.name = rec_path
        self._record = mx.recordio.MXIndexedRecordIO(_idx_path(rec_path), rec_path, 'r')
        self._keys = list(self._record.keys)
        self._lock = threading.Lock()  # reads seek a shared file handle
        if not self._keys:
            raise DataError(f"{rec_path}: no records")

    def __len__(self):
        return len(self._keys)

    def item(self, i):
        import cv2
        with self._lock:
            packed = self._record.read_idx(self._keys[i])
        header, payload = mx.recordio.unpack(packed)
        img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"{self.name}: record {self._keys[i]} is not an image")
        label = np.asarray(header.label).reshape(-1)[0]
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), int(label)


def _idx_path(rec_path):
    return os.path.splitext(rec_path)[0] + '.idx'


def _split_path(section, split):
    return os.path.join(section['root'], section[split])


def _class_folders(folder):
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))


def _images_in(folder):
    return sorted(p for p in glob.glob(os.path.join(folder, '**', '*'), recursive=True)
                  if p.lower().endswith(IMAGE_EXTENSIONS))


def folder_set(section, split):
    """``root/<split>/<class>/*.jpg``; classes are the sorted subfolders of the train split."""
    classes = _class_folders(_split_path(section, 'train'))
    folder = _split_path(section, split)
    if not classes:
        raise DataError(f"data.train: {_split_path(section, 'train')} has no class "
                         "subfolders (expected <class>/<image> files)")
    extra = sorted(set(_class_folders(folder)) - set(classes))
    if extra:
        raise DataError(f"data.{split}: classes {extra} of {folder} are not in the "
                         f"training classes {classes}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _images_in(os.path.join(folder, name))
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"data.{split}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the "
                        f"class subfolders of {folder}")
    empty = sorted(set(classes) - {classes[label] for label in labels})
    if empty and split == 'train':
        raise DataError(f"data.train: class {empty[0]!r} has no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}) in {os.path.join(folder, empty[0])}")
    return FileSet(paths, labels, folder)


def list_set(section, split):
    """A text file of ``path label`` lines; paths relative to ``root`` (or absolute)."""
    list_file = _split_path(section, split)
    paths, labels = [], []
    with open(list_file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith('#'):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
                raise DataError(f"data.{split}: {list_file}:{number}: expected 'path label', "
                                 f"got {line.strip()!r}")
            path = os.path.join(section['root'], parts[0].strip())
            if not os.path.isfile(path):
                raise DataError(f"data.{split}: {list_file}:{number}: image not found: {path}")
            paths.append(path)
            labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"data.{split}: {list_file} lists no images")
    return FileSet(paths, labels, list_file)


def recordio_set(section, split):
    return RecordSet(_split_path(section, split))


def cifar10_set(section, split):
    """MXNet's CIFAR-10 (``mx.gluon.data.vision.CIFAR10``) from the binary files in ``root``
    (``val`` is the test batch)."""
    dataset = mx.gluon.data.vision.CIFAR10(root=section['root'], train=split == 'train')
    return ArraySet(dataset._data.asnumpy(), dataset._label, f"cifar10 {split}")


def digits_set(section, split):
    """The bundled digits as 8x8x3 RGB images in pixel units (``Preprocess`` resizes them);
    ``val_fraction`` of every digit is held out (a fixed split)."""
    images, labels = _load_digits()
    images = np.repeat(images[:, :, :, None] * (255.0 / 16.0), 3, axis=3)
    test = _digits_test_mask(labels, section['val_fraction'], section.get('seed', 0))
    keep = test if split == 'val' else ~test
    return ArraySet(images[keep], labels[keep], f"digits {split}")


# data.source -> (open(section, split) -> dataset, files(section) -> [(key, path, kind)])
SOURCES = {
    'digits': (digits_set, lambda s: []),
    'folder': (folder_set, lambda s: [(f'data.{k}', _split_path(s, k), 'folder')
                                      for k in ('train', 'val')]),
    'list': (list_set, lambda s: [(f'data.{k}', _split_path(s, k), 'file')
                                  for k in ('train', 'val')]),
    'recordio': (recordio_set, lambda s: [
        (f'data.{k}', p, 'file') for k in ('train', 'val')
        for p in (_split_path(s, k), _idx_path(_split_path(s, k)))]),
    'cifar10': (cifar10_set, lambda s: [('data.root', os.path.join(s['root'], name), 'file')
                                        for name in CIFAR10_FILES]),
}


def missing_files(section):
    """(key, problem) for every file or folder the ``data`` section needs that is missing."""
    files = SOURCES[section['source']][1](section)
    if files and not section['root']:
        return [('data.root', f"data.source {section['source']!r} needs data.root "
                 "(e.g. --set data.root=/path/to/dataset)")]
    problems = []
    for key, path, kind in files:
        exists = os.path.isdir(path) if kind == 'folder' else os.path.isfile(path)
        if not exists:
            problems.append((key, f"{kind} not found: {path}"))
    return problems


def open_split(section, split):
    """The ``train`` or ``val`` dataset of a recipe's ``data`` section."""
    if section['source'] not in SOURCES:
        raise DataError(f"unknown data.source {section['source']!r}; valid: {sorted(SOURCES)}")
    problems = missing_files(section)
    if problems:
        raise MissingFileError('; '.join(f"{k}: {p}" for k, p in problems))
    return SOURCES[section['source']][0](section, split)


# ----- batches -------------------------------------------------------------------------------
def epoch_order(n, seed, epoch):
    """The sample order of one training epoch: a permutation derived from (seed, epoch) only,
    so a resumed run sees exactly the batches an uninterrupted one would."""
    return np.random.RandomState([seed, epoch]).permutation(n)


def _check_batch_labels(dataset, items, classes):
    labels = np.array([label for _, label in items])
    if classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= classes):
        bad = int(labels[(labels < 0) | (labels >= classes)][0])
        raise DataError(f"{dataset.name}: label {bad} is outside [0, {classes}) (the model's "
                        f"classes)")


def iterate(dataset, preprocess, batch_size, order=None, start=0, augment=None,
            augment_seed=(0,), workers=0, classes=None):
    """Yield (data, label) NDArray batches: ``preprocess`` applied to ``dataset`` items taken in
    ``order`` (default: dataset order), from batch number ``start`` on. ``augment`` (training
    only) draws from a generator seeded with ``augment_seed + (batch number,)``. ``workers``
    threads decode images. ``classes``: labels must lie in [0, classes)."""
    order = np.arange(len(dataset)) if order is None else np.asarray(order)
    pool = ThreadPoolExecutor(workers) if workers else None
    fetch = pool.map if pool else map
    try:
        for number in range(start, (len(order) + batch_size - 1) // batch_size):
            items = list(fetch(dataset.item, order[number * batch_size:(number + 1) * batch_size]))
            _check_batch_labels(dataset, items, classes)
            data = preprocess([image for image, _ in items])
            if augment is not None:
                data = augment(data, np.random.RandomState(list(augment_seed) + [number]))
            yield mx.nd.array(data), mx.nd.array([label for _, label in items])
    finally:
        if pool:
            pool.shutdown()
