"""Latency-aware int8 (``qat.deploy.latency``) against all-int8 and fp32 ncnn models.

    python -m benchmarks.latency [--rounds 30] [--threads 1 2] [--models name:size ...]

Per model and thread count: random-init GluonCV net with randomized BN statistics,
max-calibrated (``qat.app.models.calibrated_random``); ``latency_aware`` times each group of
int8 layers fp32 against the all-int8 model and keeps fp32 the groups that save >= 2 %; then
the fp32, all-int8 and chosen models are timed interleaved (median of ``--rounds``). The
output error of each ncnn model vs the MXNet float net: max |ncnn - float| / max |float| over
4 random images.
"""
import tempfile

import mxnet as mx
import numpy as np

import qat
from qat.app.models import calibrated_random
from qat.deploy.export import read_manifest
from qat.deploy.latency import latency_aware
from qat.deploy.verify import NcnnModel
from qat.modes import temporary_mode
from qat.nn import quant_blocks

from .common import add_models_option, parse_models, parser

MODELS = (('mobilenetv2_1.0', 224), ('mobilenet1.0', 224), ('resnet18_v1', 224))


def _output_error(net, size, samples):
    """max |ncnn int8 - float| / max |float| of the net's current export."""
    with temporary_mode(net, quantize=False):
        reference = net(mx.nd.array(samples)).asnumpy()
    with tempfile.TemporaryDirectory() as folder:
        paths = qat.export(net, folder, (3, size, size))
        output = read_manifest(folder)['outputs'][0]
        model = NcnnModel(paths['int8_param'], paths['int8_bin'])
        ours = np.stack([model.run(s, [output])[output].ravel() for s in samples])
    return float(np.abs(ours - reference.reshape(len(samples), -1)).max()
                 / np.abs(reference).max())


def latency_benchmark(models=MODELS, threads=(1, 2), rounds=30, progress=print):
    rows = []
    for name, size in models:
        samples = np.random.RandomState(5).normal(0, 1, (4, 3, size, size)).astype(np.float32)
        for count in threads:
            net = calibrated_random(name, size)
            all_int8_error = _output_error(net, size, samples)
            progress(f"{name} ({size}), {count} thread(s): latency-aware choice")
            report = latency_aware(net, (3, size, size), threads=count, rounds=rounds)
            rows.append({'model': f"{name} ({size})", 'threads': count, 'report': report,
                         'layers': len(quant_blocks(net)),
                         'errors': (all_int8_error, _output_error(net, size, samples))})
    return rows


def format_latency_table(rows):
    lines = ["| model (input) | threads | fp32 ms | all-int8 ms | latency-aware ms | all-int8 / "
             "fp32 | latency-aware / fp32 | layers kept fp32 | output error all-int8 / "
             "latency-aware |", '|' + '---|' * 9]
    for row in rows:
        r = row['report']
        lines.append(f"| {row['model']} | {row['threads']} | {r['fp32_ms']:.2f} | "
                     f"{r['all_int8_ms']:.2f} | {r['chosen_ms']:.2f} | "
                     f"{r['all_int8_ms'] / r['fp32_ms']:.2f} | "
                     f"{r['chosen_ms'] / r['fp32_ms']:.2f} | "
                     f"{len(r['kept_fp32'])}/{row['layers']} "
                     f"({', '.join(g['group'] for g in r['groups'] if g['fp32']) or '-'}) | "
                     f"{row['errors'][0]:.4f} / {row['errors'][1]:.4f} |")
    return '\n'.join(lines)


def main(argv=None):
    arguments = parser('benchmarks.latency', __doc__)
    arguments.add_argument('--rounds', type=int, default=30, help='timed runs per variant')
    arguments.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    add_models_option(arguments, MODELS)
    args = arguments.parse_args(argv)
    print(format_latency_table(latency_benchmark(parse_models(args.models), args.threads,
                                                 args.rounds)))


if __name__ == '__main__':
    main()
