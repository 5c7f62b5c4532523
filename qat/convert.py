"""convert_model: swap float blocks for fake-quantized ones, in place; modes; back to float.

Conv -> BatchNorm pairs are found from the network's dataflow (a symbolic trace), not from
block names: a Conv2D whose output feeds exactly one op, a BatchNorm, absorbs that BatchNorm.
"""
import contextlib
import fnmatch
import json
import logging
import os
import tempfile

import mxnet as mx
from mxnet.gluon import HybridBlock, nn

from .config import QuantConfig
from .layers import FoldedBatchNorm, QConv2D, QConv2DBatchNorm, QDense, QuantBlock

log = logging.getLogger(__name__)

# The one registry: float block type -> converter(block, config) -> quantized block.
# Conv2D followed by its BatchNorm uses CONV_BN_CONVERTER instead (when fake_bn is on).
CONVERTERS = {
    nn.Conv2D: QConv2D.from_float,
    nn.Dense: QDense.from_float,
}
CONV_BN_CONVERTER = QConv2DBatchNorm.from_float

# Float blocks with weights that are deliberately left float (noted in the log when seen).
LEFT_FLOAT_QUIETLY = (nn.BatchNorm, nn.LayerNorm, nn.InstanceNorm)


def _children(block):
    return list(block._children.items())


def walk(block, path=''):
    """Yield (path, parent, key, child) for every descendant, depth first."""
    for key, child in _children(block):
        child_path = f"{path}.{key}" if path else key
        yield child_path, block, key, child
        yield from walk(child, child_path)


def _replace_child(parent, key, old, new):
    parent._children[key] = new
    for attr, value in list(vars(parent).items()):
        if value is old:
            object.__setattr__(parent, attr, new)


def _graph_nodes(net, input_names):
    """Trace ``net`` symbolically; return the list of graph nodes (dicts) or None."""
    try:
        inputs = [mx.sym.var(name) for name in input_names]
        out = net(*inputs)
        if isinstance(out, (list, tuple)):
            out = mx.sym.Group(list(out))
        return json.loads(out.tojson())['nodes']
    except Exception as err:  # a non-hybridizable net: no structural pairing possible
        log.warning("could not trace %s symbolically (%s: %s); conv+BN pairs will not get "
                    "fake batchnorm", net.name, type(err).__name__, err)
        return None


def conv_bn_pairs(net, input_names=('data',)):
    """{conv block: bn block} for every Conv2D whose only consumer is a BatchNorm(axis=1),
    found from the traced dataflow of ``net``."""
    nodes = _graph_nodes(net, input_names)
    if nodes is None:
        return {}
    by_op_name = {}
    for _, _, _, block in walk(net):
        by_op_name.setdefault(block.prefix + 'fwd', []).append(block)
    consumers = {}
    for index, node in enumerate(nodes):
        for source, *_ in node.get('inputs', []):
            consumers.setdefault(source, []).append(index)
    names = [node['name'] for node in nodes]
    pairs = {}
    for index, node in enumerate(nodes):
        if node['op'] != 'Convolution' or names.count(node['name']) != 1:
            continue
        users = consumers.get(index, [])
        if len(users) != 1 or nodes[users[0]]['op'] != 'BatchNorm':
            continue
        bn_node = nodes[users[0]]
        if names.count(bn_node['name']) != 1 or int(bn_node['attrs'].get('axis', 1)) != 1:
            continue
        convs = [b for b in by_op_name.get(node['name'], []) if type(b) is nn.Conv2D]
        bns = [b for b in by_op_name.get(bn_node['name'], []) if type(b) is nn.BatchNorm]
        if len(convs) == 1 and len(bns) == 1 and convs[0].act is None:
            pairs[convs[0]] = bns[0]
    return pairs


def first_layer(net):
    """Name of the first Conv2D or Dense of ``net`` in network order (usually kept at 8 bits,
    since it sees the raw image)."""
    for _, _, _, block in walk(net):
        if isinstance(block, (nn.Conv2D, nn.Dense, QuantBlock)):
            return block.name
    raise ValueError(f"{net.name} has no Conv2D or Dense layer")


def _matches(block, path, patterns):
    for pattern in patterns:
        if isinstance(pattern, str):
            if fnmatch.fnmatchcase(block.name, pattern) or fnmatch.fnmatchcase(path, pattern):
                return True
        elif pattern is block:
            return True
    return False


def _config_for(block, path, config, layer_configs):
    for pattern, override in (layer_configs or {}).items():
        if fnmatch.fnmatchcase(block.name, pattern) or fnmatch.fnmatchcase(path, pattern):
            return override
    return config


def convert_model(net, exclude=(), convert_fn=None, config=None, layer_configs=None,
                  input_names=('data',)):
    """Replace, in place, every convertible block of ``net`` by its fake-quantized version.

    net: any Gluon Block (HybridBlock for fake batchnorm, which needs a symbolic trace).
    exclude: blocks, or glob patterns matched against block names ('resnetv10_conv0') and
        structural paths ('features.0'); an excluded block and everything inside it stay float.
    convert_fn: {block type: converter(block, config)} added to (or, with None, removed from)
        ``CONVERTERS``.
    config: QuantConfig for all layers (default QuantConfig()); layer_configs: {pattern:
        QuantConfig} for some layers (first matching pattern wins).
    input_names: names of the net's inputs, for the trace.
    Returns ``net``, with the mode functions of this module also bound as methods
    (``net.enable_quantize()`` ...).
    """
    config = QuantConfig() if config is None else config
    for value in [config] + list((layer_configs or {}).values()):
        if not isinstance(value, QuantConfig):
            raise TypeError(f"config and layer_configs values must be QuantConfig, "
                            f"got {type(value).__name__}")
    converters = dict(CONVERTERS)
    for block_type, fn in (convert_fn or {}).items():
        if fn is None:
            converters.pop(block_type, None)
        else:
            converters[block_type] = fn
    exclude = tuple(exclude) if isinstance(exclude, (list, tuple, set)) else (exclude,)
    pairs = conv_bn_pairs(net, input_names) if isinstance(net, HybridBlock) else {}
    folded = {}  # bn block -> the QConv2DBatchNorm that absorbed it
    paths = {child: path for path, _, _, child in walk(net)}

    def convert_children(block, path):
        for key, child in _children(block):
            child_path = f"{path}.{key}" if path else key
            if isinstance(child, (QuantBlock, FoldedBatchNorm)) \
                    or _matches(child, child_path, exclude):
                continue  # an excluded block and everything inside it stay float
            convert = converters.get(type(child))
            if convert is None:
                if child._reg_params and not child._children \
                        and not isinstance(child, LEFT_FLOAT_QUIETLY):
                    log.info("%s (%s) has weights but no converter: left float", child.name,
                             type(child).__name__)
                convert_children(child, child_path)
                continue
            if isinstance(child, nn.Conv2D) and child._kwargs.get('layout') != 'NCHW':
                log.info("%s: layout %s is not supported: left float", child.name,
                         child._kwargs.get('layout'))
                continue
            layer_config = _config_for(child, child_path, config, layer_configs)
            bn = pairs.get(child)
            if bn is not None and layer_config.fake_bn and convert is CONVERTERS[nn.Conv2D] \
                    and not _matches(bn, paths.get(bn, ''), exclude):
                new = CONV_BN_CONVERTER(child, bn, layer_config)
                folded[bn] = new
            else:
                new = convert(child, layer_config)
            _replace_child(block, key, child, new)
            _init_like(new, child)

    convert_children(net, '')
    for _, parent, key, child in list(walk(net)):
        if child in folded:
            _replace_child(parent, key, child, FoldedBatchNorm(child, folded[child]))
    _clear_all_cached_ops(net)
    for fn in MODE_FUNCTIONS:
        object.__setattr__(net, fn.__name__, _bind(fn, net))
    log.info("converted %d blocks of %s (%d conv+BN pairs with fake batchnorm)",
             len(quant_blocks(net)), net.name, len(folded))
    return net


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


def _clear_all_cached_ops(net):
    net._clear_cached_op()
    for _, _, _, child in walk(net):
        if isinstance(child, HybridBlock):
            child._clear_cached_op()


def quant_blocks(net):
    """All fake-quantized blocks of ``net`` as (path, block), in network order."""
    return [(path, child) for path, _, _, child in walk(net) if isinstance(child, QuantBlock)]


def _set_mode(net, **flags):
    blocks = quant_blocks(net)
    if not blocks:
        raise ValueError(f"{net.name} has no quantized blocks: call convert_model first")
    for _, block in blocks:
        block.set_mode(**flags)
    _clear_all_cached_ops(net)
    return net


@contextlib.contextmanager
def temporary_mode(net, **flags):
    """Set mode flags on every quantized block for the duration of a ``with`` block, then
    restore each block's own modes (and clear the cached graphs both ways)."""
    blocks = [block for _, block in quant_blocks(net)]
    saved = [block.mode for block in blocks]
    try:
        for block in blocks:
            block.set_mode(**flags)
        _clear_all_cached_ops(net)
        yield net
    finally:
        for block, mode in zip(blocks, saved):
            block.set_mode(**mode)
        _clear_all_cached_ops(net)


# ----- the modes: explicit, saved state ----------------------------------------------------
def enable_quantize(net):
    """Quantize weights (and inputs, if input quantization is on) of every converted block."""
    return _set_mode(net, quantize=True)


def disable_quantize(net):
    """Compute exactly what the float network computed."""
    return _set_mode(net, quantize=False)


def quantize_input(net, enable=True, online=False):
    """Turn input quantization on/off; ``online`` uses each batch's own range, otherwise the
    tracked range (falling back to the batch range while none has been tracked)."""
    return _set_mode(net, quantize_input=enable, online=online)


def freeze_bn(net, frozen=True):
    """Fake-BN blocks use running statistics (and stop updating them), as the device does."""
    return _set_mode(net, bn_frozen=frozen)


def freeze_ranges(net, frozen=True):
    """Stop updating the input range trackers. Warns about layers without a usable range."""
    if frozen:
        check_ranges(net)
    return _set_mode(net, ranges_frozen=frozen)


MODE_FUNCTIONS = (enable_quantize, disable_quantize, quantize_input, freeze_bn, freeze_ranges)


def check_ranges(net):
    """Warn, naming the layer, about every input range that is unset, zero or not finite
    (the guard in ``ops.safe_threshold`` keeps its scale finite). Returns those layer names."""
    from .ops import MAX_THRESHOLD, MIN_THRESHOLD
    bad = []
    for _, block in quant_blocks(net):
        if not block.mode['quantize_input'] or block.range_ema._data is None:
            continue
        threshold = block.input_threshold()
        if threshold is None or not MIN_THRESHOLD <= threshold <= MAX_THRESHOLD:
            bad.append(block.name)
            log.warning("%s: input range is %s; its scale is clamped to a finite value "
                        "(calibrate or train with input quantization first)",
                        block.name, 'unset' if threshold is None else threshold)
    return bad


# ----- back to float -------------------------------------------------------------------------
def to_float(net):
    """Undo ``convert_model`` in place: every slot gets its original float block back (with the
    trained parameters). Returns ``net``."""
    for path, parent, key, child in list(walk(net)):
        if isinstance(child, (QuantBlock, FoldedBatchNorm)):
            _replace_child(parent, key, child, child._originals.blocks[0])
    _clear_all_cached_ops(net)
    for fn in MODE_FUNCTIONS:
        vars(net).pop(fn.__name__, None)
    return net


# ----- parameters with their modes -----------------------------------------------------------
def save_parameters(net, path):
    """``net.save_parameters`` written atomically (temporary file, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix='.params')
    os.close(handle)
    try:
        net.save_parameters(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_parameters(net, path, ctx=None, **kwargs):
    """``net.load_parameters`` and the saved modes of every quantized block. A checkpoint
    saved before ``weight_threshold_factor`` existed loads with that factor set to ones (the
    plain max|w| it was trained with)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"parameter file not found: {path}")
    expected = net._collect_params_with_prefix()
    factors = {key for key in expected if key.endswith('weight_threshold_factor')}
    try:
        net.load_parameters(path, ctx=ctx, **kwargs)
    except AssertionError:
        missing = set(expected) - set(mx.nd.load(path))
        if not factors or not missing or not missing <= factors:
            raise
        net.load_parameters(path, ctx=ctx, **dict(kwargs, allow_missing=True))
        for key in missing:
            param = expected[key]
            if param._data is None:
                param.initialize(init='ones', ctx=ctx)
            else:
                param.set_data(mx.nd.ones(param.shape))
        log.info("%s: no weight_threshold_factor in %s (an older checkpoint): set to ones",
                 net.name, path)
    for _, block in quant_blocks(net):
        block.load_mode()
    _clear_all_cached_ops(net)
    return net
