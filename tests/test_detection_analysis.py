"""Sensitivity and automatic mixed precision on GluonCV detectors (``qat.analysis.tasks``).

Independent side: the head outputs read in the test with its own forward hooks and modes
set by hand, cosines in numpy, mAP with GluonCV's VOC07MApMetric fed directly. Labels are
the float net's own confident detections (float mAP 100 %), so that a quantization error
shows as a drop. Tolerances: METRIC_ATOL (float64 sums of the same float32 tensors).
"""
import mxnet as mx
import numpy as np
import pytest
from gluoncv.utils.metrics.voc_detection import VOC07MApMetric

import qat
from qat.analysis import mixed_precision as mp, sensitivity as sens, tasks
from qat.modes import DEPLOYED, temporary_mode

from .test_detection import calibrated_detector, tiny_ssd, tiny_yolo

METRIC_ATOL = 1e-9
SCORE = 0.3  # the float net's detections above it are the labels


def _heads(net):
    return tasks.head_blocks(net)


def _forward(net, x, quantized):
    """(head outputs (N, -1), (ids, scores, boxes)) with the blocks ``quantized(block)``
    quantized, as deployed, read with the test's own hooks."""
    seen = {}
    hooks = [h.register_forward_hook(lambda _, i, o, k=k: seen.setdefault(k, o.asnumpy()))
             for k, h in enumerate(_heads(net))]
    with temporary_mode(net, imperative=True, quantize=quantized, **DEPLOYED):
        ids, scores, boxes = net(x)
    for hook in hooks:
        hook.detach()
    heads = np.concatenate([seen[k].reshape(len(x), -1) for k in sorted(seen)], axis=1)
    return heads, (ids.asnumpy(), scores.asnumpy(), boxes.asnumpy())


def _self_labels(net, batches):
    labeled = []
    for x in batches:
        _, (ids, scores, boxes) = _forward(net, x, lambda b: False)
        rows = -np.ones((len(x), ids.shape[1], 6), np.float32)
        for k in range(len(x)):
            keep = (scores[k, :, 0] > SCORE) & (ids[k, :, 0] >= 0)
            rows[k, :keep.sum(), :4] = boxes[k, keep]
            rows[k, :keep.sum(), 4] = ids[k, keep, 0]
            rows[k, :keep.sum(), 5] = 0
        labeled.append((x, rows))
    assert sum(int((y[:, :, 4] >= 0).sum()) for _, y in labeled) >= 3  # not vacuous
    return labeled


def _map(net, labeled, quantized):
    metric = VOC07MApMetric(iou_thresh=0.5, class_names=list(net.classes))
    for x, y in labeled:
        _, (ids, scores, boxes) = _forward(net, x, quantized)
        metric.update(boxes, ids, scores, y[:, :, :4], y[:, :, 4:5], y[:, :, 5:6])
    return 100.0 * metric.get()[1][-1]


def _cosine(net, batches, quantized):
    cos = []
    for x in batches:
        ref, _ = _forward(net, x, lambda b: False)
        out, _ = _forward(net, x, quantized)
        ref, out = ref.astype(np.float64), out.astype(np.float64)
        cos.append((ref * out).sum(1) / np.sqrt((ref * ref).sum(1) * (out * out).sum(1)))
    return float(np.concatenate(cos).mean())


def _detector(make, size, fragile=None):
    """A calibrated detector and a few batches; ``fragile``: the name of a layer set to 2
    bits (its range kept: a threshold does not depend on the width)."""
    net, data = calibrated_detector(make, size)
    rs = np.random.RandomState(7)
    batches = data + [mx.nd.array(rs.normal(0, 1, data[0].shape)) for _ in range(2)]
    if fragile:
        block = dict((b.name, b) for _, b in qat.quant_blocks(net))[fragile]
        block.config = block.config.updated(weight_bits=2, input_bits=2)
    return net, batches


@pytest.mark.parametrize('make, size', [(tiny_ssd, 64), (tiny_yolo, 72)],
                         ids=['ssd', 'yolo3'])
def test_detector_sensitivity_compares_the_heads_and_scores_map(make, size):
    net, batches = _detector(make, size)
    labeled = _self_labels(net, batches)
    task = tasks.task_for(net)
    assert isinstance(task, tasks.Detection)
    heads = task.groups(net)['heads']
    assert len(heads) == (4 if make is tiny_ssd else 3)  # (2 maps x class + box; 3 outputs)
    rows = sens.sensitivity(net, labeled)
    assert rows[0]['metric'] == 'VOC07 mAP'
    assert rows[0]['float_accuracy'] == pytest.approx(_map(net, labeled, lambda b: False),
                                                      abs=METRIC_ATOL)
    assert rows[0]['float_accuracy'] > 99.0  # its own detections
    by_name = {row['layer']: row for row in rows}
    assert by_name['heads']['layers'] == heads and by_name['heads']['layer_cosine'] is None
    blocks = {b.name: b for _, b in qat.quant_blocks(net)}
    for name in [rows[0]['layer'], rows[-2]['layer'], 'heads']:
        inside = set(by_name[name]['layers'])
        quantized = lambda b, inside=inside: b.name in inside
        assert by_name[name]['output_cosine'] == pytest.approx(
            _cosine(net, batches, quantized), abs=METRIC_ATOL), name
        assert by_name[name]['accuracy'] == pytest.approx(_map(net, labeled, quantized),
                                                          abs=METRIC_ATOL), name
    assert sorted(row['rank'] for row in rows) == list(range(1, len(blocks) + 2))
    text = sens.format_sensitivity(rows)
    assert 'VOC07 mAP (%)' in text and '| heads |' in text


def test_detector_mixed_precision_with_map_and_from_the_heads_alone(tmp_path):
    net, batches = _detector(tiny_ssd, 64, fragile='ssd0_tinyfeatures0_conv2')
    labeled = _self_labels(net, batches)
    everything = _map(net, labeled, lambda b: True)
    assert everything < 90.0  # the 2-bit layer hurts
    result = mp.mixed_precision(net, labeled, budget=5.0)
    assert result['metric'] == 'VOC07 mAP' and result['met']
    kept = set(result['layers'])
    assert 'ssd0_tinyfeatures0_conv2' in kept
    assert {b.name for _, b in qat.quant_blocks(net) if not b.mode['quantize']} == kept
    assert 100.0 - _map(net, labeled, lambda b: b.mode['quantize']) <= 5.0
    assert result['steps'][0]['accuracy'] == pytest.approx(everything, abs=METRIC_ATOL)
    # without labels: the agreement of the heads with float
    for _, block in qat.quant_blocks(net):
        block.set_mode(quantize=True)
    heads_only = mp.mixed_precision(net, batches, budget=0.5)
    assert heads_only['metric'] == tasks.AGREEMENT
    assert heads_only['steps'][0]['accuracy'] == pytest.approx(
        100.0 * _cosine(net, batches, lambda b: True), abs=1e-6)
    assert heads_only['met'] and 'ssd0_tinyfeatures0_conv2' in heads_only['layers']
    assert 100.0 * (1 - _cosine(net, batches, lambda b: b.mode['quantize'])) <= 0.5
    # the heads as one step: ranked first, the whole group is promoted together
    grouped = mp.mixed_precision(net, labeled, budget=100.0, ranking=['heads'])
    for _, block in qat.quant_blocks(net):
        block.set_mode(quantize=True)
    forced = mp.mixed_precision(net, labeled, budget=0.0, ranking=['heads'], action='bits')
    assert forced['steps'][1]['added'] == 'heads'
    assert forced['steps'][1]['layers'] == tasks.Detection(net).groups(net)['heads']
    assert grouped['steps'][0]['added'] is None and len(grouped['steps']) == 1
    qat.freeze_bn(net)
    paths = qat.export(net, str(tmp_path), (3, 64, 64), detection={'confidence_threshold': 0.5})
    report = qat.verify(net, str(tmp_path), batches[:1], packing=False)
    assert report['passed'], qat.deploy.format_report(report)
