"""The embedded detection set: the bundled handwritten digits on canvases.

Each image is a ``size`` x ``size`` RGB canvas (dark, with a little noise) holding one to
``max_objects`` real 8x8 scikit-learn digits, each resized to a random scale, tinted with a
random bright colour and placed at a random position, overlapping the others by at most
``max_overlap`` (IoU). The label of an object is its tight box around the ink and its digit:
GluonCV's detection label rows ``[xmin, ymin, xmax, ymax, class, difficult]`` (pixels,
``difficult`` 0), so GluonCV's transforms, target generators and VOC metric take it as they
take ``VOCDetection``.

Deterministic: image ``i`` of a split is drawn from ``(seed, split, i)`` alone (any image can
be made on its own, in any order, by any worker). The training and validation canvases use
disjoint digit images: the digits' own fixed stratified split (``qat.app.data``'s, the
classification set's), ``val_fraction`` of every digit held out for validation.
"""
import cv2
import mxnet as mx
import numpy as np

from ..errors import UserError
from .data import _digits_test_mask, _load_digits

CLASSES = tuple(str(d) for d in range(10))
SPLITS = {'train': 0, 'val': 1}
INK = 0.25  # a resized glyph's pixels above this fraction of its maximum are ink


def _iou(box, boxes):
    if not len(boxes):
        return np.zeros(0)
    boxes = np.asarray(boxes, np.float64)
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0,
                     None)
    inter = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    return inter / (area + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter)


class DigitsDetection(mx.gluon.data.Dataset):
    """``count`` canvases of a split ('train' or 'val'): items (image (size, size, 3) uint8
    NDArray, label (objects, 6) float32 numpy)."""

    classes = CLASSES  # (GluonCV's metrics and transforms read ``dataset.classes``)

    def __init__(self, split='train', count=1000, size=64, max_objects=4, min_scale=12,
                 max_scale=28, max_overlap=0.2, val_fraction=0.2, seed=0):
        if split not in SPLITS:
            raise UserError(f"digits detection: unknown split {split!r}; valid: {list(SPLITS)}")
        if not (1 <= min_scale <= max_scale <= size):
            raise UserError(f"digits detection: scales must satisfy 1 <= min_scale ({min_scale}) "
                            f"<= max_scale ({max_scale}) <= size ({size})")
        if count < 0 or max_objects < 1:
            raise UserError(f"digits detection: count ({count}) must be >= 0 and max_objects "
                            f"({max_objects}) >= 1")
        images, labels = _load_digits()
        held_out = _digits_test_mask(labels, val_fraction, seed)
        keep = held_out if split == 'val' else ~held_out
        self.sources = np.flatnonzero(keep)  # indices into the bundled digits
        self.glyphs, self.digits = images[keep] / 16.0, labels[keep]
        self.split, self.count, self.size, self.seed = split, int(count), int(size), seed
        self.max_objects, self.scales = int(max_objects), (int(min_scale), int(max_scale))
        self.max_overlap = float(max_overlap)

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        image, label, _ = self.render(i)
        return mx.nd.array(image, dtype='uint8'), label

    def render(self, i):
        """(image uint8 (size, size, 3), label (objects, 6) float32, the indices of the bundled
        digits drawn) of canvas ``i``."""
        if not 0 <= i < self.count:
            raise IndexError(f"digits detection {self.split}: index {i} not in [0, {self.count})")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
        canvas = rng.uniform(0, 0.08, (self.size, self.size, 3))
        wanted = int(rng.integers(1, self.max_objects + 1))
        boxes, rows, used = [], [], []
        for _ in range(8 * wanted):  # placements that overlap too much are drawn again
            if len(rows) == wanted:
                break
            pick = int(rng.integers(len(self.glyphs)))
            scale = int(rng.integers(self.scales[0], self.scales[1] + 1))
            glyph = cv2.resize(self.glyphs[pick], (scale, scale), interpolation=cv2.INTER_LINEAR)
            ink = np.argwhere(glyph > INK * glyph.max())
            top, left = (int(rng.integers(0, self.size - scale + 1)) for _ in range(2))
            (y0, x0), (y1, x1) = ink.min(0), ink.max(0) + 1
            box = (left + x0, top + y0, left + x1, top + y1)
            if np.any(_iou(box, boxes) > self.max_overlap):
                continue
            colour = rng.uniform(0.6, 1.0, 3)
            patch = canvas[top:top + scale, left:left + scale]
            np.maximum(patch, glyph[:, :, None] * colour, out=patch)
            boxes.append(box)
            rows.append([*box, self.digits[pick], 0])
            used.append(int(self.sources[pick]))
        image = np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8)
        return image, np.array(rows, np.float32).reshape(-1, 6), used
