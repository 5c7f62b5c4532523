"""Post-training quantization of a float Gluon model, and the ``qat calibrate`` command.

``qat calibrate`` is ncnn2table + ncnn2int8 for a Gluon model: it builds the float model
(a GluonCV name, a ``module:function`` factory, optionally with saved ``--params``, or a
model file read by ``qat.importers``: ``x-symbol.json``, ``x.onnx``, ``x.prototxt``,
``x.param``, with ``--weights`` when its weights file is not the one next to it), reads
calibration images from a folder or a list file, preprocesses them as ncnn does
(``(pixel - mean) * norm`` after a resize to ``--shape``, in ``--pixel`` order), converts
the model, calibrates it with ``--method`` (several: each tried, the one whose outputs agree
best with float kept, ``qat.analysis.selection``) and writes the table and the ncnn
fp32/int8 models (and Caffe) through ``qat.deploy.export``. Layers matching ``--exclude``
stay fp32 (no table lines: ncnn's mixed precision). A GluonCV detector exports with ncnn's
detection layers (``--confidence-threshold``), a zoo SSD's backbone rebuilt first so that
it is quantized too.

Only single-input models are supported (ncnn2table's comma-separated lists for several
inputs are refused with a clear error): calibration and export feed one input blob, 'data'.
"""
import argparse
import ctypes
import fnmatch
import json
import os
import sys
import time

import mxnet as mx
import numpy as np
from mxnet.gluon import nn

from . import models
from ..analysis import comparison, selection, tasks
from ..calibration import ENGINES, METHODS, calibrate, easyquant
from ..config import BITS, QuantScheme
from ..convert import convert_model
from ..deploy import WINOGRAD_POLICIES, export, format_report, verify
from ..deploy.latency import format_latency, latency_aware
from ..fileio import atomic_write, write_json
from ..errors import UserError, reason
from ..nn import quant_blocks, walk
from ..report import write_report
from .data import IMAGE_EXTENSIONS, FileSet, Preprocess, iterate
from .detectors import gluon_backbone

SEARCH_SAMPLES = easyquant.MAX_SAMPLES
DESCRIPTION = ("ncnn2table + ncnn2int8 for a float Gluon model: build it (GluonCV name, "
               "module:function factory, --params, or a model file: x-symbol.json, x.onnx, "
               "x.prototxt, x.param, --weights), read calibration images (folder or list "
               "file), preprocess them as ncnn does ((pixel - mean) * norm after a resize to "
               "--shape W,H,C, in --pixel order), convert, calibrate with --method and write "
               "the table and the ncnn fp32/int8 models. Layers matching --exclude stay fp32 "
               "(no table lines). Single-input models only.")


class UsageError(UserError):
    """A bad command-line value; the message names the option, file or value."""


# ----- command-line values --------------------------------------------------------------------
PIXELS = {'RGB': 3, 'BGR': 3, 'GRAY': 1}   # --pixel -> channels


def _several_inputs(option, text):
    raise UsageError(f"{option} {text}: several inputs (ncnn2table's comma-separated lists) "
                     f"are not supported; qat calibrate handles single-input models")


def parse_numbers(option, text, kind=float):
    """'1,2,3' or '[1,2,3]' -> a list of numbers; a list of lists is refused."""
    stripped = text.strip()
    if '],[' in stripped.replace(' ', '') or '][' in stripped.replace(' ', ''):
        _several_inputs(option, text)
    stripped = stripped.strip('[]')
    try:
        return [kind(v) for v in stripped.split(',') if v.strip()]
    except ValueError:
        raise UsageError(f"{option} {text}: expected comma-separated "
                         f"{'integers' if kind is int else 'numbers'}") from None


def parse_shape(text, pixel):
    """``--shape W,H[,C]`` (ncnn's w,h,c order) -> (C, H, W). C defaults from ``pixel``."""
    values = parse_numbers('--shape', text, int)
    if len(values) == 2:
        values.append(PIXELS[pixel])
    if len(values) != 3:
        raise UsageError(f"--shape {text}: expected W,H,C (ncnn's order: width, height, "
                         f"channels), got {len(values)} values")
    width, height, channels = values
    if width <= 0 or height <= 0:
        raise UsageError(f"--shape {text}: width and height must be positive (images are "
                         f"resized to exactly W x H)")
    if channels != PIXELS[pixel]:
        raise UsageError(f"--shape {text}: C={channels} does not match --pixel {pixel} "
                         f"({PIXELS[pixel]} channel{'s' if PIXELS[pixel] > 1 else ''})")
    return channels, height, width


def parse_channel_values(option, text, channels, default, from_file=None):
    """Per-channel ``--mean`` / ``--norm`` values (exactly ``channels`` of them); without the
    option, the model file's own values ``from_file`` (one for all channels, or one each)
    when it has them, else ``default``."""
    if text is None and from_file:
        values = list(from_file) * (channels if len(from_file) == 1 else 1)
        if len(values) != channels:
            raise UsageError(f"{option}: the model file gives {len(from_file)} value(s) for "
                             f"{channels} channel(s); give {option}")
        return values
    if text is None:
        return [default] * channels
    values = parse_numbers(option, text)
    if len(values) != channels:
        raise UsageError(f"{option} {text}: {len(values)} value(s), but the input has "
                         f"{channels} channel(s) (--shape, --pixel); give one per channel")
    if not all(np.isfinite(values)):
        raise UsageError(f"{option} {text}: values must be finite")
    return values


def image_paths(spec):
    """The calibration images named by ``--images``: a folder (searched recursively for
    image files), a list file (one path per line, as ``find images/ -type f``; paths
    relative to the current folder or to the list's folder; '#' comments), or one image."""
    if ',' in spec and not os.path.exists(spec):
        _several_inputs('--images', spec)
    if os.path.isdir(spec):
        paths = sorted(os.path.join(root, name) for root, _, names in os.walk(spec)
                       for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
        if not paths:
            raise UsageError(f"--images {spec}: the folder has no image files "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        return paths
    if not os.path.isfile(spec):
        raise UsageError(f"--images {spec}: no such folder or list file")
    if spec.lower().endswith(IMAGE_EXTENSIONS):
        return [spec]
    try:
        with open(spec, encoding='utf-8') as handle:
            lines = handle.read().splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"--images {spec}: not a text list file (give a folder, an image "
                         f"list with one path per line, or one image)") from None
    except OSError as err:
        raise UsageError(f"--images {spec}: cannot read the list: {err.strerror}") from None
    base = os.path.dirname(os.path.abspath(spec))
    paths = []
    for number, line in enumerate(lines, 1):
        path = line.strip()
        if not path or path.startswith('#'):
            continue
        if not os.path.isabs(path) and not os.path.isfile(path):
            path = os.path.join(base, path)
        if not os.path.isfile(path):
            raise UsageError(f"--images {spec}:{number}: image not found: {line.strip()}")
        paths.append(path)
    if not paths:
        raise UsageError(f"--images {spec}: the list names no images (empty list file)")
    return paths


class ImageBatches:
    """Re-iterable preprocessed NCHW batches of image files (decoded on every pass, by
    ``workers`` threads), printing progress about every 10% of a pass."""

    def __init__(self, paths, preprocess, batch_size, workers=0, progress=None):
        self.dataset = FileSet(paths, [0] * len(paths), 'calibration images')
        self.preprocess, self.batch_size, self.workers = preprocess, batch_size, workers
        self.progress, self.passes = progress, 0

    def __len__(self):
        return (len(self.dataset) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        self.passes += 1
        every = max(1, len(self) // 10)
        start = time.perf_counter()
        try:
            for number, (x, _) in enumerate(iterate(self.dataset, self.preprocess,
                                                    self.batch_size, workers=self.workers), 1):
                yield x
                if self.progress and (number % every == 0 or number == len(self)):
                    self.progress(f"      images, pass {self.passes}: {number}/{len(self)} "
                                  f"batches ({time.perf_counter() - start:.1f} s)")
        except ValueError as err:  # qat.app.data names the image that cannot be decoded
            raise UsageError(f"--images: {err}") from None


# ----- the model -------------------------------------------------------------------------------
def build_model(name, kwargs, params=None, pretrained=False, seed=0, weights=None):
    """The float model (``qat.app.models.build``); a problem is a UsageError naming
    --model, --model-kwargs, --params or --weights."""
    try:
        return models.build(name, kwargs, params=params, pretrained=pretrained, seed=seed,
                            label=f"--model {name}", weights=weights)
    except models.ModelError as err:
        option = '--params' if params and str(err).startswith(params) else \
            '--weights' if weights and str(err).startswith(weights) else '--model'
        raise UsageError(f"{option} {err}") from None


def model_file(args):
    """(the net, what its file says about preprocessing) for a model file ``--model``, built
    before the preprocessing flags are read since it gives their defaults; (None, {}) for
    the other models."""
    if models.source_of(args.model) != 'file':
        if args.weights:
            raise UsageError(f"--weights {args.weights}: only with a model file (--model "
                             f"x-symbol.json, x.onnx, x.prototxt, x.param); saved Gluon "
                             f"parameters are --params")
        return None, {}
    net = build_model(args.model, {}, args.params, weights=args.weights)
    return net, net.preprocess


def check_input_shape(net, shape, text):
    """Run the model once on zeros of ``shape`` (C, H, W); a shape the model rejects is a
    UsageError naming --shape."""
    try:
        out = net(mx.nd.zeros((1,) + tuple(shape)))
        (out[0] if isinstance(out, (list, tuple)) else out).wait_to_read()
    except mx.base.MXNetError as err:
        first = reason(err)
        raise UsageError(f"--shape {text}: the model does not accept an input of shape "
                         f"(1, {', '.join(map(str, shape))}) (N, C, H, W): "
                         f"{first.strip()}") from None


def layer_names(net):
    """Names of the convertible layers (Conv2D, Dense), in network order."""
    return [block.name for _, _, _, block in walk(net) if isinstance(block, (nn.Conv2D,
                                                                             nn.Dense))]


def check_excludes(net, patterns):
    names = layer_names(net)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise UsageError(f"--exclude {pattern}: matches no layer; layers: "
                             f"{', '.join(names)}")


def check_output(folder):
    """``--output`` is, or can become, a writable folder (checked before any work, without
    creating anything)."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--output {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output {folder}: {existing} is not writable")


def set_threads(threads):
    """CPU threads of MXNet's operators (OpenMP)."""
    mx.base._LIB.MXSetNumOMPThreads(ctypes.c_int(threads))


# ----- the command -----------------------------------------------------------------------------
def add_arguments(parser):
    """The ``qat calibrate`` options."""
    model = parser.add_argument_group('model')
    model.add_argument('--model', required=True,
                       help="GluonCV model name (cifar_resnet20_v1), a module:function "
                            "factory (mypkg.nets:build) returning a Gluon block, or a model "
                            "file: x-symbol.json, x.onnx, x.prototxt (Caffe), x.param (ncnn "
                            "fp32)")
    model.add_argument('--weights', metavar='FILE',
                       help="the model file's weights (default: next to it: x-0000.params, "
                            "x.caffemodel, x.bin)")
    model.add_argument('--model-kwargs', default='{}', metavar='JSON',
                       help='keyword arguments of the model, as JSON (\'{"classes": 10}\')')
    model.add_argument('--params', help='float parameters saved with save_parameters')
    model.add_argument('--pretrained', action='store_true',
                       help='GluonCV pretrained weights (downloaded or cached)')
    data = parser.add_argument_group('calibration images (as ncnn2table)')
    data.add_argument('--images', required=True, action='append',
                      help='folder of images (searched recursively), a list file with one '
                           'image path per line, or one image')
    data.add_argument('--shape', required=True, metavar='W,H,C',
                      help="input size in ncnn's order: width,height,channels (images are "
                           "resized to exactly W x H; C is 3 for RGB/BGR, 1 for GRAY)")
    data.add_argument('--mean', metavar='M0,M1,M2',
                      help="per-channel mean in --pixel order, pixel units (default: the "
                           "model file's, e.g. a Caffe transform_param, else 0)")
    data.add_argument('--norm', metavar='N0,N1,N2',
                      help="per-channel multiplier applied after the mean: (x - mean) * norm "
                           "(default: the model file's, else 1)")
    data.add_argument('--pixel', choices=sorted(PIXELS),
                      help="channel order the model expects (default: the model file's, "
                           "e.g. BGR for Caffe, else RGB)")
    data.add_argument('--num-images', type=int, help='use at most this many images')
    data.add_argument('--batch-size', type=int, default=16)
    quant = parser.add_argument_group('quantization')
    quant.add_argument('--method', default='kl', metavar='METHOD[,METHOD...]',
                       help=f"calibration method (default kl): {', '.join(sorted(METHODS))}; "
                            f"easyquant = kl, then the EasyQuant scale search on the first "
                            f"{SEARCH_SAMPLES} images. Several (kl,mse,aciq): each is tried "
                            f"and the one whose outputs (a detector's raw heads) agree best "
                            f"with float on the first {selection.SCORED_SAMPLES} images is "
                            f"kept (<name>-methods.md)")
    quant.add_argument('--engine', default='mxnet', metavar='ENGINE',
                       help="what computes the float activations calibration reads (default "
                            "mxnet): mxnet, the converted net in MXNet; ncnn, its exported "
                            "fp32 ncnn model in the ncnn runtime (--threads), one image at a "
                            "time (the activations the int8 model's layers read; faster on "
                            "an idle CPU, as fast under load). EasyQuant's search itself "
                            "runs in MXNet")
    quant.add_argument('--bits', type=int, default=8, help='weight and input bits (2..8)')
    quant.add_argument('--weight-bits', type=int, help='weight bits (default --bits)')
    quant.add_argument('--input-bits', type=int, help='input bits (default --bits)')
    quant.add_argument('--first-layer-bits', type=int,
                       help='bits of the first layer (default: as the others)')
    quant.add_argument('--winograd-weight-bits', type=int,
                       help="weight bits of every 3x3 stride-1 conv (ncnn2table's rule: 6, so "
                            "that ncnn's int8 Winograd stays exact); default: as the others")
    quant.add_argument('--unsigned-after-relu', action='store_true',
                       help='unsigned input codes (twice the levels) for the layers of 7 input '
                            'bits or fewer whose input is >= 0 (after a ReLU, ...)')
    quant.add_argument('--weight-granularity', '--granularity', dest='weight_granularity',
                       default='channel', choices=('channel', 'tensor'),
                       help='weight scales per output channel (per group) or per tensor')
    quant.add_argument('--exclude', action='append', default=[], metavar='PATTERN',
                       help='layers (glob on names) kept fp32: no table lines; repeatable')
    out = parser.add_argument_group('output')
    out.add_argument('--output', required=True, help='output folder')
    out.add_argument('--name', default='model', help='file name stem (default model)')
    out.add_argument('--winograd', default='bound',
                     help="int8 Winograd guard policy of qat.deploy.export (default bound)")
    out.add_argument('--confidence-threshold', type=float, metavar='T',
                     help="detectors (GluonCV SSD / YOLOv3): score threshold of the exported "
                          "ncnn decoding (default: the net's own)")
    out.add_argument('--threads', type=int,
                     help="CPU threads for inference and image decoding (default: MXNet's "
                          "own, all cores; decoding on up to 4)")
    out.add_argument('--latency-aware', action='store_true',
                     help='time each group of int8 layers fp32 in the ncnn runtime (with '
                          '--threads) and keep fp32 those that make the model faster; the '
                          'choice is written to <name>-latency.md')
    out.add_argument('--compare', type=int, default=0, metavar='N',
                     help='write <name>-layers.md/.png: every layer float vs simulated vs ncnn '
                          'int8 (cosine, max error) on N calibration images')
    out.add_argument('--verify', type=int, default=0, metavar='N',
                     help='run the ncnn models on N calibration images and compare with the '
                          'simulation (qat.deploy.verify)')
    return parser


def quant_scheme(args):
    """The QuantScheme of the flags (the same path as a recipe's ``quantize`` section)."""
    low, high = BITS
    for option in ('bits', 'weight_bits', 'input_bits', 'first_layer_bits',
                   'winograd_weight_bits'):
        value = getattr(args, option)
        if value is not None and not low <= value <= high:
            raise UsageError(f"--{option.replace('_', '-')} {value}: bits must be in "
                             f"{low}..{high}")
    return QuantScheme.from_dict({
        'weight_bits': args.weight_bits or args.bits, 'input_bits': args.input_bits or args.bits,
        'weight_granularity': args.weight_granularity, 'first_layer_bits': args.first_layer_bits,
        'winograd_weight_bits': args.winograd_weight_bits,
        'unsigned_after_relu': args.unsigned_after_relu,
        'exclude': args.exclude}, origin='qat calibrate')


def parse_methods(text):
    """``--method kl`` or ``kl,mse,aciq`` -> the list of calibration methods."""
    methods = [m.strip() for m in text.split(',') if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"--method {text}: unknown method {', '.join(unknown) or '(none)'}; "
                         f"valid: {', '.join(sorted(METHODS))}")
    return methods


def detection_options(args, net):
    """``export(detection=...)`` of the flags: only for a GluonCV detector."""
    if args.confidence_threshold is None:
        return {}
    if tasks.head_blocks(net) is None:
        raise UsageError(f"--confidence-threshold: {args.model} is not a GluonCV SSD / "
                         f"YOLOv3 detector")
    if not 0 <= args.confidence_threshold <= 1:
        raise UsageError(f"--confidence-threshold {args.confidence_threshold}: must be in "
                         f"[0, 1]")
    return {'detection': {'confidence_threshold': args.confidence_threshold}}


def _run(args, out):
    methods = parse_methods(args.method)
    if len(args.images) > 1:
        _several_inputs('--images', ' --images '.join(args.images))
    if args.winograd not in WINOGRAD_POLICIES:
        raise UsageError(f"--winograd {args.winograd}: valid: {sorted(WINOGRAD_POLICIES)}")
    if args.engine not in ENGINES:
        raise UsageError(f"--engine {args.engine}: unknown calibration engine; valid: "
                         f"{', '.join(sorted(ENGINES))}")
    lowest = {'threads': 1, 'batch_size': 1, 'num_images': 1, 'compare': 0, 'verify': 0}
    for option, low in lowest.items():
        value = getattr(args, option)
        if value is not None and value < low:
            raise UsageError(f"--{option.replace('_', '-')} {value}: must be >= {low}")
    net, source = model_file(args)
    pixel = args.pixel or source.get('pixel', 'RGB')
    shape = parse_shape(args.shape, pixel)
    mean = parse_channel_values('--mean', args.mean, shape[0], 0.0, source.get('mean'))
    norm = parse_channel_values('--norm', args.norm, shape[0], 1.0, source.get('norm'))
    if any(n == 0 for n in norm):
        raise UsageError(f"--norm {args.norm}: values must be non-zero")
    scheme = quant_scheme(args)
    config = scheme.default
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        raise UsageError(f"--model-kwargs {args.model_kwargs}: not JSON: {err}") from None
    if not isinstance(kwargs, dict):
        raise UsageError(f"--model-kwargs {args.model_kwargs}: expected a JSON object")
    paths = image_paths(args.images[0])
    check_output(args.output)
    if args.num_images:
        paths = paths[:args.num_images]
    if args.threads:
        set_threads(args.threads)
    weights = (f"parameters {args.params}" if args.params else
               'pretrained' if args.pretrained else 'its own weights' if net is not None
               else 'random weights')
    out(f"[1/4] model {args.model} ({weights}), input (C, H, W) = {shape}")
    if source:
        out(f"      preprocessing from the file: {source} (flags override)")
    net = net or build_model(args.model, kwargs, args.params, args.pretrained)
    check_input_shape(net, shape, args.shape)
    if tasks.head_blocks(net) is not None:
        replaced = gluon_backbone(net)  # a zoo SSD's SymbolBlock backbone, quantized too
        if replaced:
            out(f"      detector: backbone {', '.join(replaced)} rebuilt as Gluon layers")
    options = detection_options(args, net)
    check_excludes(net, args.exclude)
    total = len(layer_names(net))
    convert_model(net, config=scheme)
    blocks = [block for _, block in quant_blocks(net)]
    if not blocks:
        raise UsageError(f"--model {args.model}: no layer to quantize (every Conv2D/Dense "
                         f"excluded?)")
    out(f"      {len(blocks)} layers quantized (W{config.weight_bits}A{config.input_bits}), "
        f"{total - len(blocks)} kept fp32")
    # ncnn's substract_mean_normalize multiplies by norm; Preprocess holds std = 1 / norm.
    preprocess = Preprocess(size=shape[1:], channels=shape[0], mean=tuple(mean),
                            std=tuple(1.0 / n for n in norm),
                            pixel='RGB' if pixel == 'GRAY' else pixel)
    # decoding threads keep the next batch ready while MXNet computes (order kept: map)
    data = ImageBatches(paths, preprocess, args.batch_size,
                        workers=args.threads or min(4, os.cpu_count() or 1), progress=out)
    out(f"[2/4] calibrating with {args.method} on {len(paths)} images "
        f"({len(data)} batches of {args.batch_size}), engine {args.engine}")
    started = time.perf_counter()
    choice = None
    engine = {'engine': args.engine, 'threads': args.threads}
    if len(methods) == 1:
        calibrate(net, data, methods[0], progress=lambda m: out('      ' + m), **engine)
    else:
        choice = selection.choose_method(net, data, methods,
                                         progress=lambda m: out('      ' + m), **engine)
        out(selection.format_choice(choice))
    out(f"      done in {time.perf_counter() - started:.1f} s")
    latency = None
    if args.latency_aware:
        latency = format_latency(latency_aware(net, shape, threads=args.threads or 1,
                                               progress=lambda m: out('      ' + m)))
        out(latency)
    out(f"[3/4] writing {args.name}.table and the ncnn int8 model into {args.output}")
    files = export(net, args.output, shape, args.name, winograd=args.winograd, **options)
    write_json(os.path.join(args.output, "preprocess.json"), preprocess.ncnn())
    if choice is not None:
        atomic_write(os.path.join(args.output, f"{args.name}-methods.md"),
                     selection.format_choice(choice) + '\n')
    for kind in ('table', 'int8_param', 'int8_bin', 'param', 'bin'):
        out(f"      {files[kind]}")
    if latency is not None:
        atomic_write(os.path.join(args.output, f"{args.name}-latency.md"), latency + '\n')
    if args.compare:
        rows = comparison.layer_comparison(net, data, args.output, args.name,
                                           max_samples=args.compare,
                                           threads=args.threads or 1)
        report = write_report(comparison.format_comparison(rows),
                              lambda path: comparison.plot_comparison(rows, path), args.output,
                              f"{args.name}-layers")
        worst = min(rows, key=lambda row: row['ncnn_cosine'])
        out(f"      {report['table']}, {report['plot']} (lowest ncnn cosine vs float: "
            f"{worst['layer']} {worst['ncnn_cosine']:.6f})")
    if args.verify:
        out(f"[4/4] verifying with the ncnn runtime on {min(args.verify, len(paths))} images")
        report = verify(net, args.output, data, name=args.name, max_samples=args.verify,
                        threads=args.threads or 1)
        out(format_report(report))
        return 0 if report['passed'] else 1
    out("[4/4] done (verify with --verify N)")
    return 0


def run(args, out=print):
    """Run ``qat calibrate`` with parsed ``args``; a bad value prints one error line naming
    the option or file and exits with status 2. Returns the exit status otherwise."""
    try:
        return _run(args, lambda message: (out(message), sys.stdout.flush()))
    except (UserError, OSError) as err:  # UsageError, and what the library names
        print(f"qat calibrate: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv=None):
    """Stand-alone entry point (``python -m qat.app.ptq``); ``qat calibrate`` is the same."""
    parser = add_arguments(argparse.ArgumentParser(prog='qat calibrate',
                                                   description=DESCRIPTION))
    return run(parser.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
