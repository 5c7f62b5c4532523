"""Benchmarks (run by the thin scripts in tools/): measured side by side, medians and ratios."""
import statistics
import time

import mxnet as mx
from mxnet import autograd, gluon

from .config import QuantConfig
from .convert import convert_model


def _train_step_fn(net, batch, labels):
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.01,
                                                          'momentum': 0.9})

    def step():
        with autograd.record():
            loss = loss_fn(net(batch), labels)
        loss.backward()
        trainer.step(batch.shape[0])
        mx.nd.waitall()
    return step


def train_step_times(model='cifar_resnet20_v1', batch_size=64, size=32, rounds=15,
                     warmup=3, config=None):
    """Median training-step time (s) of a hybridized float net and of its converted versions
    with and without fake BN (per-channel, 8-bit), interleaved round by round."""
    from gluoncv.model_zoo import get_model
    config = config or QuantConfig()
    variants = {'float': None, 'qat (no fake BN)': config.updated(fake_bn=False),
                'qat (fake BN)': config.updated(fake_bn=True)}
    batch = mx.nd.random.uniform(-1, 1, shape=(batch_size, 3, size, size))
    labels = mx.nd.array([i % 10 for i in range(batch_size)])
    steps = {}
    for name, variant in variants.items():
        mx.random.seed(0)
        net = get_model(model, pretrained=False)
        net.initialize(mx.init.Xavier())
        net(batch)
        if variant is not None:
            convert_model(net, config=variant)
        net.hybridize(static_alloc=True, static_shape=True)
        steps[name] = _train_step_fn(net, batch, labels)
        for _ in range(warmup):
            steps[name]()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def format_table(rows, headers):
    """A Markdown table from rows of values."""
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
    lines += ['| ' + ' | '.join(str(v) for v in row) + ' |' for row in rows]
    return '\n'.join(lines)


def _post_relu(graph, layer):
    """True when the layer's input blob is a ReLU output (its codes are then in [0, 127])."""
    producer = graph[layer.inputs[0]]
    return (producer.kind == 'ReLU' and not producer.params.get('slope')) \
        or producer.params.get('activation') == ('relu',)


def winograd_guard_report(model='resnet18_v1', size=224, rounds=20, warmup=3, threads=(1, 2),
                          calibration_batches=2, seed=0):
    """The int8 Winograd bound on a random-initialized GluonCV net, and what the guard costs.

    The net (Xavier init, converted with the default 8-bit per-channel scheme, EMA-calibrated
    on random images) is traced once. Per Winograd conv (3x3 s1, > 8 channels): its bound
    max|y| and whether it is proven safe (a) with its 8-bit codes and inputs in [-127, 127],
    (b) the same with inputs in [0, 127] where the input is a ReLU output, (c) with 6-bit
    codes (31 / max|w| per channel, as ncnn2table does). Then the int8 model is rendered with
    each Winograd policy of ``qat.deploy.export`` ('unsafe': no guard, 'off': ``31=64`` on
    every Winograd conv, 'bound': ``31=64`` where (a) fails) and timed with the ncnn runtime
    (default options, one image), policies interleaved round by round.

    Returns (rows, times): rows = [(name, in, out, max|y|, a, b, c)], times = {(policy,
    threads): median ms}."""
    import os
    import tempfile

    import ncnn
    import numpy as np
    from gluoncv.model_zoo import get_model

    from . import reference
    from .calibrate import calibrate
    from .deploy import ncnn as ncnn_writer, winograd
    from .deploy.export import winograd_guards
    from .deploy.graph import trace

    mx.random.seed(seed)
    net = get_model(model, pretrained=False)
    net.initialize(mx.init.Xavier())
    batches = [mx.nd.random.uniform(-1, 1, shape=(2, 3, size, size))
               for _ in range(calibration_batches)]
    net(batches[0])
    convert_model(net)
    calibrate(net, batches)
    graph = trace(net, (3, size, size))

    rows = []
    for layer in graph.layers:
        p, quant = layer.params, layer.quant
        if layer.kind != 'Convolution' or quant is None or not quant.int8:
            continue
        num_input = layer.weights['weight'].shape[1] * p['groups']
        if not winograd.uses_winograd(p['kernel'], p['stride'], p['dilate'], p['groups'],
                                      num_input, p['num_output']):
            continue
        codes, weight = quant.weight_codes, layer.weights['weight']
        scale6 = 31 / np.abs(weight).reshape(len(weight), -1).max(axis=1)
        codes6 = reference.quantize(weight, scale6.reshape(-1, 1, 1, 1), bits=6)
        relu = _post_relu(graph, layer)
        rows.append((layer.name, num_input, p['num_output'],
                     int(winograd.output_bounds(codes).max()), winograd.is_safe(codes),
                     winograd.is_safe(codes, x_range=(0, 127) if relu else (-127, 127)),
                     winograd.is_safe(codes6)))

    image = np.random.default_rng(seed).uniform(-1, 1, (3, size, size)).astype(np.float32)
    nets = {}
    with tempfile.TemporaryDirectory(prefix='bench-winograd-') as folder:
        for policy in ('unsafe', 'off', 'bound'):
            guarded = winograd_guards(graph, policy)
            text, data = ncnn_writer.render(graph, int8=True, guarded=guarded)
            param, weights = (os.path.join(folder, policy + ext) for ext in ('.param', '.bin'))
            with open(param, 'w') as handle:
                handle.write(text)
            with open(weights, 'wb') as handle:
                handle.write(data)
            for n in threads:  # one net per thread count: ncnn fixes its tiling at load time
                net_ = ncnn.Net()
                net_.opt.use_int8_inference = True
                net_.opt.num_threads = n
                net_.load_param(param)
                net_.load_model(weights)
                nets[policy, n] = net_
    mat = ncnn.Mat(image)  # keep ``image`` alive: ncnn.Mat does not own it

    def forward(net_):
        ex = net_.create_extractor()
        ex.input('data', mat)
        start = time.perf_counter()
        ex.extract(graph.outputs[0])
        return time.perf_counter() - start

    times = {key: [] for key in nets}
    for _ in range(warmup):
        for net_ in nets.values():
            forward(net_)
    for _ in range(rounds):
        for key, net_ in nets.items():
            times[key].append(forward(net_))
    return rows, {key: 1000 * statistics.median(values) for key, values in times.items()}


# ----- accuracy of PTQ and QAT on digits, through the recipe trainer ----------------------------
BENCH_RECIPE = 'recipes/digits.yaml'
# One schedule for every bit width. Ranges and BN statistics are frozen from the start: at 2
# bits, tracked max ranges feed back (each surviving code dequantizes to the range itself, so
# the next layer's range grows) and training diverged; with ranges from MSE calibration and
# BN frozen, every width trains stably.
BENCH_QAT = {'calibrate.method': 'mse', 'qat.epochs': 6, 'qat.lr': 0.01,
             'qat.schedule': 'cosine', 'qat.freeze_bn_epoch': 0, 'qat.freeze_ranges_epoch': 0}


def accuracy_table(seeds=(0, 1, 2), bits=(8, 4, 3, 2), out_dir='checkpoints/bench-accuracy',
                   recipe=BENCH_RECIPE, qat=None, overrides=(), out=print):
    """Mean val top-1 over ``seeds`` of float, PTQ and QAT at W``b``A``b`` for each of ``bits``
    (per-channel, first layer at 8 bits), on the recipe's data (digits). Per seed: one float
    run (which also measures PTQ at every width), then one QAT run per width starting from its
    float parameters. ``qat``: {recipe key: value} of the QAT schedule (default BENCH_QAT).
    Runs are resumed, so a second call reuses finished runs and continues killed ones.
    Returns (rows {name: [per-seed accuracy]}, Markdown table)."""
    import os
    from .train import run_recipe
    qat = dict(BENCH_QAT, **(qat or {}))
    # Later overrides win: the bench's settings, then the caller's, then each run's own.
    common = ['export.enabled=false', 'run.tensorboard=false', 'run.progress=false',
              f'run.out={out_dir}', 'quantize.granularity=channel',
              'quantize.first_layer_bits=8'] + [f'{k}={v}' for k, v in qat.items()] \
        + list(overrides)
    quiet = (lambda *a: None)
    rows = {}
    for seed in seeds:
        base = run_recipe(recipe, common + [
            f'run.name=float-s{seed}', f'run.seed={seed}', 'qat.epochs=0',
            'qat.freeze_bn_epoch=null', 'qat.freeze_ranges_epoch=null',
            f'calibrate.report_bits={list(bits)}'], resume=True, out=quiet)
        rows.setdefault('float', []).append(base['float'])
        for b in bits:
            rows.setdefault(f'W{b}A{b} PTQ', []).append(base['ptq'][f'W{b}A{b}'])
        for b in bits:
            result = run_recipe(recipe, common + [
                f'run.name=qat-w{b}-s{seed}', f'run.seed={seed}', 'float.epochs=0',
                f"model.checkpoint={os.path.join(base['folder'], 'float.params')}",
                f'quantize.weight_bits={b}', f'quantize.input_bits={b}',
                'calibrate.report_bits=[]'], resume=True, out=quiet)
            rows.setdefault(f'W{b}A{b} QAT', []).append(result['qat'])
        out(f"seed {seed}: " + ', '.join(f"{k} {v[-1]:.2f}" for k, v in rows.items()))
    float_mean = statistics.mean(rows['float'])
    table = []
    for name, values in rows.items():
        mean = statistics.mean(values)
        table.append((name, f"{mean:.2f}", f"{mean - float_mean:+.2f}",
                      ' / '.join(f"{v:.2f}" for v in values)))
    headers = [f"digits, {len(seeds)} seeds", 'mean top-1 (%)', 'vs float', 'per seed']
    return rows, format_table(table, headers)
