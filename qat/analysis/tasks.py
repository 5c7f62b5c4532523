"""What the analysis tools measure on a net: the outputs compared with float, and the score.

* ``Classification``: the network output (class scores) is compared; the score is top-1 (%)
  against (N,) class labels.
* ``Detection`` (GluonCV's SSD, YOLOv3 and CenterNet): the raw head outputs are compared (the
  prediction convolutions that the decoding reads: the decoded boxes of two nets cannot be
  compared element by element, and the heads are what the int8 model computes); the score
  is VOC07 mAP (%, GluonCV's metric) of the decoded detections against label rows
  ``[xmin, ymin, xmax, ymax, class, difficult]`` per image ((B, M, 6) batches, -1 padding).

Without labels the score is the agreement with float, ``agreement``: 100 x the mean
per-sample cosine similarity of the compared outputs (a budget of 0.1 points keeps the
cosine >= 0.999).

A task runs inside ``qat.modes.deployed``, imperatively when its ``imperative`` says so (a
detector's heads are read with forward hooks). ``task_for(net)`` picks the task of a net;
``scorer`` is the score both with and without labels.
"""
import numpy as np

from ..metrics import cosine_similarity, top1
from ..modes import quantized_only
from ..nn import quant_blocks, walk


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


class Classification:
    """Class scores compared, top-1 accuracy (%) scored."""

    name = 'top-1 accuracy'
    imperative = False  # (the net may run its hybridized graph)

    def run(self, net, x):
        """(compared outputs (N, -1) numpy, what ``score`` reads) of one forward on ``x``."""
        out = _first(net(x)).asnumpy()
        return out.reshape(len(out), -1), out

    def score(self, decoded, labels):
        """Top-1 (%) of the per-batch outputs ``decoded`` against per-batch ``labels``."""
        return 100.0 * top1(np.concatenate(decoded),
                            np.concatenate([np.asarray(y).reshape(-1) for y in labels]))

    def groups(self, net):
        """Layers tried together by mixed precision: none for a classifier."""
        return {}


def voc07_metric(classes):
    """GluonCV's VOC07 mAP metric (IoU 0.5) over ``classes`` names."""
    from gluoncv.utils.metrics.voc_detection import VOC07MApMetric
    return VOC07MApMetric(iou_thresh=0.5, class_names=list(classes))


def add_detections(metric, ids, scores, boxes, labels):
    """Add a batch of detections (GluonCV's (B, K, 1) ids and scores, (B, K, 4) pixel boxes)
    and its (B, M, 6) label rows to a VOC metric."""
    labels = np.asarray(labels.asnumpy() if hasattr(labels, 'asnumpy') else labels)
    metric.update(boxes, ids, scores, labels[:, :, :4], labels[:, :, 4:5], labels[:, :, 5:6])


def head_blocks(net):
    """The blocks whose outputs a GluonCV detector decodes: SSD's class and box predictors,
    YOLOv3's prediction convolutions (in output order), CenterNet's heatmap, size and offset
    heads; None for other nets."""
    from gluoncv.model_zoo.center_net.center_net import CenterNet
    from gluoncv.model_zoo.ssd import SSD
    from gluoncv.model_zoo.yolo import YOLOV3
    if isinstance(net, SSD):
        return list(net.class_predictors) + list(net.box_predictors)
    if isinstance(net, YOLOV3):
        return [output.prediction for output in net.yolo_outputs]
    if isinstance(net, CenterNet):
        return list(net.heads)
    return None


class Detection:
    """Head outputs compared, VOC07 mAP (%) of the decoded detections scored."""

    name = 'VOC07 mAP'
    imperative = True  # (the heads are read with forward hooks)

    def __init__(self, net):
        self.heads = head_blocks(net)
        if self.heads is None:
            raise ValueError(f"{net.name} is not a GluonCV SSD or YOLOv3")
        self.classes = tuple(net.classes)

    def run(self, net, x):
        seen = {}
        hooks = [head.register_forward_hook(
            lambda _, inputs, out, k=k: seen.setdefault(k, out))
            for k, head in enumerate(self.heads)]
        try:
            ids, scores, boxes = net(x)
        finally:
            for hook in hooks:
                hook.detach()
        compared = np.concatenate([seen[k].asnumpy().reshape(len(x), -1)
                                   for k in range(len(self.heads))], axis=1)
        count = len(x)  # (CenterNet's ids and scores are (B, K): GluonCV's metric takes 3-D)
        return compared, (ids.asnumpy().reshape(count, -1, 1),
                          scores.asnumpy().reshape(count, -1, 1), boxes.asnumpy())

    def score(self, decoded, labels):
        metric = voc07_metric(self.classes)
        for (ids, scores, boxes), y in zip(decoded, labels):
            add_detections(metric, ids, scores, boxes, y)
        return 100.0 * float(metric.get()[1][-1])

    def groups(self, net):
        """{'heads': the quantized layers of the heads}: kept in higher precision together
        is one of the steps mixed precision tries."""
        inside = {id(b) for head in self.heads for b in [head] + [c for *_, c in walk(head)]}
        names = [block.name for _, block in quant_blocks(net) if id(block) in inside]
        return {'heads': tuple(names)} if names else {}


def task_for(net):
    """``Detection`` for a GluonCV SSD / YOLOv3, ``Classification`` otherwise."""
    return Detection(net) if head_blocks(net) is not None else Classification()


AGREEMENT = 'agreement with float (100 x cosine)'  # the score's name without labels


def agreement(reference, compared):
    """100 x the mean per-sample cosine similarity of ``compared`` outputs to the
    ``reference`` ones (lists of per-batch (N, -1) arrays): the score without labels."""
    return 100.0 * float(np.mean(np.concatenate([
        cosine_similarity(ref, ours) for ref, ours in zip(reference, compared)])))


def scorer(task, net, batches, labels):
    """(metric name, score()) of ``net`` on ``batches`` with its current modes (call both
    inside ``qat.modes.deployed``): the task's score with ``labels`` (per batch); without,
    the agreement of the compared outputs with the float net's, read now."""
    if labels is not None:
        return task.name, lambda: task.score([task.run(net, x)[1] for x in batches], labels)
    with quantized_only(net, ()):
        reference = [task.run(net, x)[0] for x in batches]
    return AGREEMENT, lambda: agreement(reference, [task.run(net, x)[0] for x in batches])
