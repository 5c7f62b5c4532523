"""The model registry: where a float network comes from.

``SOURCES`` maps a source name to (builder, what the model name looks like): GluonCV model
zoo names, ``module:function`` factories and model files (``x-symbol.json``, ``x.onnx``,
``x.prototxt``, ``x.param``: ``qat.importers``, chosen from the suffix, the weights file next
to it or given); ``build`` adds the weights (saved parameters, GluonCV's pretrained files, the
model file's own weights, or a seeded initialization). A name that is not found is one error
listing the closest valid names.
"""
import difflib
import importlib
import inspect
import importlib.util
import json
import os
import re

import mxnet as mx
import numpy as np
from mxnet.gluon import Block

from ..calibration import calibrate
from ..convert import convert_model
from ..errors import UserError, reason
from ..importers import IMPORTERS, ModelFileError, import_model, importer_of, weights_of
from ..modes import freeze_bn


class ModelError(UserError):
    """A model that cannot be built; the message names the model, option or file."""


def _gluoncv(name, kwargs):
    from gluoncv.model_zoo import get_model  # gluoncv is slow to import: only when used
    from gluoncv.model_zoo.model_zoo import _models
    function = _models.get(name.lower())
    if function is not None and not kwargs.get('pretrained') and \
            'pretrained_base' in inspect.signature(function).parameters:
        # a detector's backbone would be downloaded otherwise: only when asked for
        kwargs = dict({'pretrained_base': False}, **kwargs)
    return get_model(name, **kwargs)


def _factory(name, kwargs):
    module, function = name.split(':')
    return getattr(importlib.import_module(module), function)(**kwargs)


def _file(name, kwargs):
    """A model file through ``qat.importers`` (``kwargs``: only ``weights``, its weights
    file when it is not the one next to it)."""
    try:
        return import_model(name, kwargs.get('weights') or None)
    except ModelFileError as err:
        raise ModelError(str(err)) from None


# source -> (builder(name, kwargs) -> Block, the form of a model name)
SOURCES = {
    'gluoncv': (_gluoncv, 'a GluonCV model zoo name, e.g. cifar_resnet20_v1'),
    'factory': (_factory, 'module:function returning a Gluon HybridBlock, e.g. mypkg.nets:build'),
    'file': (_file, f"a model file ({', '.join('x' + s for s in IMPORTERS)}; the weights "
                    f"file next to it unless given)"),
}


def source_of(name):
    """'file' for a model file name (by its suffix), 'factory' for ``module:function``
    names, else 'gluoncv'."""
    if importer_of(name):
        return 'file'
    return 'factory' if ':' in name else 'gluoncv'


def gluoncv_names():
    from gluoncv.model_zoo import get_model_list
    return get_model_list()


def name_problem(source, name, check_module=True):
    """Why ``name`` is not a model of ``source`` (None when it is): an unknown GluonCV name
    with the closest names, a malformed factory, a factory module that is not found, a model
    file that is not there (its weights file is checked by ``build``)."""
    if source == 'file':
        if not importer_of(name):
            return f"not a model file: the name must end in one of {', '.join(IMPORTERS)}"
        if check_module and not os.path.isfile(name):
            return f"file not found: {name}"
        return None
    if source == 'factory':
        if not re.fullmatch(r'[\w.]+:\w+', name):
            return f"a factory is module:function, got {name!r}"
        module = name.split(':')[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if check_module and not found:
            return f"cannot build the factory: module {module!r} not found"
        return None
    names = gluoncv_names()
    if name.lower() in names:
        return None
    close = difflib.get_close_matches(name.lower(), names, n=3)
    return "not a GluonCV model name" + (f" (close: {', '.join(close)})" if close else
                                         " (see gluoncv.model_zoo.get_model_list())")


VECTOR_STARTS = {'gamma': 'ones', 'moving_var': 'ones', 'running_var': 'ones', 'beta': 'zeros',
                 'moving_mean': 'zeros', 'running_mean': 'zeros', 'bias': 'zeros'}


def build(name, kwargs=None, source=None, params=None, pretrained=False, seed=0, ctx=None,
          input_shape=None, label=None, weights=None):
    """The float model ``name`` of ``source`` (default: from the form of the name) called with
    ``kwargs``, its weights from ``params`` (a ``save_parameters`` file), GluonCV's
    ``pretrained`` files, a model file's ``weights`` (default: the file next to it; kwargs
    are not used for files) or a seeded Xavier initialization, on the devices ``ctx``; with
    ``input_shape`` (C, H, W) it runs once so that every shape is known. Block names are the
    same in every process (fresh name counters). Raises ModelError naming what is wrong
    (``label``: how the model is named there, default "the model <name>")."""
    source = source or source_of(name)
    if source not in SOURCES:
        raise ModelError(f"unknown model source {source!r}; valid: {sorted(SOURCES)}")
    kwargs = {'weights': weights} if source == 'file' else dict(kwargs or {})
    if weights and source != 'file':
        raise ModelError(f"{name}: a weights file comes with model files only "
                         f"({', '.join(IMPORTERS)}); use the parameters option instead")
    if pretrained:
        if source != 'gluoncv':
            raise ModelError(f"{name}: pretrained weights come with GluonCV model names only")
        kwargs['pretrained'] = True
    problem = name_problem(source, name)
    if problem:
        raise ModelError(f"{name}: {problem}")
    if source == 'file' and weights_of(name, weights) \
            and not os.path.isfile(weights_of(name, weights)):
        raise ModelError(f"{weights_of(name, weights)}: no such file (the weights of {name}"
                         f"{'' if weights else '; give them with --weights / model.weights'})")
    mx.random.seed(seed)
    try:
        with mx.name.NameManager():
            net = SOURCES[source][0](name, kwargs)
    except (ImportError, AttributeError) as err:
        raise ModelError(f"{name}: cannot build the factory: {err}") from None
    except (TypeError, ValueError) as err:
        raise ModelError(f"{name} with kwargs {json.dumps(kwargs)}: {err}") from None
    if not isinstance(net, Block):
        raise ModelError(f"{name}: the factory returned {type(net).__name__}, not a Gluon "
                         f"Block")
    ctx = ctx or [mx.cpu()]
    if source == 'file':  # the file's own weights, on the devices
        net.collect_params().reset_ctx(ctx)
    if params:
        load_float(net, params, ctx, label or f"the model {name}")
    elif not pretrained and source != 'file':
        for key, param in net.collect_params().items():
            # a SymbolBlock's (a zoo SSD's backbone) parameters carry no initializer, and
            # Xavier cannot start a vector: BN's and biases' usual starts
            suffix = next((s for s in VECTOR_STARTS if key.endswith(s)), None)
            if param.init is None and suffix:
                param.init = VECTOR_STARTS[suffix]
        net.initialize(mx.init.Xavier(), ctx=ctx)
    if input_shape is not None:
        net(mx.nd.zeros((1,) + tuple(input_shape), ctx=ctx[0]))
    return net


def file_preprocess(name, weights=None):
    """What the model file ``name`` says about its input ({'mean', 'norm', 'pixel', 'shape'},
    each when the file holds it: a Caffe transform_param, an ncnn Input layer)."""
    return dict(getattr(_file(name, {'weights': weights}), 'preprocess', {}))


def load_float(net, params, ctx, label):
    """Load float parameters into ``net``; a missing, damaged or mismatched file is a
    ModelError naming the file and the model (``label``)."""
    if not os.path.isfile(params):
        raise ModelError(f"{params}: no such file")
    try:
        mx.nd.load(params)
    except mx.base.MXNetError as err:
        raise ModelError(f"{params}: not a readable parameter file (truncated or damaged?): "
                         f"{reason(err)}") from None
    try:
        net.load_parameters(params, ctx=ctx)
    except (AssertionError, mx.base.MXNetError) as err:
        raise ModelError(f"{params}: does not match {label} (or is damaged): "
                         f"{reason(err)}") from None


def calibrated_random(name, size, seed=0):
    """A converted GluonCV model with random weights and random BN statistics (so that BN
    folding is not an identity), calibrated ('max') on random inputs, BN frozen: for
    structure checks and speed measurements, where trained values do not matter."""
    mx.random.seed(seed)
    rs = np.random.RandomState(seed)
    with mx.name.NameManager():
        net = _gluoncv(name, {'pretrained': False, **({'classes': 10} if 'cifar' in name
                                                      else {})})
    net.initialize()
    data = mx.nd.array(rs.normal(0, 1, (2, 3, size, size)))
    net(data)
    for key, param in net.collect_params().items():
        # running_* in Gluon layers, moving_* in the SymbolBlock backbones of GluonCV's SSDs
        if key.endswith(('running_var', 'moving_var', 'gamma')):
            param.set_data(mx.nd.array(rs.uniform(0.5, 1.5, param.shape)))
        elif key.endswith(('running_mean', 'moving_mean', 'beta')):
            param.set_data(mx.nd.array(rs.normal(0, 0.2, param.shape)))
    convert_model(net)
    calibrate(net, [data], method='max')
    freeze_bn(net)
    return net
