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
from .ir import ACTIVATIONS

MAGIC = 7767517
TAG_FP32 = 0x00000000
TAG_INT8 = 0x000D4B38
# Fused activation ids (9=) of Convolution / InnerProduct.
ACTIVATION_TYPES = {None: 0, 'relu': 1, 'leaky': 2, 'clip': 3, 'sigmoid': 4}
assert set(ACTIVATION_TYPES) - {None} == set(ACTIVATIONS)
NO_WINOGRAD = 64  # 31= feature mask bit 6: this layer never runs Winograd
# ncnn's int8 ConvolutionDepthWise gives garbage (or NaN) with packing on for a grouped,
# non-depthwise conv with a multiple of this many outputs per group and a dequantized
# (not requantized, 8=1) output. It runs one Convolution per group into a slice of its
# output prepared with elempack 4 (num_output_g % 4 == 0), while the x86 AVX / AVX-512
# int8 Convolution writes its dequantized (fp32) result with elempack 8 or 16 when
# num_output_g % 8 == 0: Mat::create then allocates a new Mat, and the slice of the layer's
# output is never written (ncnn a4d2ea1d, convolutiondepthwise_x86.cpp forward_int8_x86 vs
# convolution_x86.cpp forward_int8_x86). Requantized outputs (8=101) use elempack 8 on both
# sides and are exact; so is the fp32 path.
PACKING_BUG_GROUP_OUTPUTS = 8


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


class IntArray(tuple):
    """An array parameter of integers (Slice's slices), written without a decimal point:
    ncnn reads an array element with '.' or 'e' as a float."""


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


def _activation_params(activation):
    if activation is None:
        return []
    pairs = [(9, ACTIVATION_TYPES[activation[0]])]
    if activation[0] == 'leaky':
        pairs.append((10, [activation[1]]))
    elif activation[0] == 'clip':
        pairs.append((10, [activation[1], activation[2]]))
    return pairs


def is_depthwise(layer):
    """ncnn's depthwise test (input channels == groups == outputs); other grouped convs run
    as one Convolution per group inside ConvolutionDepthWise."""
    p = layer.params
    return layer.weights['weight'].shape[1] * p['groups'] == p['groups'] == p['num_output']


def splits_groups(graph, layer):
    """True when the int8 model writes ``layer`` as Slice -> one int8 Convolution per group
    -> Concat instead of ConvolutionDepthWise: an int8 grouped (not depthwise) conv with a
    multiple of PACKING_BUG_GROUP_OUTPUTS outputs per group whose output is dequantized,
    the class ncnn gets wrong with packing on (contract §4.3)."""
    p, quant = layer.params, layer.quant
    if layer.kind != 'Convolution' or quant is None or not quant.int8 or p['groups'] == 1 \
            or is_depthwise(layer):
        return False
    return (p['num_output'] // p['groups']) % PACKING_BUG_GROUP_OUTPUTS == 0 \
        and requantized_scale(graph, layer) is None


def requantized_scale(graph, layer):
    """The top scale ncnn fuses into an int8 conv (8=10x), or None.

    Fused when every consumer of the conv's output is an int8 Convolution with the same input
    scale (through a Split all consumers get one scale, so they must agree), and the output
    is not a network output: the consumers then read int8 codes directly (contract §3.4).
    A consumer written as per-group convolutions (``splits_groups``) reads through a Slice,
    which ncnn's x86 runtime cannot cut in int8 (it repacks pack-8 int8 as float): no
    fusion into it."""
    quant = layer.quant
    if layer.kind != 'Convolution' or quant is None or not quant.int8 \
            or layer.name in graph.outputs:
        return None
    users = graph.consumers(layer.name)
    if not users or any(u.kind != 'Convolution' or u.quant is None or not u.quant.int8
                        or splits_groups(graph, u) for u in users):
        return None
    scales = {float(u.quant.input_scale) for u in users}
    return users[0].quant.input_scale if len(scales) == 1 else None


def _conv_geometry(p, num_output, weight_size):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = p['kernel'], p['stride'], p['pad'], p['dilate']
    return [(0, num_output), (1, kw), (11, kh), (2, dw), (12, dh), (3, sw), (13, sh),
            (4, pw), (14, ph), (5, int(p['bias_term'])), (6, weight_size)]


def _conv(layer, graph, int8, guarded, out):
    p, quant = layer.params, layer.quant
    weight = layer.weights['weight']
    grouped = p['groups'] > 1
    pairs = _conv_geometry(p, p['num_output'], weight.size)
    if grouped:
        pairs.append((7, p['groups']))
    use_int8 = int8 and quant is not None and quant.int8
    top_scale = requantized_scale(graph, layer) if use_int8 else None
    if use_int8:
        pairs.append((8, (1 if grouped else 2) + (100 if top_scale is not None else 0)))
    pairs += _activation_params(p['activation'])
    if use_int8 and layer.name in guarded:
        pairs.append((31, NO_WINOGRAD))
    _weights(layer, int8, use_int8, out)
    if use_int8:
        out.raw(layer.group_scales() if grouped else quant.weight_scales)
        out.raw([quant.input_scale])
        if top_scale is not None:
            out.raw([top_scale])
    return ('ConvolutionDepthWise' if grouped else 'Convolution'), pairs


def _split_conv(layer, bottom, guarded, out):
    """The lines [(type, name, bottoms, tops, pairs)] of an int8 grouped conv written as
    Slice -> one int8 Convolution per group -> Concat (``splits_groups``); blobs into ``out``.

    Each group's Convolution is the one ncnn's ConvolutionDepthWise would create: that
    group's codes and bias, its scale for each of its outputs (8=2), the layer's input
    scale, the fused activation, and ``31=64`` when the layer is Winograd-guarded (the
    per-group channel counts, hence ncnn's Winograd choice, are the same). The Concat
    carries the layer's name, so the output blob keeps it."""
    p, quant = layer.params, layer.quant
    groups = p['groups']
    codes, bias = quant.weight_codes, layer.weights.get('bias')
    outputs, inputs = p['num_output'] // groups, codes.shape[1]
    slices = [f"{layer.name}_slice_{g}" for g in range(groups)]
    parts = [f"{layer.name}_group_{g}" for g in range(groups)]
    lines = [('Slice', f"{layer.name}_slice", [bottom], slices,
              [(0, IntArray([inputs] * groups)), (1, 0)])]
    for g in range(groups):
        rows = slice(g * outputs, (g + 1) * outputs)
        pairs = _conv_geometry(p, outputs, codes[rows].size) + [(8, 2)]
        pairs += _activation_params(p['activation'])
        if layer.name in guarded:
            pairs.append((31, NO_WINOGRAD))
        out.tagged(codes[rows], int8=True)
        if p['bias_term']:
            out.raw(bias[rows])
        out.raw(quant.weight_scales[rows])
        out.raw([quant.input_scale])
        lines.append(('Convolution', parts[g], [slices[g]], [parts[g]], pairs))
    lines.append(('Concat', layer.name, parts, [layer.name], [(0, 0)]))
    return lines


def _weights(layer, int8, use_int8, out):
    """Weight blob (int8 codes, dequantized weight-only codes, or float) and raw bias."""
    quant = layer.quant
    if use_int8:
        out.tagged(quant.weight_codes, int8=True)
    elif int8 and quant is not None:  # weight-only: the simulation's dequantized weights
        shape = (-1,) + (1,) * (quant.weight_codes.ndim - 1)
        out.tagged(quant.weight_codes.astype(np.float32)
                   / quant.weight_scales.reshape(shape))
    else:
        out.tagged(layer.weights['weight'])
    if layer.params['bias_term']:
        out.raw(layer.weights['bias'])


def _inner_product(layer, graph, int8, guarded, out):
    p, quant = layer.params, layer.quant
    use_int8 = int8 and quant is not None and quant.int8
    pairs = [(0, p['num_output']), (1, int(p['bias_term'])), (2, layer.weights['weight'].size)]
    if use_int8:
        pairs.append((8, 2))
    pairs += _activation_params(p['activation'])
    _weights(layer, int8, use_int8, out)
    if use_int8:
        out.raw(quant.weight_scales)
        out.raw([quant.input_scale])
    return 'InnerProduct', pairs


def _batchnorm(layer, graph, int8, guarded, out):
    w = layer.weights
    for key in ('gamma', 'mean', 'var', 'beta'):  # ncnn order: slope, mean, var, bias
        out.raw(w[key])
    return 'BatchNorm', [(0, layer.params['channels']), (1, float(layer.params['eps']))]


def _pooling(layer, graph, int8, guarded, out):
    p = layer.params
    pairs = [(0, 0 if p['pool'] == 'max' else 1)]
    if p['global_pool']:
        return 'Pooling', pairs + [(4, 1)]
    (kh, kw), (sh, sw), (ph, pw) = p['kernel'], p['stride'], p['pad']
    pairs += [(1, kw), (11, kh), (2, sw), (12, sh), (3, pw), (14, pw), (13, ph), (15, ph),
              (5, 0 if p['full'] else 1)]
    if p['pool'] == 'avg':
        pairs.append((6, int(p['count_include_pad'])))
    return 'Pooling', pairs


def _simple(kind, make_pairs):
    return lambda layer, graph, int8, guarded, out: (kind, make_pairs(layer.params))


# IR kind -> writer(layer, graph, int8, guarded, bin) -> (ncnn type, [(id, value)]).
WRITERS = {
    'Input': _simple('Input', lambda p: [(0, p['shape'][2]), (1, p['shape'][1]),
                                         (2, p['shape'][0])]),
    'Convolution': _conv,
    'InnerProduct': _inner_product,
    'BatchNorm': _batchnorm,
    'ReLU': _simple('ReLU', lambda p: [(0, float(p['slope']))] if p['slope'] else []),
    'Clip': _simple('Clip', lambda p: [(0, float(p['low'])), (1, float(p['high']))]),
    'Sigmoid': _simple('Sigmoid', lambda p: []),
    'Pooling': _pooling,
    'Eltwise': _simple('Eltwise', lambda p: [(0, {'prod': 0, 'sum': 1, 'max': 2}[p['op']])]),
    'Concat': _simple('Concat', lambda p: [(0, p['axis'] - 1)]),
    'Flatten': _simple('Flatten', lambda p: []),
    'Softmax': _simple('Softmax', lambda p: [(0, p['axis'] - 1), (1, 1)]),
    'Padding': _simple('Padding', lambda p: [
        (0, p['top']), (1, p['bottom']), (2, p['left']), (3, p['right']),
        (4, {'constant': 0, 'edge': 1, 'reflect': 2}[p['mode']]), (5, float(p['value']))]),
    'ShuffleChannel': _simple('ShuffleChannel', lambda p: [(0, p['group'])]),
}


# ncnn gives a 1-D blob from these (global pooling, InnerProduct, Flatten) and keeps 1-D
# through the elementwise kinds.
FLATTENING = {'InnerProduct', 'Flatten'}
ELEMENTWISE = {'BatchNorm', 'ReLU', 'Clip', 'Sigmoid', 'Eltwise', 'Concat', 'Softmax'}


def _line(kind, name, bottoms, tops, pairs):
    head = f"{kind:<24} {name:<24} {len(bottoms)} {len(tops)}"
    return ' '.join([head] + list(bottoms) + list(tops) + _params(pairs))


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
    flat = set()  # blobs that are 1-D in ncnn (MXNet keeps (N, C, 1, 1))
    for layer in graph.layers:
        if layer.kind not in WRITERS:
            raise UserError(f"layer {layer.name}: kind {layer.kind!r} has no ncnn writer; "
                             f"valid: {sorted(WRITERS)}")
        bottoms = [next(branches[b]) if b in branches else b for b in layer.inputs]
        if layer.kind in FLATTENING or (layer.kind == 'Pooling' and layer.params['global_pool']) \
                or (layer.kind in ELEMENTWISE and layer.inputs[0] in flat):
            flat.add(layer.name)
        if layer.kind == 'Convolution' and layer.inputs[0] in flat:
            # A conv after global pooling (e.g. a classifier, an SE block) needs its 3-D
            # input back; ncnn's Convolution on a 1-D blob is a deprecated, wrong int8 path.
            channels = layer.weights['weight'].shape[1] * layer.params['groups']
            reshaped = f"{layer.name}_reshape"
            lines.append(_line('Reshape', reshaped, bottoms[:1], [reshaped],
                               [(0, 1), (1, 1), (2, channels)]))
            blobs.add(reshaped)
            bottoms = [reshaped] + bottoms[1:]
        if int8 and splits_groups(graph, layer):
            for kind, name, ins, outs, pairs in _split_conv(layer, bottoms[0], guarded, out):
                lines.append(_line(kind, name, ins, outs, pairs))
                blobs.update(ins + outs)
        else:
            kind, pairs = WRITERS[layer.kind](layer, graph, int8, guarded, out)
            lines.append(_line(kind, layer.name, bottoms, [layer.name], pairs))
            blobs.update(bottoms + [layer.name])
        if uses.get(layer.name, 0) > 1:
            tops = [f"{layer.name}_splitncnn_{i}" for i in range(uses[layer.name])]
            lines.append(_line('Split', f"splitncnn_{len(branches)}", [layer.name], tops, []))
            blobs.update(tops)
            branches[layer.name] = iter(tops)
    text = f"{MAGIC}\n{len(lines)} {len(blobs)}\n" + '\n'.join(lines) + '\n'
    return text, out.bytes()


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
    following the blob order of the contract (§2.4): 'weight' (int8 codes or float32), 'bias',
    'weight_scales', 'input_scale', 'top_scale' / BatchNorm 'slope', 'mean', 'var', 'bias'.
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
        if kind in ('Convolution', 'ConvolutionDepthWise', 'InnerProduct'):
            size_id, bias_id = (2, 1) if kind == 'InnerProduct' else (6, 5)
            (tag,) = struct.unpack_from('<I', data, offset)
            offset += 4
            blobs = {'weight': take(p[size_id], np.int8 if tag == TAG_INT8 else '<f4')}
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
