"""Importers: a model file (MXNet symbol, ONNX, Caffe, ncnn fp32) -> a Gluon HybridBlock of
standard Gluon layers (``graph.GraphNet``), named after the source layers, that
``convert_model``, calibration, QAT and ``qat.deploy.export`` take like any Gluon net.

``IMPORTERS`` is the registry: file suffix -> (reader(path, weights=None) -> GraphNet,
the weights file found next to a model file, what the format is). ``import_model`` picks the
reader from the suffix.
"""
import os

from . import caffe, ncnn, onnx, symbol
from .graph import GraphNet, ModelFileError, UnsupportedLayerError

__all__ = ['IMPORTERS', 'GraphNet', 'ModelFileError', 'UnsupportedLayerError', 'import_model',
           'importer_of', 'weights_of']

# suffix -> (reader, weights file next to the model file (None: one file), description)
IMPORTERS = {
    symbol.SUFFIX: (symbol.read, symbol.weights_next_to,
                    'MXNet symbol + params (HybridBlock.export)'),
    onnx.SUFFIX: (onnx.read, None, 'ONNX'),
    caffe.SUFFIX: (caffe.read, caffe.weights_next_to, 'Caffe .prototxt + .caffemodel'),
    ncnn.SUFFIX: (ncnn.read, ncnn.weights_next_to, 'ncnn fp32 .param + .bin'),
}


def importer_of(path):
    """The IMPORTERS suffix of ``path`` (None when it names no model file we read)."""
    return next((suffix for suffix in IMPORTERS if path.lower().endswith(suffix)), None)


def weights_of(path, weights=None):
    """The weights file of model file ``path``: ``weights`` when given, else the one next to
    it (None for one-file formats)."""
    finder = IMPORTERS[importer_of(path)][1]
    return weights or (finder(path) if finder else None)


def import_model(path, weights=None):
    """The GraphNet of the model file ``path`` (its weights from ``weights``, default: the
    file next to it); a suffix we do not read, a missing file or an unsupported layer is a
    ModelFileError naming the file."""
    suffix = importer_of(path)
    if suffix is None:
        raise ModelFileError(f"{path}: not a model file we import; valid suffixes: "
                             f"{', '.join(IMPORTERS)}")
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file")
    return IMPORTERS[suffix][0](path, weights)
