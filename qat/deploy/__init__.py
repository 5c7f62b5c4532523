"""Deployment: trace a converted net, fold BN, write Caffe, the ncnn table and ncnn fp32/int8
models, and verify them with the real ncnn runtime.

    graph.trace -> ir.Graph -> caffe.write_caffe / table.render_table / ncnn.render
    export (all of them, atomically) ; verify (ncnn runtime vs the simulation)

Every op, its ncnn and Caffe form and its simulation: the op table, ``optable``. A GluonCV
detector's decoding becomes ncnn's DetectionOutput (a YOLOv3's through a few fp32 layers), or
Yolov3DetectionOutput on request (``optable.detection``); ``detection`` holds their numpy
reference.
"""
from . import caffe, detection, ncnn, optable, table, winograd
from .export import WINOGRAD_POLICIES, export, winograd_guards
from .graph import ExportError, trace
from .optable.detection import YOLO_DECODERS
from .verify import DETECTION_THRESHOLDS, THRESHOLDS, format_report, verify

__all__ = ['caffe', 'detection', 'ncnn', 'optable', 'table', 'winograd', 'WINOGRAD_POLICIES',
           'export', 'winograd_guards', 'ExportError', 'trace', 'DETECTION_THRESHOLDS',
           'THRESHOLDS', 'YOLO_DECODERS', 'format_report', 'verify']
