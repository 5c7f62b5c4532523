"""Calibration speed: the whole ``qat calibrate`` command per method against a hybridized
float forward of the same net on the same images, and how time and memory grow with the
number of images.

    python -m benchmarks.calibration [--model resnet18_v1] [--size 224] [--images 100]
                                     [--methods max aciq kl] [--engines mxnet ncnn]
                                     [--rounds 3] [--threads 2] [--batch-size 16]
                                     [--scaling 25 50 100 200]

Random images (seeded, JPEG, 200-400 pixels a side) are written to a temporary folder and the
net is random-initialized (``qat calibrate`` without ``--params``). Each round runs every
method's command with every ``--engine`` of ``--engines`` (a fresh process: imports, model
build, conversion, decoding, calibration, export) and the float forward (this process: the
hybridized float net over the same preprocessed batches, decoding excluded) in turn, so machine
noise hits them alike. Figures: images / seconds, medians over the rounds with the min-max
spread; "step" is the command's own "done in" time of the calibration step; "vs float" divides
by the float forward's rate in the same round. Peak memory is the command process's peak
resident set (``wait4``). ``--scaling`` runs the first method (and ``kl`` if listed) once per
image count and engine.
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from .common import parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, NORM = '123.675,116.28,103.53', '0.01712,0.01751,0.01743'  # ImageNet's, ncnn style


def write_images(folder, count, seed=0):
    """``count`` random JPEG images (smooth noise, 200-400 pixels a side) in ``folder``."""
    import cv2
    rng = np.random.RandomState(seed)
    os.makedirs(folder, exist_ok=True)
    for number in range(count):
        height, width = rng.randint(200, 400, size=2)
        coarse = rng.randint(0, 256, size=(height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
        image = cv2.resize(coarse, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)
        noise = rng.randint(-20, 21, image.shape)
        cv2.imwrite(os.path.join(folder, f"{number:04d}.jpg"),
                    np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8))
    return folder


def command(model, size, folder, images, method, threads, batch_size, output, engine='mxnet'):
    return [sys.executable, '-m', 'qat.cli', 'calibrate', '--model', model, '--images', folder,
            '--num-images', str(images), '--shape', f"{size},{size},3", '--mean', MEAN,
            '--norm', NORM, '--method', method, '--threads', str(threads),
            '--batch-size', str(batch_size), '--engine', engine, '--output', output]


def run_command(argv):
    """(wall seconds, calibration step seconds, peak resident MB) of one command process."""
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
        start = time.perf_counter()
        process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak resident set
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, error = out.read(), err.read()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{error[-2000:]}")
    step = re.search(r"done in ([0-9.]+) s", text)
    return wall, float(step.group(1)) if step else float('nan'), usage.ru_maxrss / 1024


class Forward:
    """The hybridized float net over the preprocessed batches of the images (as ``qat
    calibrate`` reads and preprocesses them), timed without the decoding."""

    def __init__(self, model, size, folder, images, threads, batch_size):
        import mxnet as mx
        from qat.app import ptq
        from qat.app.data import Preprocess
        ptq.set_threads(threads)
        paths = ptq.image_paths(folder)[:images]
        preprocess = Preprocess(size=(size, size), channels=3,
                                mean=tuple(float(m) for m in MEAN.split(',')),
                                std=tuple(1 / float(n) for n in NORM.split(',')))
        self.batches = list(ptq.ImageBatches(paths, preprocess, batch_size, workers=threads))
        self.images, self.mx = len(paths), mx
        self.net = ptq.build_model(model, {})
        self.net.hybridize(static_alloc=True)
        self.net(self.batches[0]).wait_to_read()

    def seconds(self):
        start = time.perf_counter()
        for batch in self.batches:
            self.net(batch)
        self.mx.nd.waitall()
        return time.perf_counter() - start


def _spread(values, digits=1):
    return (f"{statistics.median(values):.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def speed(model, size, folder, images, methods, rounds, threads, batch_size, work, out=print,
          engines=('mxnet',)):
    """The per-method (and engine) table: whole command and calibration step img/s, vs the
    float forward."""
    forward = Forward(model, size, folder, images, threads, batch_size)
    kinds = [(method, engine) for engine in engines for method in methods]
    runs = {kind: [] for kind in kinds}
    floats = []
    for number in range(rounds):
        floats.append(images / forward.seconds())
        for method, engine in kinds:
            wall, step, peak = run_command(command(model, size, folder, images, method, threads,
                                                   batch_size,
                                                   os.path.join(work, f"{method}-{engine}"),
                                                   engine))
            runs[method, engine].append((images / wall, images / step, peak, floats[-1]))
        out(f"round {number + 1}/{rounds}: float {floats[-1]:.1f} img/s, " + ', '.join(
            f"{method}/{engine} {runs[method, engine][-1][0]:.1f}" for method, engine in kinds))
    rows = [['float forward (hybridized, this process)', _spread(floats), '', '1.00', '', '']]
    for method, engine in kinds:
        whole, step, peak, reference = zip(*runs[method, engine])
        rows.append([f"qat calibrate --method {method} --engine {engine}", _spread(whole),
                     _spread(step),
                     _spread([w / f for w, f in zip(whole, reference)], 2),
                     _spread([s / f for s, f in zip(step, reference)], 2), _spread(peak, 0)])
    from qat.report import format_table
    return (f"{model} at {size}x{size}, {images} images, batch {batch_size}, {threads} threads, "
            f"{rounds} rounds (median (min-max)):\n\n" + format_table(rows, [
                'what', 'whole command img/s', 'step img/s', 'whole vs float',
                'step vs float', 'peak MB']))


def scaling(model, size, folder, counts, methods, threads, batch_size, work,
            engines=('mxnet',)):
    """Whole command seconds, step seconds and peak memory per number of images."""
    rows = []
    for engine in engines:
        for method in methods:
            for images in counts:
                wall, step, peak = run_command(command(
                    model, size, folder, images, method, threads, batch_size,
                    os.path.join(work, f"{method}-{engine}"), engine))
                rows.append([method, engine, images, f"{wall:.1f}", f"{step:.1f}",
                             f"{images / step:.1f}", f"{peak:.0f}"])
    from qat.report import format_table
    return format_table(rows, ['method', 'engine', 'images', 'whole command s', 'step s',
                               'step img/s', 'peak MB'])


def main(argv=None):
    arguments = parser('benchmarks.calibration', __doc__)
    arguments.add_argument('--model', default='resnet18_v1', help='GluonCV model name')
    arguments.add_argument('--size', type=int, default=224, help='input size (pixels)')
    arguments.add_argument('--images', type=int, default=100, help='calibration images')
    arguments.add_argument('--methods', nargs='+', default=['max', 'aciq', 'kl'])
    arguments.add_argument('--engines', nargs='+', default=['mxnet', 'ncnn'],
                           choices=['mxnet', 'ncnn'], help='qat calibrate --engine values')
    arguments.add_argument('--rounds', type=int, default=3, help='interleaved rounds')
    arguments.add_argument('--threads', type=int, default=2)
    arguments.add_argument('--batch-size', type=int, default=16)
    arguments.add_argument('--scaling', type=int, nargs='*', default=[25, 50, 100, 200],
                           help='image counts of the scaling table (none: skip it)')
    args = arguments.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        folder = write_images(os.path.join(work, 'images'),
                              max([args.images] + list(args.scaling)))
        print(speed(args.model, args.size, folder, args.images, args.methods, args.rounds,
                    args.threads, args.batch_size, work, engines=args.engines))
        if args.scaling:
            kinds = list(dict.fromkeys([args.methods[0]] + [m for m in args.methods
                                                            if m == 'kl']))
            print('\n' + scaling(args.model, args.size, folder, args.scaling, kinds,
                                 args.threads, args.batch_size, work, engines=args.engines))


if __name__ == '__main__':
    main()
