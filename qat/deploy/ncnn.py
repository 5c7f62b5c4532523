"""Write ncnn models (.param text + .bin weights), fp32 or int8, from the deployment graph.

Formats and arithmetic follow the project's ncnn int8 contract (``docs/ncnn-int8-contract.md``:
§2 the files, §3 the arithmetic):
the int8 model is what ``ncnn2int8`` would write from the fp32 model and our table, with the
trained integer weight codes stored as int8 (tag 0x000D4B38), raw float32 scales, fused
activations, and requantization (8=10x) between consecutive int8 convolutions.

One exception to "what ncnn2int8 would write": an int8 grouped convolution that ncnn's
ConvolutionDepthWise computes wrongly with packing on (``splits_groups``: a multiple of 8
outputs per group, dequantized output; contract §4.3) is written as Slice -> one int8
Convolution per group -> Concat, the per-group convolutions ncnn itself would run.
"""
import struct

import numpy as np

from ..errors import UserError
from .optable import LAYERS
from .optable.base import IntArray
from .optable.weighted import ncnn_split_convolution, splits_groups
from .optable.weighted import requantized_scale  # noqa: F401  (part of this module's API)

MAGIC = 7767517
TAG_FP32 = 0x00000000
TAG_INT8 = 0x000D4B38
TAG_FP16 = 0x01306B47  # read only: what pnnx and ncnnoptimize write by default


def _float(value):
    """9 significant digits: exact float32 round trip, at most 15 characters (the longest
    token ncnn's param reader accepts)."""
    return '%.8e' % float(np.float32(value))


def _params(pairs):
    """``id=value`` tokens; float values formatted exactly, lists as ``-233NN=n,v,...``."""
    tokens = []
    for key, value in pairs:
        if isinstance(value, IntArray):
            tokens.append(f"-233{key:02d}={len(value)}," + ','.join(str(int(v)) for v in value))
        elif isinstance(value, (list, tuple)):
            tokens.append(f"-233{key:02d}={len(value)}," + ','.join(_float(v) for v in value))
        elif isinstance(value, float):
            tokens.append(f"{key}={_float(value)}")
        else:
            tokens.append(f"{key}={int(value)}")
    return tokens


class _Bin:
    """The .bin: concatenated blobs, each padded to 4 bytes."""

    def __init__(self):
        self.parts = []

    def raw(self, values):
        self.parts.append(np.ascontiguousarray(values, '<f4').tobytes())

    def tagged(self, values, int8=False):
        if int8:
            data = np.ascontiguousarray(values, np.int8).tobytes()
            data += b'\0' * (-len(data) % 4)
            self.parts.append(struct.pack('<I', TAG_INT8) + data)
        else:
            self.parts.append(struct.pack('<I', TAG_FP32) + np.ascontiguousarray(
                values, '<f4').tobytes())

    def bytes(self):
        return b''.join(self.parts)


def _line(kind, name, bottoms, tops, pairs):
    head = f"{kind:<24} {name:<24} {len(bottoms)} {len(tops)}"
    return ' '.join([head] + list(bottoms) + list(tops) + _params(pairs))


def _flatness(layer):
    rule = LAYERS[layer.kind].ncnn_flat
    return rule(layer) if callable(rule) else rule


def render(graph, int8=False, guarded=()):
    """(.param text, .bin bytes) of ``graph``; ``int8`` writes int8 layers for every layer
    with a Quant, ``guarded`` names int8 convolutions that get ``31=64`` (no Winograd)."""
    guarded = set(guarded)
    uses = {}
    for layer in graph.layers:
        for name in layer.inputs:
            uses[name] = uses.get(name, 0) + 1
    branches = {}  # blob -> iterator over its split outputs
    lines, blobs, out = [], set(), _Bin()
    flat = set()  # blobs that are 1-D in ncnn where MXNet keeps (N, C, 1, 1)
    channels = {}  # blob -> its channel count (for a reshape back to 3-D)
    for layer in graph.layers:
        if layer.kind not in LAYERS:
            raise UserError(f"layer {layer.name}: kind {layer.kind!r} has no ncnn writer; "
                             f"valid: {sorted(LAYERS)}")
        bottoms = [next(branches[b]) if b in branches else b for b in layer.inputs]
        rule = _flatness(layer)
        if rule == 'makes' or (rule == 'keeps' and layer.inputs
                               and all(b in flat for b in layer.inputs)):
            flat.add(layer.name)
        elif rule != 'reads':
            # A 1-D blob read by a layer that needs ncnn's (C, 1, 1) back: a conv after
            # global pooling (a classifier, an SE block; ncnn's Convolution on a 1-D blob is a
            # deprecated, wrong int8 path), a broadcast multiply with it.
            for position, blob in enumerate(layer.inputs):
                if blob not in flat:
                    continue
                reshaped = f"{layer.name}_reshape" + (f"_{position}" if position else '')
                lines.append(_line('Reshape', reshaped, bottoms[position:position + 1],
                                   [reshaped], [(0, 1), (1, 1), (2, channels[blob])]))
                blobs.add(reshaped)
                bottoms[position] = reshaped
        if int8 and splits_groups(graph, layer):
            for kind, name, ins, outs, pairs in ncnn_split_convolution(layer, bottoms[0],
                                                                       guarded, out):
                lines.append(_line(kind, name, ins, outs, pairs))
                blobs.update(ins + outs)
        else:
            kind, pairs = LAYERS[layer.kind].ncnn(layer, graph, int8, guarded, out)
            lines.append(_line(kind, layer.name, bottoms, [layer.name], pairs))
            blobs.update(bottoms + [layer.name])
        channels[layer.name] = _channels(layer, channels)
        if uses.get(layer.name, 0) > 1:
            tops = [f"{layer.name}_splitncnn_{i}" for i in range(uses[layer.name])]
            lines.append(_line('Split', f"splitncnn_{len(branches)}", [layer.name], tops, []))
            blobs.update(tops)
            branches[layer.name] = iter(tops)
    text = f"{MAGIC}\n{len(lines)} {len(blobs)}\n" + '\n'.join(lines) + '\n'
    return text, out.bytes()


def _channels(layer, channels):
    """The channel count (MXNet axis 1) of a layer's output."""
    if layer.shape is not None:
        return layer.shape[0]
    if 'num_output' in layer.params:
        return layer.params['num_output']
    if layer.kind == 'Input':
        return layer.params['shape'][0]
    return channels.get(layer.inputs[0]) if layer.inputs else None


def read_param(path):
    """[(type, name, bottoms, tops, {id: value})] of an ncnn .param (scalar ids as int or
    float, array ids ``-233NN`` as lists under id NN)."""
    with open(path) as handle:
        lines = handle.read().split('\n')
    if lines[0].strip() != str(MAGIC):
        raise UserError(f"{path}: not an ncnn .param (magic {lines[0]!r})")
    layers = []
    for line in lines[2:]:
        tokens = line.split()
        if not tokens:
            continue
        kind, name, n_in, n_out = tokens[0], tokens[1], int(tokens[2]), int(tokens[3])
        bottoms, tops = tokens[4:4 + n_in], tokens[4 + n_in:4 + n_in + n_out]
        params = {}
        for token in tokens[4 + n_in + n_out:]:
            key, value = token.split('=')
            if key.startswith('-233'):
                params[int(key[4:])] = [float(v) for v in value.split(',')[1:]]
            else:
                params[int(key)] = float(value) if any(c in value for c in '.eE') else int(value)
        layers.append((kind, name, bottoms, tops, params))
    return layers


def read_weights(param_path, bin_path):
    """{layer name: {blob name: array}} of the weighted layers of an ncnn model, read back
    following the blob order of the contract (§2.4): 'weight' (int8 codes, float16 or
    float32), 'bias', 'weight_scales', 'input_scale', 'top_scale' / BatchNorm 'slope',
    'mean', 'var', 'bias' / MemoryData 'data' (shaped (c, h, w) without the zero sizes) / PReLU 'slope'.
    A grouped conv written per group (Slice -> Convolutions -> Concat) is read back as one
    layer under the Concat's name, as ConvolutionDepthWise stores it: the groups' weights
    and biases concatenated, one weight scale per group."""
    data = open(bin_path, 'rb').read()
    layers = read_param(param_path)
    offset, weights = 0, {}

    def take(count, dtype):
        nonlocal offset
        size = count * np.dtype(dtype).itemsize
        values = np.frombuffer(data, dtype, count, offset)
        offset += size + (-size % 4)
        return values

    for kind, name, _, _, p in layers:
        if kind in ('Convolution', 'ConvolutionDepthWise', 'InnerProduct', 'Deconvolution'):
            size_id, bias_id = (2, 1) if kind == 'InnerProduct' else (6, 5)
            (tag,) = struct.unpack_from('<I', data, offset)
            offset += 4
            dtype = {TAG_INT8: np.int8, TAG_FP16: '<f2'}.get(tag, '<f4')
            blobs = {'weight': take(p[size_id], dtype)}
            outputs = p[0]
            if p.get(bias_id, 0):
                blobs['bias'] = take(outputs, '<f4')
            int8 = p.get(8, 0)
            if int8:
                groups = p.get(7, 1)
                count = groups if int8 % 100 == 1 and kind == 'ConvolutionDepthWise' else \
                    (1 if kind == 'ConvolutionDepthWise' else outputs)
                blobs['weight_scales'] = take(count, '<f4')
                blobs['input_scale'] = take(1, '<f4')
                if int8 > 100:
                    blobs['top_scale'] = take(1, '<f4')
            weights[name] = blobs
        elif kind == 'BatchNorm':
            weights[name] = {key: take(p[0], '<f4') for key in ('slope', 'mean', 'var', 'bias')}
        elif kind == 'PReLU':
            weights[name] = {'slope': take(p.get(0, 1), '<f4')}
        elif kind in ('Normalize', 'Scale'):  # raw float32 scales (Scale: without bias)
            weights[name] = {'scale': take(p.get(3 if kind == 'Normalize' else 0, 0), '<f4')}
        elif kind == 'MemoryData':  # raw float32, (h, w)
            shape = tuple(p.get(key, 0) for key in (2, 1, 0))
            shape = tuple(size for size in shape if size) or (1,)
            weights[name] = {'data': take(int(np.prod(shape)), '<f4').reshape(shape)}
    if offset != len(data):
        raise UserError(f"{bin_path}: {len(data) - offset} bytes left after the last layer "
                         f"of {param_path}")
    return _merge_split_groups(layers, weights)


def _merge_split_groups(layers, weights):
    """``weights`` with the per-group Convolutions of each Slice -> Convolutions -> Concat
    replaced by one entry under the Concat's name (the order of the layers kept)."""
    producer = {top: (kind, name, bottoms) for kind, name, bottoms, tops, _ in layers
                for top in tops}
    merged = {}  # first group's name -> (concat name, [group names])
    for kind, name, bottoms, _, _ in layers:
        parts = [producer.get(blob) for blob in bottoms]
        if kind != 'Concat' or not all(part is not None and part[0] == 'Convolution'
                                       and len(part[2]) == 1 and part[1] in weights
                                       for part in parts):
            continue
        sources = {producer.get(part[2][0], (None, None, None))[:2] for part in parts}
        if len(sources) == 1 and next(iter(sources))[0] == 'Slice':
            merged[parts[0][1]] = (name, [part[1] for part in parts])
    groups = {part for _, names in merged.values() for part in names}
    result = {}
    for name, blobs in weights.items():
        if name in merged:
            concat, names = merged[name]
            parts = [weights[part] for part in names]
            entry = {'weight': np.concatenate([b['weight'] for b in parts])}
            if 'bias' in blobs:
                entry['bias'] = np.concatenate([b['bias'] for b in parts])
            if 'weight_scales' in blobs:
                entry['weight_scales'] = np.array([b['weight_scales'][0] for b in parts],
                                                  np.float32)
                entry['input_scale'] = blobs['input_scale']
            if 'top_scale' in blobs:
                entry['top_scale'] = blobs['top_scale']
            result[concat] = entry
        elif name not in groups:
            result[name] = blobs
    return result
