"""ncnn's detection layers in numpy, and the comparison of two sets of detections.

The decoders follow ncnn's sources operation by operation in float32
(``src/layer/detectionoutput.cpp``, ``src/layer/x86/yolov3detectionoutput_x86.cpp``,
``src/layer/softmax.cpp``): the same candidate order, the same quicksort (not stable, so
ties come out in ncnn's order), the same NMS tests. Fed with the simulated raw predictions
(bit-exact with ncnn's when packing is off), they give what the device outputs: rows
``[label, score, x1, y1, x2, y2]``. Measured against the runtime on random blobs
(tests/test_detection.py): Yolov3DetectionOutput bit for bit (its x86 build calls the C
library's scalar ``expf`` and contracts ``1 + a * b`` into one fma, both reproduced here);
DetectionOutput exact in labels and scores, its box corners within a few float32 ulps: the
wheel is built with fast-math, and its generic loop calls glibc's vectorized expf
(libmvec), which is not correctly rounded; here the exponential is correctly rounded.
Softmax is ncnn's formula with a correctly rounded exp (ncnn's x86 Softmax uses its own
polynomial): scores within a few ulps.

``params`` are an ncnn layer's parameters by id, as ``qat.deploy.ncnn.read_param`` reads
them from the exported .param (the reference decodes what the file says).
"""
import ctypes
import ctypes.util

import numpy as np

F32 = np.float32
SCORE_LSB = 1 / 127  # one step of an int8 grid spanning the scores' range [0, 1]


def expf(x):
    """float32 exp, correctly rounded (glibc's scalar expf agrees but in rare cases)."""
    return np.exp(np.asarray(x, np.float64)).astype(F32)


def _libm_expf():
    """The C library's scalar ``expf`` as a numpy function (None where it cannot be loaded):
    what ncnn's x86 Yolov3DetectionOutput calls."""
    try:
        libm = ctypes.CDLL(ctypes.util.find_library('m') or 'libm.so.6')
    except OSError:
        return None
    libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    scalar = np.vectorize(lambda v: libm.expf(float(v)), otypes=[F32])
    return lambda x: scalar(np.asarray(x, F32)) if np.size(x) else np.asarray(x, F32)


libm_expf = _libm_expf() or expf


def fma(a, b, c):
    """float32 ``a * b + c`` rounded once, as the compiled layers contract it (the float64
    product is exact; the sum's double rounding is off with probability ~2^-29)."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64)
            + np.asarray(c, np.float64)).astype(F32)


def softmax(x):
    """ncnn's Softmax over the last axis of a 2-D blob: max, expf(x - max) summed in order,
    divided by the sum."""
    x = np.asarray(x, F32)
    e = expf(x - x.max(axis=-1, keepdims=True))
    total = np.zeros(x.shape[:-1], F32)
    for k in range(x.shape[-1]):  # float32 accumulation in ncnn's order
        total = total + e[..., k]
    return e / total[..., None]


def qsort_descent(scores):
    """The order ncnn's ``qsort_descent_inplace`` leaves ``scores`` in (indices)."""
    order = list(range(len(scores)))
    values = [float(s) for s in scores]
    stack = [(0, len(values) - 1)] if values else []
    while stack:  # the recursion's ranges are disjoint: any processing order gives its result
        left, right = stack.pop()
        i, j = left, right
        pivot = values[(left + right) // 2]
        while i <= j:
            while values[i] > pivot:
                i += 1
            while values[j] < pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                order[i], order[j] = order[j], order[i]
                i += 1
                j -= 1
        if left < j:
            stack.append((left, j))
        if i < right:
            stack.append((i, right))
    return np.array(order, np.int64)


def _intersection(box, boxes):
    """ncnn's ``intersection_area`` of one box with each of ``boxes`` (float32)."""
    apart = (box[0] > boxes[:, 2]) | (box[2] < boxes[:, 0]) | (box[1] > boxes[:, 3]) | \
        (box[3] < boxes[:, 1])
    width = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    height = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    return np.where(apart, F32(0), width * height)


def nms_sorted(boxes, areas, threshold, ratio_form):
    """Indices kept by ncnn's ``nms_sorted_bboxes`` over score-sorted ``boxes`` (n, 4):
    DetectionOutput suppresses when inter / union > t (``ratio_form``), Yolov3DetectionOutput
    when inter > t * union."""
    threshold = F32(threshold)
    picked = []
    for i in range(len(boxes)):
        if picked:
            inter = _intersection(boxes[i], boxes[picked])
            union = areas[i] + areas[picked] - inter
            with np.errstate(invalid='ignore', divide='ignore'):
                suppressed = inter / union > threshold if ratio_form else \
                    inter > threshold * union
            if suppressed.any():
                continue
        picked.append(i)
    return picked


def _rows(labels, scores, boxes):
    if not len(scores):
        return np.zeros((0, 6), F32)
    return np.concatenate([np.asarray(labels, F32)[:, None], np.asarray(scores, F32)[:, None],
                           np.asarray(boxes, F32)], axis=1)


def detection_output(location, confidence, priors, params):
    """ncnn's DetectionOutput (caffe-style): location (A * 4), confidence (A, K)
    probabilities, priors (2, A * 4) (row 1: the variances)."""
    num_class = int(params.get(0, 0))
    nms_threshold, nms_top_k = F32(params.get(1, 0.05)), int(params.get(2, 300))
    keep_top_k, threshold = int(params.get(3, 100)), F32(params.get(4, 0.5))
    loc = np.asarray(location, F32).reshape(-1, 4)
    conf = np.asarray(confidence, F32).reshape(len(loc), num_class)
    prior = np.asarray(priors, F32).reshape(2, -1, 4)
    pb, var = prior[0], prior[1]
    pb_w, pb_h = pb[:, 2] - pb[:, 0], pb[:, 3] - pb[:, 1]
    pb_cx, pb_cy = (pb[:, 0] + pb[:, 2]) * F32(0.5), (pb[:, 1] + pb[:, 3]) * F32(0.5)
    cx = var[:, 0] * loc[:, 0] * pb_w + pb_cx
    cy = var[:, 1] * loc[:, 1] * pb_h + pb_cy
    w, h = expf(var[:, 2] * loc[:, 2]) * pb_w, expf(var[:, 3] * loc[:, 3]) * pb_h
    boxes = np.stack([cx - w * F32(0.5), cy - h * F32(0.5), cx + w * F32(0.5),
                      cy + h * F32(0.5)], axis=1)
    # a prior whose background score clears 1 - threshold (in double) is not decoded: ncnn
    # leaves its box uninitialized; NaN here, so that using one shows
    skipped = conf[:, 0].astype(np.float64) >= 1.0 - np.float64(threshold)
    boxes[skipped] = np.nan
    labels, scores, kept = [], [], []
    for cls in range(1, num_class):
        candidates = np.nonzero(conf[:, cls] > threshold)[0]
        order = candidates[qsort_descent(conf[candidates, cls])][:nms_top_k]
        b = boxes[order]
        areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        for z in nms_sorted(b, areas, nms_threshold, True):
            labels.append(cls)
            scores.append(conf[order[z], cls])
            kept.append(b[z])
    order = qsort_descent(scores)[:keep_top_k]
    return _rows(np.array(labels)[order], np.array(scores, F32)[order],
                 np.array(kept, F32).reshape(-1, 4)[order])


def yolov3_detection_output(blobs, params):
    """ncnn's Yolov3DetectionOutput over the raw (C, H, W) prediction blobs, in order."""
    num_class, num_box = int(params.get(0, 20)), int(params.get(1, 5))
    threshold, nms_threshold = F32(params.get(2, 0.01)), F32(params.get(3, 0.45))
    biases = np.asarray(params[4], F32)
    mask = [int(m) for m in params[5]]
    scales = np.asarray(params[6], F32)
    sigmoid = lambda v: F32(1) / (F32(1) + libm_expf(-v))  # noqa: E731
    scores, boxes, areas, labels = [], [], [], []
    for b, blob in enumerate(blobs):
        blob = np.asarray(blob, F32)
        channels, h, w = blob.shape
        per_box = channels // num_box
        if per_box != 5 + num_class:
            raise ValueError(f"blob {b}: {channels} channels are not {num_box} boxes of "
                             f"5 + {num_class}")
        net_w, net_h = int(scales[b] * F32(w)), int(scales[b] * F32(h))
        for pp in range(num_box):
            p = blob[pp * per_box:(pp + 1) * per_box].reshape(per_box, -1)
            bias_w, bias_h = biases[2 * mask[pp + b * num_box]:][:2]
            cls = p[5:]
            class_index = cls.argmax(axis=0)  # the first maximum, as ncnn's scan
            class_score = cls[class_index, np.arange(h * w)]
            # (ncnn's parentheses: 1 / (1 + e^-obj * (1 + e^-cls)), not the product of two
            # sigmoids)
            confidence = F32(1) / fma(libm_expf(-p[4]), F32(1) + libm_expf(-class_score),
                                      F32(1))
            keep = np.nonzero(confidence >= threshold)[0]
            j, i = (keep % w).astype(F32), (keep // w).astype(F32)
            cx = (j + sigmoid(p[0, keep])) / F32(w)
            cy = (i + sigmoid(p[1, keep])) / F32(h)
            bw = libm_expf(p[2, keep]) * bias_w / F32(net_w)
            bh = libm_expf(p[3, keep]) * bias_h / F32(net_h)
            boxes.append(np.stack([cx - bw * F32(0.5), cy - bh * F32(0.5),
                                   cx + bw * F32(0.5), cy + bh * F32(0.5)], axis=1))
            scores.append(confidence[keep])
            areas.append(bw * bh)
            labels.append(class_index[keep])
    scores, boxes = np.concatenate(scores), np.concatenate(boxes)
    areas, labels = np.concatenate(areas), np.concatenate(labels)
    order = qsort_descent(scores)
    picked = order[nms_sorted(boxes[order], areas[order], nms_threshold, False)]
    return _rows(labels[picked] + 1, scores[picked], boxes[picked])


def to_gluoncv(rows, width, height):
    """ncnn's rows ``[label, score, x1, y1, x2, y2]`` (label 1..C, corners relative to the
    input) in GluonCV's form: (class ids (N, 1) from 0, scores (N, 1), boxes (N, 4) in
    pixels of a ``width`` x ``height`` input), what GluonCV's VOC metric takes."""
    rows = np.asarray(rows, F32).reshape(-1, 6)
    scale = np.array([width, height, width, height], F32)
    return rows[:, :1] - 1, rows[:, 1:2], rows[:, 2:] * scale


def iou(box, boxes):
    """IoU (float64) of one corner box with each of ``boxes``."""
    box, boxes = np.asarray(box, np.float64), np.asarray(boxes, np.float64).reshape(-1, 4)
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0,
                     None)
    inter = width * height
    union = (box[2] - box[0]) * (box[3] - box[1]) + \
        (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(union > 0, inter / union, 0.0)


CLOSE_IOU = 0.99  # pairs this close are made first (the same box, up to rounding)
# Two overlapping boxes whose scores agree this closely may come out of NMS either way
# (scores a few ulps apart order differently): a pair of them is a *tie*, not a wrong box.
TIE_SCORE = 1e-5


def match(reference, measured, threshold, margin=SCORE_LSB, pair_iou=0.5, cap=None):
    """Pair the rows of ``measured`` with those of ``reference`` (same label, highest
    scores first; first at IoU >= CLOSE_IOU, the rest at the best IoU >= ``pair_iou``; a
    pair below CLOSE_IOU with scores within TIE_SCORE is a *tie*, kept out of the IoU
    figures). A row left over is *missing* (reference only) or *extra* (measured only),
    unless its score lies within ``margin`` of the cut: the decoder's ``threshold``, or,
    when a side holds ``cap`` rows (the decoder's keep_top_k), the lowest score kept there,
    where either side may legitimately keep it (*borderline*)."""
    reference = np.asarray(reference, np.float64).reshape(-1, 6)
    measured = np.asarray(measured, np.float64).reshape(-1, 6)
    cut = threshold
    for rows in (reference, measured):
        if cap and len(rows) >= cap:
            cut = max(cut, float(rows[:, 1].min()))
    free = np.ones(len(measured), bool)
    pairs = {}
    order = np.argsort(-reference[:, 1], kind='stable')
    for least in (CLOSE_IOU, pair_iou):
        for k in order:
            if k in pairs:
                continue
            candidates = np.nonzero(free & (measured[:, 0] == reference[k, 0]))[0]
            if not len(candidates):
                continue
            overlaps = iou(reference[k, 2:], measured[candidates, 2:])
            if np.max(overlaps) >= least:
                best = candidates[int(np.argmax(overlaps))]
                free[best] = False
                pairs[k] = (best, float(np.max(overlaps)))
    score_diffs = [abs(float(measured[best, 1] - reference[k, 1]))
                   for k, (best, _) in pairs.items()]
    ties = sum(1 for (_, overlap), diff in zip(pairs.values(), score_diffs)
               if overlap < CLOSE_IOU and diff <= TIE_SCORE)
    ious = [overlap for (_, overlap), diff in zip(pairs.values(), score_diffs)
            if overlap >= CLOSE_IOU or diff > TIE_SCORE]
    unpaired = reference[[k for k in range(len(reference)) if k not in pairs], 1]
    borderline = int(np.sum(unpaired - cut <= margin))
    leftover = measured[free, 1]
    extra_borderline = int(np.sum(leftover - cut <= margin))
    return {'reference': int(len(reference)), 'measured': int(len(measured)),
            'matched': len(pairs), 'ties': ties, 'missing': int(len(unpaired)) - borderline,
            'extra': int(len(leftover)) - extra_borderline,
            'borderline': borderline + extra_borderline,
            'min_iou': min(ious, default=1.0), 'mean_iou': float(np.mean(ious)) if ious else 1.0,
            'max_score_diff': max(score_diffs, default=0.0),
            'max_score_lsb': max(score_diffs, default=0.0) / SCORE_LSB}


def merge_matches(entries):
    """One summary of per-sample ``match`` results."""
    total = {key: sum(e[key] for e in entries)
             for key in ('reference', 'measured', 'matched', 'ties', 'missing', 'extra',
                         'borderline')}
    matched = [e for e in entries if e['matched'] > e['ties']]
    total['min_iou'] = min((e['min_iou'] for e in matched), default=1.0)
    total['mean_iou'] = (sum(e['mean_iou'] * (e['matched'] - e['ties']) for e in matched)
                         / max(total['matched'] - total['ties'], 1)) if matched else 1.0
    total['max_score_diff'] = max((e['max_score_diff'] for e in entries), default=0.0)
    total['max_score_lsb'] = total['max_score_diff'] / SCORE_LSB
    return total


DECODERS = {'DetectionOutput', 'Yolov3DetectionOutput'}


def _reshape(x, params):
    # ncnn's ids: 0=w, 1=h, 11=d, 2=c; the ones present give the shape, outermost first
    return x.reshape([int(params[k]) for k in (2, 11, 1, 0) if k in params])


def _crop(x, params):
    index = [slice(None)] * x.ndim
    for start, end, axis in zip(params[9], params[10], params[11]):
        index[int(axis)] = slice(int(start), int(end))
    return x[tuple(index)]


def _permute(x, params):
    order = int(params.get(0, 0))
    if order not in (0, 1) or x.ndim not in (2, 3):
        raise ValueError(f"no numpy reference of ncnn Permute order_type {order} on "
                         f"{x.ndim}-D blobs")
    return x if order == 0 else np.swapaxes(x, -1, -2)


def _binary(inputs, params):
    a = inputs[0]
    b = F32(params.get(2, 0.0)) if int(params.get(1, 0)) else inputs[1]
    return {0: np.add, 1: np.subtract, 2: np.multiply, 3: np.divide, 4: np.maximum,
            5: np.minimum}[int(params.get(0, 0))](a, b).astype(F32)


# the fp32 layers a decoder's inputs may pass through after the heads (the YOLOv3 rows for
# DetectionOutput): ncnn type -> (inputs (float32 arrays, ncnn's (c, h, w) order), params)
FP32_LAYERS = {
    'Reshape': lambda inputs, params: _reshape(inputs[0], params),
    'Permute': lambda inputs, params: _permute(inputs[0], params),
    'Crop': lambda inputs, params: _crop(inputs[0], params),
    'Sigmoid': lambda inputs, params: F32(1) / (F32(1) + expf(-inputs[0])),
    'BinaryOp': _binary,
    'Concat': lambda inputs, params: np.concatenate(inputs, axis=int(params.get(0, 0))),
}


def fp32_layer(kind, params, inputs):
    """One fp32 ncnn layer between the heads and the decoder, in float32 numpy (its sigmoid
    correctly rounded: within an ulp or so of ncnn's)."""
    if kind not in FP32_LAYERS:
        raise ValueError(f"no numpy reference of ncnn layer {kind} before a decoder")
    return FP32_LAYERS[kind]([np.asarray(x, F32) for x in inputs], params)


def centernet_decode(heatmap, wh, reg, topk=100, scale=4.0, width=None, height=None):
    """GluonCV's CenterNet decoding of one sample's heads (what an app does after the ncnn
    model, which stops at them): heatmap (C, H, W) after its sigmoid, wh and reg (2, H, W).
    Peaks: the heatmap where it equals its 3x3 max pooling (zero elsewhere); the ``topk``
    highest over classes and cells; each box centred on its cell plus the offset, sized by
    wh, times ``scale`` (the output stride). Rows ``[label, score, x1, y1, x2, y2]`` (label
    1..C), corners divided by the input ``width`` / ``height`` when given."""
    heatmap = np.asarray(heatmap, F32)
    classes, rows, cols = heatmap.shape
    padded = np.pad(heatmap, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    pooled = np.max([padded[:, dy:dy + rows, dx:dx + cols] for dy in range(3)
                     for dx in range(3)], axis=0)
    peaks = np.where(pooled == heatmap, heatmap, F32(0)).reshape(-1)
    order = np.argsort(-peaks, kind='stable')[:topk]
    label, cell = order // (rows * cols), order % (rows * cols)
    y, x = cell // cols, cell % cols
    wh = np.asarray(wh, F32).reshape(2, -1)[:, cell]
    reg = np.asarray(reg, F32).reshape(2, -1)[:, cell]
    cx, cy = x.astype(F32) + reg[0], y.astype(F32) + reg[1]
    boxes = np.stack([cx - wh[0] / 2, cy - wh[1] / 2, cx + wh[0] / 2, cy + wh[1] / 2],
                     axis=1) * F32(scale)
    if width is not None:
        boxes = boxes / np.array([width, height, width, height], F32)
    return np.concatenate([(label + 1)[:, None].astype(F32), peaks[order][:, None],
                           boxes.astype(F32)], axis=1)


def detector_layer(manifest):
    """The manifest entry of the export's detection layer, or None."""
    return next((layer for layer in manifest['layers'] if layer['kind'] in DECODERS), None)


def decode(kind, params, inputs):
    """ncnn's decoding of layer ``kind`` for one sample. inputs: the layer's input blobs in
    order, each a numpy array (SSD's confidence already through ncnn's Softmax)."""
    if kind == 'DetectionOutput':
        return detection_output(*inputs, params)
    return yolov3_detection_output(inputs, params)
