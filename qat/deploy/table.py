"""The ncnn calibration table (the format ``ncnn2table`` writes and ``ncnn2int8`` reads).

One line per entry, tokens separated by single spaces, no empty lines (an empty line ends
ncnn's parser)::

    <layer>_param_0 s_w0 s_w1 ...   weight scales: per output channel, per group if grouped
    <layer> s_in                    the scale of the layer's input blob

Only int8 layers get lines; a layer without lines stays fp32 in ncnn (mixed precision).
Values carry 9 significant digits, so ``sscanf("%f")`` gives back the exact float32.
"""
import numpy as np

from ..errors import UserError

WEIGHT_SUFFIX = '_param_0'


def _value(v):
    return '%.9g' % float(np.float32(v))


def render_table(graph):
    """Table text for every int8 layer of ``graph`` (weight lines first, as ncnn2table)."""
    int8 = [layer for layer in graph.layers if layer.quant is not None and layer.quant.int8]
    lines = [layer.name + WEIGHT_SUFFIX + ' ' + ' '.join(_value(s) for s in layer.group_scales())
             for layer in int8]
    lines += [f"{layer.name} {_value(layer.quant.input_scale)}" for layer in int8]
    return '\n'.join(lines) + ('\n' if lines else '')


def read_table(path):
    """({layer: weight scales (float32 array)}, {layer: input scale (float32)}) from a table.
    Raises ValueError naming the file and line for a malformed line."""
    weights, inputs = {}, {}
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            tokens = line.split()
            if not tokens:
                break  # as ncnn: an empty line ends the table
            try:
                values = np.array([float(t) for t in tokens[1:]], np.float32)
            except ValueError as err:
                raise UserError(f"{path}:{number}: not a number in {line.strip()!r}") from err
            if len(values) == 0:
                raise UserError(f"{path}:{number}: {tokens[0]} has no values")
            if tokens[0].endswith(WEIGHT_SUFFIX):
                weights[tokens[0][:-len(WEIGHT_SUFFIX)]] = values
            elif len(values) == 1:
                inputs[tokens[0]] = values[0]
            else:
                raise UserError(f"{path}:{number}: input scale line {tokens[0]} has "
                                 f"{len(values)} values, expected 1")
    return weights, inputs
