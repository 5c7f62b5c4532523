"""convert_model: swap float blocks for fake-quantized ones, in place; modes; back to float.

Conv -> BatchNorm pairs are found from the network's dataflow (a symbolic trace), not from
block names: a Conv2D whose output feeds exactly one op, a BatchNorm, absorbs that BatchNorm.
"""
import fnmatch
import logging
import os

import mxnet as mx
from mxnet.gluon import HybridBlock, nn

from .config import QuantConfig, QuantScheme
from .errors import MissingFileError, UserError, reason
from .fileio import atomic_path
from .modes import MODE_FUNCTIONS, clear_cached_graphs
from .nn import (BN_MODE_FLAGS, FoldedBatchNorm, QAvgPool2D, QBatchNorm, QConv2D,
                 QConv2DBatchNorm, QDense, QuantBlock, mode_blocks, quant_blocks, walk)
from .symbol import SymbolGraph, trace_symbol

log = logging.getLogger(__name__)

# The one registry: float block type -> converter(block, config) -> quantized block, and
# fusion patterns: (Conv2D, BatchNorm) -> converter(conv, bn, config) for a Conv2D whose only
# consumer is a BatchNorm (fake batchnorm, used when the layer's config has fake_bn).
# Every other BatchNorm (stand-alone, e.g. pre-activation nets) becomes a QBatchNorm, which
# computes ncnn's fp32 BatchNorm once BN is frozen; an AvgPool2D that ncnn computes unlike
# MXNet (count_include_pad) becomes a QAvgPool2D, ncnn's fp32 average pooling once BN is frozen.
CONV_BN = (nn.Conv2D, nn.BatchNorm)
CONVERTERS = {
    nn.Conv2D: QConv2D.from_float,
    nn.Dense: QDense.from_float,
    nn.BatchNorm: QBatchNorm.from_float,
    nn.AvgPool2D: QAvgPool2D.from_float,
    CONV_BN: QConv2DBatchNorm.from_float,
}

# Float blocks with weights that are deliberately left float (noted in the log when seen),
# and QBatchNorm (already converted: a second convert_model leaves it as it is).
LEFT_FLOAT_QUIETLY = (nn.BatchNorm, nn.LayerNorm, nn.InstanceNorm, QBatchNorm)


def _replace_child(parent, key, old, new):
    parent._children[key] = new
    for attr, value in list(vars(parent).items()):
        if value is old:
            object.__setattr__(parent, attr, new)


def traced_graph(net, input_names=('data',)):
    """The ``SymbolGraph`` of ``net``, or None (with a warning) when it cannot be traced."""
    try:
        return SymbolGraph(trace_symbol(net, input_names), net, input_names)
    except Exception as err:  # a non-hybridizable net: no structural pairing possible
        log.warning("could not trace %s symbolically (%s: %s); conv+BN pairs will not get "
                    "fake batchnorm and every input stays signed", net.name,
                    type(err).__name__, err)
        return None


def conv_bn_pairs(net, input_names=('data',), graph=None):
    """{conv block: bn block} for every Conv2D whose only consumer is a BatchNorm(axis=1),
    found from the traced dataflow of ``net`` (``graph``: its ``traced_graph``, traced when
    None; both nodes named uniquely, so that the names identify the blocks)."""
    graph = graph or traced_graph(net, input_names)
    if graph is None:
        return {}
    pairs = {}
    for index, node in enumerate(graph.nodes):
        user = graph.only_consumer(index)
        if node['op'] != 'Convolution' or user is None or not graph.unique(index):
            continue
        bn_node = graph.nodes[user]
        if bn_node['op'] != 'BatchNorm' or not graph.unique(user) \
                or int(bn_node.get('attrs', {}).get('axis', 1)) != 1:
            continue
        convs = [b for b in graph.blocks_of(node['name']) if type(b) is nn.Conv2D]
        bns = [b for b in graph.blocks_of(bn_node['name']) if type(b) is nn.BatchNorm]
        if len(convs) == 1 and len(bns) == 1 and convs[0].act is None:
            pairs[convs[0]] = bns[0]
    return pairs


def non_negative_inputs(graph):
    """The Conv2D / Dense blocks of the traced ``graph`` whose input is >= 0 at every call
    (after a ReLU, a sigmoid, ...: ``SymbolGraph.non_negative``)."""
    positive, verdict = graph.non_negative(), {}
    for node in graph.nodes:
        if node['op'] not in ('Convolution', 'FullyConnected'):
            continue
        source = node['inputs'][0][0]
        for block in graph.blocks_of(node['name']):
            if isinstance(block, (nn.Conv2D, nn.Dense)):
                verdict[block] = verdict.get(block, True) and source in positive
    return {block for block, ok in verdict.items() if ok}


def first_layer(net):
    """Name of the first Conv2D or Dense of ``net`` in network order (usually kept at 8 bits,
    since it sees the raw image)."""
    for _, _, _, block in walk(net):
        if isinstance(block, (nn.Conv2D, nn.Dense, QuantBlock)):
            return block.name
    raise UserError(f"{net.name} has no Conv2D or Dense layer")


def _matches(block, path, patterns):
    for pattern in patterns:
        if isinstance(pattern, str):
            if fnmatch.fnmatchcase(block.name, pattern) or fnmatch.fnmatchcase(path, pattern):
                return True
        elif pattern is block:
            return True
    return False


def _scheme(config, layer_configs):
    if isinstance(config, QuantScheme):
        if layer_configs:
            raise TypeError("give per-layer configs inside the QuantScheme (by_name), not "
                            "also as layer_configs")
        return config
    for value in [config] + list((layer_configs or {}).values()):
        if value is not None and not isinstance(value, QuantConfig):
            raise TypeError(f"config and layer_configs values must be QuantConfig, "
                            f"got {type(value).__name__}")
    return QuantScheme(config or QuantConfig(), dict(layer_configs or {}))


def convert_model(net, exclude=(), convert_fn=None, config=None, layer_configs=None,
                  input_names=('data',)):
    """Replace, in place, every convertible block of ``net`` by its fake-quantized version.

    net: any Gluon Block (HybridBlock for fake batchnorm, which needs a symbolic trace).
    exclude: blocks, or glob patterns matched against block names ('resnetv10_conv0') and
        structural paths ('features.0'); an excluded block and everything inside it stay float.
    convert_fn: {block type or fusion pattern: converter} added to (or, with None, removed
        from) ``CONVERTERS``.
    config: a QuantScheme (the config of every layer), or a QuantConfig for all layers
        (default QuantConfig()) with layer_configs: {pattern: QuantConfig or None (float)}
        for some layers (first matching pattern wins).
    input_names: names of the net's inputs, for the trace.
    Returns ``net``, with the mode functions of ``qat.modes`` also bound as methods
    (``net.enable_quantize()`` ...).
    """
    conversion = _Conversion(net, _scheme(config, layer_configs), _converters(convert_fn),
                             exclude, input_names)
    conversion.children(net, '')
    stand_ins = {bn: FoldedBatchNorm(bn, into) for bn, into in conversion.folded.items()}
    for _, parent, key, child in list(walk(net)):
        if child in stand_ins:
            _replace_child(parent, key, child, stand_ins[child])
    clear_cached_graphs(net)
    for fn in MODE_FUNCTIONS:
        object.__setattr__(net, fn.__name__, _bind(fn, net))
    log.info("converted %d blocks of %s (%d conv+BN pairs with fake batchnorm)",
             len(quant_blocks(net)), net.name, len(conversion.folded))
    return net


class _Conversion:
    """The state of one ``convert_model`` walk: which blocks are excluded, the conv -> BN
    pairs, what each float block became."""

    def __init__(self, net, scheme, converters, exclude, input_names):
        self.scheme, self.converters = scheme, converters
        exclude = tuple(exclude) if isinstance(exclude, (list, tuple, set)) else (exclude,)
        self.exclude = exclude + scheme.exclude
        self.paths = {}
        for path, _, _, child in walk(net):
            self.paths.setdefault(child, path)  # a block in several slots: its first path
        _warn_unmatched(net, self.exclude, self.paths)
        self.pair_converter = converters.get(CONV_BN)
        # The pairs also tell the stand-alone BatchNorm converter which BNs to leave alone: a
        # conv's BN is folded (fake BN), or left float and folded at export.
        wants_pairs = self.pair_converter is not None or nn.BatchNorm in converters
        graph = traced_graph(net, input_names) if isinstance(net, HybridBlock) and (
            wants_pairs or scheme.unsigned_after_relu) else None
        self.pairs = conv_bn_pairs(net, graph=graph) if graph is not None and wants_pairs \
            else {}
        self.non_negative = non_negative_inputs(graph) if graph is not None else set()
        self.paired_bns = set(self.pairs.values())
        self.folded = {}  # bn block -> the quantized block that absorbed it
        # float block -> what its slots hold now (itself when left float). A block registered
        # in several slots (GoogLeNet's ``output`` is also ``head.2``) is decided once and
        # every slot gets the same block: two quantized copies would each create their own
        # ``<prefix>range_ema`` ... under one name.
        self.decided = {}
        self.tied = {}  # weight Parameter -> the first quantized block over it
        self.first = _first_convertible(net, converters)

    def children(self, block, path):
        """Convert the children of ``block`` (at ``path``), depth first."""
        for key, child in list(block._children.items()):
            child_path = f"{path}.{key}" if path else key
            if child in self.decided:
                if self.decided[child] is not child:
                    _replace_child(block, key, child, self.decided[child])
                continue
            self.decided[child] = child  # until it is converted below
            if isinstance(child, (QuantBlock, FoldedBatchNorm)) \
                    or _matches(child, child_path, self.exclude):
                continue  # an excluded block and everything inside it stay float
            convert = self.converters.get(type(child)) if child not in self.paired_bns \
                else None
            if convert is None:
                if child._reg_params and not child._children \
                        and not isinstance(child, LEFT_FLOAT_QUIETLY):
                    log.info("%s (%s) has weights but no converter: left float", child.name,
                             type(child).__name__)
                self.children(child, child_path)
                continue
            new = self.converted(child, child_path, convert)
            if new is not None:
                _replace_child(block, key, child, new)
                self.decided[child] = new
                _init_like(new, child)

    def converted(self, child, path, convert):
        """The block that replaces ``child``, or None when it stays float."""
        if isinstance(child, nn.Conv2D) and child._kwargs.get('layout') != 'NCHW':
            log.info("%s: layout %s is not supported: left float", child.name,
                     child._kwargs.get('layout'))
            return None
        config = self.scheme.config_for(child, path, child is self.first,
                                        non_negative=child in self.non_negative)
        if config is None:
            return None
        bn = self.pairs.get(child) if self.pair_converter is not None else None
        if bn is not None and config.fake_bn \
                and not _matches(bn, self.paths.get(bn, ''), self.exclude):
            new = self.pair_converter(child, bn, config)
            self.folded[bn] = new
        else:
            new = convert(child, config)
        twin = self.tied.setdefault(new.weight, new) if isinstance(new, QuantBlock) else new
        if twin is not new:  # their quantization parameters would clash by name
            raise UserError(f"{twin.name} and {new.name} share one weight (tied weights): "
                            f"quantize one of them only (exclude the other)")
        return new


def _converters(convert_fn):
    """CONVERTERS with ``convert_fn``'s entries added (None: removed)."""
    converters = dict(CONVERTERS)
    for block_type, fn in (convert_fn or {}).items():
        if fn is None:
            converters.pop(block_type, None)
        else:
            converters[block_type] = fn
    return converters


def unmatched(net, patterns):
    """The glob patterns of ``patterns`` that match no block name or path of ``net``."""
    blocks = [(block, path) for path, _, _, block in walk(net)]
    return [pattern for pattern in patterns if isinstance(pattern, str)
            and not any(_matches(block, path, (pattern,)) for block, path in blocks)]


def _warn_unmatched(net, exclude, paths):
    for pattern in unmatched(net, exclude):
        log.warning("exclude pattern %r matches no block of %s (block names look like %s)",
                    pattern, net.name, next(iter(paths), net).name)


def _first_convertible(net, converters):
    """The first block in network order that has a converter (the first-layer rule); not a
    stand-alone BatchNorm or an average pooling, which have no weights to quantize."""
    for _, _, _, block in walk(net):
        if (type(block) in converters and not isinstance(block, (nn.BatchNorm, nn.AvgPool2D))) \
                or isinstance(block, QuantBlock):
            return block
    return None


def _init_like(new, old):
    """Initialize the quantization parameters on the float block's devices, if it has any."""
    weight = getattr(old, 'weight', None)
    if weight is None or weight._data is None:
        return
    for param in new.collect_params().values():
        if param._data is None and param._deferred_init == ():
            param.initialize(ctx=weight.list_ctx())


def _bind(fn, net):
    def method(*args, **kwargs):
        return fn(net, *args, **kwargs)
    method.__name__ = fn.__name__
    method.__doc__ = fn.__doc__
    return method


# ----- back to float -------------------------------------------------------------------------
def to_float(net):
    """Undo ``convert_model`` in place: every slot gets its original float block back (with the
    trained parameters). Returns ``net``."""
    for path, parent, key, child in list(walk(net)):
        if isinstance(child, (QuantBlock, FoldedBatchNorm, QBatchNorm, QAvgPool2D)):
            _replace_child(parent, key, child, child.float_blocks[0])
    clear_cached_graphs(net)
    for fn in MODE_FUNCTIONS:
        vars(net).pop(fn.__name__, None)
    return net


# ----- parameters with their modes and configs ------------------------------------------------
def save_parameters(net, path):
    """``net.save_parameters`` written atomically (temporary file, then rename). The file
    holds each quantized block's modes (``qmode``) and QuantConfig (``qconfig``, which also
    carries the checkpoint format), so it stays loadable by plain Gluon too."""
    with atomic_path(path, suffix='.params') as tmp:
        net.save_parameters(tmp)


# Checkpoint migration: parameter (suffix) older formats lack -> (initial value, meaning).
MIGRATIONS = {
    'weight_threshold_factor': ('ones', "ones, the plain max|w| it was trained with (format 0)"),
    'qconfig': (None, "the configs given to convert_model (format 1 saved none)"),
    'bn_qmode': (None, "the modes of the quantized blocks (stand-alone BatchNorms were left "
                       "float before)"),
    'learned_threshold': ('zeros', "zeros, learned ranges not started (they came with LSQ)"),
}


def load_parameters(net, path, ctx=None, **kwargs):
    """``net.load_parameters`` and the saved modes and QuantConfig of every quantized block.

    Files of older checkpoint formats are migrated: without ``weight_threshold_factor``
    (format 0) the factor is set to ones; without ``qconfig`` (format 1) each block keeps the
    config it was converted with. Anything else missing or mismatched is an error naming the
    file."""
    if not os.path.isfile(path):
        raise MissingFileError(f"parameter file not found: {path}")
    expected = net._collect_params_with_prefix()
    try:
        saved = set(mx.nd.load(path))
    except mx.base.MXNetError as err:
        raise UserError(f"{path}: not a readable parameter file (truncated or damaged?): "
                         f"{reason(err)}") from None
    missing = set(expected) - saved
    migrated = {key: suffix for key in missing for suffix in MIGRATIONS
                if key.endswith(suffix)}
    if missing and len(migrated) == len(missing):
        kwargs = dict(kwargs, allow_missing=True)
    try:
        net.load_parameters(path, ctx=ctx, **kwargs)
    except (AssertionError, mx.base.MXNetError) as err:
        raise UserError(f"{path}: does not fit {net.name} (saved from another net or "
                        f"converted differently?): {reason(err)}") from None
    for key, suffix in migrated.items():
        param, init = expected[key], MIGRATIONS[suffix][0]
        if param._data is None:
            param.initialize(init=init, ctx=ctx)
        elif init in ('ones', 'zeros'):
            param.set_data(getattr(mx.nd, init)(param.shape))
    for suffix in sorted(set(migrated.values())):
        log.info("%s: an older checkpoint without %s: migrated to %s", path, suffix,
                 MIGRATIONS[suffix][1])
    kept = {id(expected[key]) for key in migrated}
    blocks = quant_blocks(net)
    for _, block in blocks:
        block.load_mode()
        if id(block.qconfig) not in kept:
            block.load_config()
    for _, block in mode_blocks(net):  # the stand-alone BatchNorms
        if isinstance(block, QBatchNorm):
            if id(block.bn_qmode) in kept and blocks:
                block.set_mode(**{flag: blocks[0][1].mode[flag] for flag in BN_MODE_FLAGS})
            else:
                block.load_mode()
        elif isinstance(block, QAvgPool2D) and blocks:  # no parameters: the net's modes
            block.set_mode(**{flag: blocks[0][1].mode[flag] for flag in BN_MODE_FLAGS})
    clear_cached_graphs(net)
    return net
