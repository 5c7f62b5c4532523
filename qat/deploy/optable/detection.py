"""GluonCV's box decoding and NMS -> ncnn's own detection layers.

A detector is traced in its inference form. Its *raw predictions* are the last nodes that
carry learned values (the cut); every op node that no raw prediction needs is the decoding
(anchor generation, box decoding, class decoding, NMS, the final slices), and that whole part
of the graph becomes ncnn's detection layer reading the raw predictions:

* SSD (a ``_contrib_box_decode`` node: GluonCV's ``SSD``): the raw class predictions
  (A, K) go through ncnn's Softmax over the K = classes + 1 scores (GluonCV's
  ``softmax(cls_preds, axis=-1)``); the anchors, which depend only on the input size,
  become a MemoryData of shape (2, A * 4): row 0 the priors as corners normalized by the
  input width / height, row 1 the box coder's stds (GluonCV's (0.1, 0.1, 0.2, 0.2)) as
  per-prior variances; then ``DetectionOutput(location (A, 4), confidence, priors)``.
* YOLOv3 (GluonCV's ``YOLOOutputV3`` blocks), by default (``yolo_decoder``
  'DetectionOutput'): each prediction conv (A * (5 + C), H, W) laid out as one row per
  (anchor, cell), sigmoids and the class scores ``sigmoid(class) * sigmoid(objectness)`` in
  fp32 ncnn layers, priors carrying the cells, anchors and strides, and DetectionOutput:
  GluonCV's decoding (every class of a box, NMS per class). With 'Yolov3DetectionOutput':
  ncnn's own YOLOv3 layer over the prediction convs (anchors as ``biases``, one mask entry
  per anchor, strides as ``anchors_scale``), which keeps each box's best class and suppresses
  across classes.
* CenterNet (GluonCV's ``CenterNet``): its peak search (max pooling compared with the
  heatmap, top-k, gathers) has no ncnn layer, so the model stops at the heads: the heatmap
  after its sigmoid, the sizes and the offsets become the model's three outputs, decoded by
  the application as ``qat.deploy.detection.centernet_decode`` does.

The SSD and YOLOv3 models output rows ``[label, score, x1, y1, x2, y2]`` with label 1..C
(GluonCV's class id + 1) and corners relative to the input (0..1), like the models of ncnn's
examples. Thresholds come from the net (box_nms' ``overlap_thresh``, ``valid_thresh``,
``topk``, the post-NMS slice) unless ``export(..., detection={...})`` overrides them
(``DETECTION_OPTIONS``, ``yolo_decoder``).
"""
import mxnet as mx
import numpy as np

from ..ir import ExportError
from ...nn import walk
from .base import refuse

# export(detection=...) keys, by layer: what a user may set on the deployed decoder
DETECTION_OPTIONS = {
    'DetectionOutput': ('confidence_threshold', 'nms_threshold', 'nms_top_k', 'keep_top_k'),
    'Yolov3DetectionOutput': ('confidence_threshold', 'nms_threshold'),
}
# export(detection={'yolo_decoder': ...}): how a YOLOv3 is decoded in ncnn
YOLO_DECODERS = ('DetectionOutput', 'Yolov3DetectionOutput')


def _ancestors(t, roots):
    """Indices of ``roots`` and every node they read, transitively."""
    seen, stack = set(), list(roots)
    while stack:
        index = stack.pop()
        if index in seen:
            continue
        seen.add(index)
        stack.extend(source for source, *_ in t.nodes[index].get('inputs', []))
    return seen


def _decoding_region(t, cut, what):
    """The op nodes that the cut nodes do not need; every graph output must be among them."""
    needed = _ancestors(t, cut)
    region = {index for index, node in enumerate(t.nodes)
              if node['op'] != 'null' and index not in needed}
    stray = [t.nodes[h]['name'] for h in t.heads if h not in region]
    if stray:
        raise ExportError(f"cannot export {what}: the net's outputs {stray} are not part of "
                          f"its decoding (only the detections can be exported)")
    return region


def _nms(t, region):
    """(overlap threshold, valid threshold, topk, post-NMS count) of the region's box_nms;
    (1.0 (nothing suppressed), 0.0, -1, -1) without NMS."""
    nms = [i for i in region if t.nodes[i]['op'] == '_contrib_box_nms']
    if len(nms) > 1:
        raise refuse(t, t.nodes[nms[1]], "more than one box_nms in the decoding")
    if not nms:
        return 1.0, 0.0, -1, -1
    attrs = t.nodes[nms[0]].get('attrs', {})
    post = -1
    for user in t.consumers.get(nms[0], []):
        user_attrs = t.nodes[user].get('attrs', {})
        if t.nodes[user]['op'] == 'slice_axis' and int(user_attrs.get('axis', 0)) == 1:
            post = int(user_attrs['end'])
    return (float(attrs.get('overlap_thresh', 0.5)), float(attrs.get('valid_thresh', 0)),
            int(attrs.get('topk', -1)), post)


def _evaluate(t, index):
    """The value (numpy) of node ``index`` for a zero input: for nodes that depend on the
    input's shape only (SSD's anchors)."""
    symbol = t.op_output(t.key(index))
    inputs = [mx.sym.var(name) for name in t.input_names]
    block = mx.gluon.SymbolBlock(symbol, inputs, params=t.net.collect_params())
    zeros = [mx.nd.zeros((1,) + t.input_shape) for _ in inputs]
    return block(*zeros).asnumpy()


def _yolo_decoder(t):
    """The export's ``yolo_decoder`` option (default: DetectionOutput, GluonCV's decoding)."""
    kind = (t.detection_options or {}).get('yolo_decoder', YOLO_DECODERS[0])
    if kind not in YOLO_DECODERS:
        raise ExportError(f"detection option yolo_decoder={kind!r}: valid: {list(YOLO_DECODERS)}")
    return kind


def _options(t, kind, defaults):
    """The decoder's parameters: ``defaults`` with the export's ``detection`` overrides."""
    given = {k: v for k, v in (t.detection_options or {}).items() if k != 'yolo_decoder'}
    unknown = set(given) - set(DETECTION_OPTIONS[kind])
    if unknown:
        raise ExportError(f"unknown detection option(s) {sorted(unknown)} for {kind}; valid: "
                          f"{list(DETECTION_OPTIONS[kind])}")
    for key, value in given.items():
        whole = key.endswith('top_k')
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (whole and (value != int(value) or value < 1)) or \
                (not whole and not 0 <= value <= 1):
            raise ExportError(f"detection option {key}={value!r}: must be "
                              f"{'a whole number >= 1' if whole else 'a number in [0, 1]'}")
    return dict(defaults, **{key: int(value) if key.endswith('top_k') else float(value)
                             for key, value in given.items()})


# ---- SSD ------------------------------------------------------------------------------------
def _analyse_ssd(t, decode):
    node = t.nodes[decode]
    attrs = node.get('attrs', {})
    if float(attrs.get('clip', -1)) > 0:
        raise refuse(t, node, "box_decode with clip (ncnn's DetectionOutput does not clip)")
    box, anchors = (source for source, *_ in node['inputs'][:2])
    boxes = t.shape(box)[1]
    softmax = [i for i, n in enumerate(t.nodes) if n['op'] == 'softmax'
               and t.shape(i)[:2] == (1, boxes) and len(t.shape(i)) == 3]
    if len(softmax) != 1:
        raise refuse(t, node, f"expected one softmax over the class scores of the {boxes} "
                              f"anchors, found {len(softmax)}")
    softmax = softmax[0]
    if int(t.nodes[softmax].get('attrs', {}).get('axis', -1)) % 3 != 2:
        raise refuse(t, t.nodes[softmax], "the class softmax must be over the last axis")
    cls = t.data_inputs(t.nodes[softmax])[0]
    region = _decoding_region(t, [box, cls], 'the SSD decoding')
    overlap, valid, topk, post = _nms(t, region)
    if any(t.nodes[i]['op'] == '_contrib_box_nms' and t.nodes[i]['attrs'].get(
            'force_suppress') in ('True', '1') for i in region):
        raise refuse(t, node, "box_nms with force_suppress (ncnn's DetectionOutput applies "
                              "NMS per class)")
    # MultiPerClassDecoder's score threshold (scores > thresh)
    greater = [float(t.nodes[i]['attrs']['scalar']) for i in region
               if t.nodes[i]['op'] == '_greater_scalar']
    num_class = t.shape(cls)[2]
    params = _options(t, 'DetectionOutput', {
        'num_class': num_class, 'nms_threshold': overlap,
        'nms_top_k': topk if topk > 0 else boxes,
        'keep_top_k': post if post > 0 else boxes * (num_class - 1),
        'confidence_threshold': max([valid] + greater)})
    params['variances'] = tuple(float(attrs.get(f'std{k}', d))
                                for k, d in enumerate((0.1, 0.1, 0.2, 0.2)))
    params['format'] = attrs.get('format', 'center')
    return {'kind': 'DetectionOutput', 'family': 'ssd', 'region': region, 'box': box,
            'cls': cls,
            'softmax': softmax, 'anchors': anchors, 'params': params}


def _priors(t, anchors, params):
    """(2, A * 4) float32: the anchors as corners relative to the input, then the variances."""
    values = _evaluate(t, anchors).reshape(-1, 4).astype(np.float64)
    if params['format'] == 'center':
        cx, cy, w, h = values.T
        values = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    _, height, width = t.input_shape
    values = values / np.array([width, height, width, height])
    variances = np.tile(np.array(params['variances']), len(values))
    return np.stack([values.reshape(-1), variances]).astype(np.float32)


def _emit_ssd(t, found, index):
    params = found['params']
    t.add('Softmax', found['softmax'], [found['cls']], {'axis': 2})
    priors = _priors(t, found['anchors'], params)
    layer = t.add('MemoryData', found['anchors'], [], {'shape': priors.shape},
                  weights={'data': priors}, name='detection_priors', source='')
    layer.shape = priors.shape
    decoder = {key: params[key] for key in ('num_class', 'nms_threshold', 'nms_top_k',
                                            'keep_top_k', 'confidence_threshold', 'variances')}
    return t.add('DetectionOutput', index, [found['box'], found['softmax'], found['anchors']],
                 decoder, name='detection_out', source='')


# ---- YOLOv3 ---------------------------------------------------------------------------------
def _yolo_outputs(t):
    from gluoncv.model_zoo.yolo.yolo3 import YOLOOutputV3
    blocks = {id(block): block for *_, block in walk(t.net) if isinstance(block, YOLOOutputV3)}
    return list(blocks.values())


def _only_convolution(t, block, what):
    """The one Convolution node of ``block`` (by its name prefix); an ExportError naming
    ``what`` otherwise."""
    found = [i for i, n in enumerate(t.nodes) if n['op'] == 'Convolution'
             and n['name'].startswith(block.prefix)]
    if len(found) != 1:
        raise ExportError(f"cannot export {what}: expected one convolution, found "
                          f"{len(found)}")
    return found[0]


def _analyse_yolo(t, outputs):
    convs, biases, strides = [], [], []
    for block in outputs:
        convs.append(_only_convolution(t, block, f"YOLOv3 output {block.name}'s prediction"))
        biases.extend(block.anchors.data().asnumpy().reshape(-1).tolist())
        strides.append(float(block._stride))
    per_output = {block._num_anchors for block in outputs}
    classes = {block._classes for block in outputs}
    if len(per_output) != 1 or len(classes) != 1:
        raise ExportError(f"cannot export YOLOv3 outputs {[b.name for b in outputs]}: ncnn's "
                          f"Yolov3DetectionOutput needs the same anchors per output and classes "
                          f"everywhere, got {sorted(per_output)} anchors, {sorted(classes)} "
                          f"classes")
    region = _decoding_region(t, convs, 'the YOLOv3 decoding')
    overlap, valid, topk, post = _nms(t, region)
    num_box, num_class = per_output.pop(), classes.pop()
    kind = _yolo_decoder(t)
    if kind == 'Yolov3DetectionOutput':
        params = _options(t, kind, {'confidence_threshold': valid, 'nms_threshold': overlap})
    else:
        boxes = sum(num_box * t.shape(c)[2] * t.shape(c)[3] for c in convs)
        params = _options(t, kind, {
            'nms_threshold': overlap, 'nms_top_k': topk if topk > 0 else boxes,
            'keep_top_k': post if post > 0 else boxes * num_class,
            'confidence_threshold': valid})
    params.update(num_class=num_class, num_box=num_box, biases=tuple(biases),
                  mask=tuple(float(k) for k in range(num_box * len(outputs))),
                  anchors_scale=tuple(strides))
    return {'kind': kind, 'family': 'yolo3', 'region': region, 'convs': convs,
            'params': params}


def _emit_yolo(t, found, index):
    if found['kind'] == 'Yolov3DetectionOutput':
        return t.add('Yolov3DetectionOutput', index, found['convs'], found['params'],
                     name='detection_out', source='')
    return _emit_yolo_per_class(t, found, index)


def _yolo_priors(p, k, height, width, input_shape):
    """(2, A * H * W * 4) float32 priors of YOLOv3 output ``k`` in the rows' order (anchor,
    y, x) for DetectionOutput: each prior is centred on its cell's corner with the anchor's
    size (relative to the input), and its variances (stride / anchor, 1) make ncnn's
    ``var * loc * prior_size + prior_centre``, ``exp(loc) * prior_size`` GluonCV's
    ``(sigmoid + cell) * stride`` and ``exp * anchor``."""
    _, in_h, in_w = input_shape
    stride, count = p['anchors_scale'][k], p['num_box']
    anchors = np.asarray(p['biases'], np.float64).reshape(-1, count, 2)[k]
    y, x = np.mgrid[0:height, 0:width]
    cx = np.broadcast_to(x.reshape(1, -1) * stride / in_w, (count, height * width))
    cy = np.broadcast_to(y.reshape(1, -1) * stride / in_h, (count, height * width))
    w = np.broadcast_to(anchors[:, :1] / in_w, cx.shape)
    h = np.broadcast_to(anchors[:, 1:] / in_h, cx.shape)
    corners = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)
    variances = np.stack([stride / anchors[:, 0:1] + 0 * cx, stride / anchors[:, 1:2] + 0 * cx,
                          np.ones_like(cx), np.ones_like(cx)], axis=-1)
    return np.stack([corners.reshape(-1), variances.reshape(-1)]).astype(np.float32)


def _emit_yolo_per_class(t, found, index):
    """GluonCV's YOLOv3 decoding as ncnn layers feeding DetectionOutput: per output, the
    prediction (A * (5 + C), H, W) laid out as one row per (anchor, cell) (Reshape, Permute,
    Reshape), its x, y, objectness and class columns through Sigmoid (Crop), the class
    scores ``sigmoid(class) * sigmoid(objectness)`` (BinaryOp), the location rows
    ``[sigmoid(x), sigmoid(y), w, h]`` and the confidence rows ``[0, scores]`` (the zero
    column stands in for SSD's background, which DetectionOutput skips); the rows of every
    output concatenated, priors from the anchors (``_yolo_priors``). DetectionOutput then
    decodes and suppresses per class, as GluonCV's box_nms does."""
    p = found['params']
    count, classes = p['num_box'], p['num_class']
    width = 5 + classes
    # the decoding's own nodes carry the new layers' blobs (they get no layer otherwise)
    carriers = iter(sorted(i for i in found['region'] if i != index))

    def add(kind, inputs, params, shape, name, weights=None):
        node = next(carriers)
        layer = t.add(kind, node, inputs, params, weights=weights, name=name, source='')
        layer.shape = shape
        return node
    locations, confidences, priors = [], [], []
    for k, conv in enumerate(found['convs']):
        _, _, height, cells_w = t.shape(conv)
        cells = height * cells_w
        rows = count * cells
        part = f"detection_yolo{k}"
        x = add('Reshape', [conv], {'shape': (count, width, cells)}, (count, width, cells),
                f"{part}_reshape")
        x = add('Permute', [x], {'order': 1}, (count, cells, width), f"{part}_permute")
        x = add('Reshape', [x], {'shape': (rows, width)}, (rows, width), f"{part}_rows")

        def column(start, end, what, source=x):
            crop = add('Crop', [source], {'starts': (start,), 'ends': (end,), 'axes': (1,)},
                       (rows, end - start), f"{part}_{what}")
            return crop
        xy = add('Sigmoid', [column(0, 2, 'xy')], {}, (rows, 2), f"{part}_xy_sigmoid")
        objectness = add('Sigmoid', [column(4, 5, 'objectness')], {}, (rows, 1),
                         f"{part}_objectness_sigmoid")
        scores = add('Sigmoid', [column(5, width, 'classes')], {}, (rows, classes),
                     f"{part}_classes_sigmoid")
        scores = add('BinaryOp', [scores, objectness], {'op': 'mul'}, (rows, classes),
                     f"{part}_scores")
        zeros = add('BinaryOp', [objectness], {'op': 'mul', 'scalar': 0.0}, (rows, 1),
                    f"{part}_background")
        locations.append(add('Concat', [xy, column(2, 4, 'wh')], {'axis': 2}, (rows, 4),
                             f"{part}_location"))
        confidences.append(add('Concat', [zeros, scores], {'axis': 2}, (rows, classes + 1),
                               f"{part}_confidence"))
        priors.append(_yolo_priors(p, k, height, cells_w, t.input_shape))
    total = sum(prior.shape[1] for prior in priors) // 4
    location = add('Concat', locations, {'axis': 1}, (total, 4), 'detection_location')
    confidence = add('Concat', confidences, {'axis': 1}, (total, classes + 1),
                     'detection_confidence')
    prior = np.concatenate(priors, axis=1)
    prior_node = add('MemoryData', [], {'shape': prior.shape}, prior.shape, 'detection_priors',
                     weights={'data': prior})
    decoder = {key: p[key] for key in ('nms_threshold', 'nms_top_k', 'keep_top_k',
                                       'confidence_threshold')}
    decoder.update(num_class=classes + 1, variances=(1.0, 1.0, 1.0, 1.0))
    return t.add('DetectionOutput', index, [location, confidence, prior_node], decoder,
                 name='detection_out', source='')


def _refuse_minimal_opset(t):
    """GluonCV's box decoder spelt in elementary ops (``minimal_opset=True``) is not
    recognized: one clear error instead of one about its first op."""
    from gluoncv.nn.coder import NormalizedBoxCenterDecoder
    for *_, block in walk(t.net):
        if isinstance(block, NormalizedBoxCenterDecoder) and any(
                node['name'].startswith(block.prefix) for node in t.nodes):
            raise ExportError(f"cannot export {block.name}: a box decoder built with "
                              f"minimal_opset=True; build the detector with "
                              f"minimal_opset=False (the same parameters), whose box_decode "
                              f"becomes ncnn's DetectionOutput")


def _centernet_heads(t):
    """GluonCV's CenterNet (None for other nets): its decoding (a peak search over the
    heatmap: 3x3 max pooling compared with the heatmap, top-k, gathers) has no ncnn layer,
    so the export stops at the heads, as ncnn's own CenterNet-style examples do: the model's
    outputs are the heatmap after its sigmoid, the box sizes and the centre offsets, and
    ``qat.deploy.detection.centernet_decode`` decodes them as GluonCV does."""
    from gluoncv.model_zoo.center_net.center_net import CenterNet
    if not isinstance(t.net, CenterNet):
        return None
    if t.net.flip_test:
        raise ExportError(f"cannot export {t.net.name}: CenterNet with flip_test (two passes "
                          f"averaged); build it with flip_test=False")
    heads = list(t.net.heads)
    if len(heads) != 3:
        raise ExportError(f"cannot export {t.net.name}: expected CenterNet's three heads "
                          f"(heatmap, wh, reg), found {len(heads)}")
    convs = [_only_convolution(t, list(head)[-1], f"CenterNet head {head.name}'s last layer")
             for head in heads]
    sigmoid = [i for i in t.consumers.get(convs[0], []) if t.nodes[i]['op'] == 'sigmoid']
    while not sigmoid and len(t.consumers.get(convs[0], [])) == 1:  # (the dequantize)
        convs[0] = t.consumers[convs[0]][0]
        sigmoid = [i for i in t.consumers.get(convs[0], []) if t.nodes[i]['op'] == 'sigmoid']
    if len(sigmoid) != 1:
        raise ExportError(f"cannot export {t.net.name}: no sigmoid after the heatmap head")
    cut = [sigmoid[0]] + convs[1:]
    region = _decoding_region(t, cut, "CenterNet's decoding")
    return {'kind': 'CenterNet', 'family': 'centernet', 'region': region, 'heads': cut,
            'params': {'topk': int(t.net.topk), 'scale': float(t.net.scale)}}


# ---- the pattern ----------------------------------------------------------------------------
def _analyse(t):
    """The tracer's detector (memoized): None for a net without GluonCV decoding."""
    if 'detection' not in t.memo:
        decode = [i for i, n in enumerate(t.nodes) if n['op'] == '_contrib_box_decode']
        outputs = _yolo_outputs(t)
        if len(decode) > 1:
            raise refuse(t, t.nodes[decode[1]], "more than one box_decode")
        if not decode:
            _refuse_minimal_opset(t)
        found = _analyse_ssd(t, decode[0]) if decode else \
            _analyse_yolo(t, outputs) if outputs else _centernet_heads(t)
        if found is not None:
            found['last'] = max(found['region'])
        elif t.detection_options:
            raise ExportError(f"detection options {sorted(t.detection_options)} given, but "
                              f"{t.net.name} has no GluonCV SSD / YOLOv3 decoding")
        t.memo['detection'] = found
    return t.memo['detection']


def match_detection(t, index, node):
    """Every node of the decoding: no layer, until its last node, where the decoder's layers
    are added and every graph output becomes the detection blob."""
    found = _analyse(t)
    if found is None or index not in found['region']:
        return False
    if index == found['last'] and found['family'] == 'centernet':
        for head, cut in zip(t.heads, found['heads']):  # (ids, scores, boxes) -> the heads
            t.blob[head] = t.blob[cut]
    elif index == found['last']:
        layer = (_emit_ssd if found['family'] == 'ssd' else _emit_yolo)(t, found, index)
        layer.shape = None  # one row per detection: known only at run time
        for head in t.heads:
            t.blob[head] = layer.name
    return True


def refuse_decoding(t, index, node):
    """A decoding op outside a recognized GluonCV SSD / YOLOv3 decoding."""
    raise refuse(t, node, "box decoding and NMS are exported only as GluonCV's SSD "
                          "(box_decode) or YOLOv3 (YOLOOutputV3) decoding, which become ncnn's "
                          "DetectionOutput / Yolov3DetectionOutput")


# ---- ncnn -----------------------------------------------------------------------------------
def ncnn_memory_data(layer, graph, int8, guarded, out):
    height, width = layer.params['shape']
    out.raw(layer.weights['data'])  # MemoryData reads raw float32 (no tag)
    return 'MemoryData', [(0, int(width)), (1, int(height))]


def ncnn_detection_output(layer, graph, int8, guarded, out):
    p = layer.params
    return 'DetectionOutput', [(0, p['num_class']), (1, float(p['nms_threshold'])),
                               (2, p['nms_top_k']), (3, p['keep_top_k']),
                               (4, float(p['confidence_threshold']))] + \
        [(5 + k, float(v)) for k, v in enumerate(p['variances'])]


def ncnn_yolov3_detection_output(layer, graph, int8, guarded, out):
    p = layer.params
    return 'Yolov3DetectionOutput', [(0, p['num_class']), (1, p['num_box']),
                                     (2, float(p['confidence_threshold'])),
                                     (3, float(p['nms_threshold'])),
                                     (4, list(p['biases'])), (5, list(p['mask'])),
                                     (6, list(p['anchors_scale']))]

