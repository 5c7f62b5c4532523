"""Calibration on the exported fp32 ncnn model (``engine='ncnn'``, ``qat calibrate --engine
ncnn``) against calibration on the MXNet net (the default): the same blocks, the same
statistics, thresholds equal within the stated tolerances; deterministic (byte-identical
tables run after run); the model it runs is byte for byte the fp32 model ``export`` writes;
clear errors for a bad engine and for a net the exporter cannot write.

Tolerances (the activations differ by float rounding between ncnn's kernels and MXNet's,
measured ~1e-6 relative on the ranges):
  * max, ema, aciq (Gaussian range rule): relative 1e-4 on the threshold (so on the scale
    qmax / T);
  * percentile, mse: one histogram bin (limit / bins) plus relative 1e-4;
  * kl: one bin plus relative 1e-4, or, where the two engines pick different bins, a near-tie
    of the KL search: each engine's bin has, on the *other* engine's histogram, a divergence
    within 1e-3 relative of that histogram's minimum (a few of ~20k elements changing bins can
    tip which of two near-equal minima wins; measured excess ~1e-4).
"""
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import qat
from qat.calibration import ENGINES, METHODS, observers
from qat.calibration import thresholds as th
from qat.deploy import export
from qat.deploy import ncnn as ncnn_files
from qat.deploy.graph import trace
from qat.deploy.table import read_table
from qat.errors import UserError
from qat.modes import temporary_mode
from tests.helpers import randomize_bn
from tests.test_observers import _Twice
from tests.test_ptq_cli import run_cli

RELATIVE = 1e-4   # max, ema, aciq: on the threshold (and the scale)
BINS = 1.0        # histogram methods: bins of limit / bins
KL_TIE = 1e-3     # kl: a near-tie of two minima, relative excess of the divergence
RANGE_METHODS = [name for name, spec in METHODS.items() if not spec.search]
SIZE = 16


def _resnet():
    """cifar_resnet20_v1 at 16x16, random init, random BN statistics, converted."""
    from gluoncv.model_zoo import get_model
    mx.random.seed(0)
    net = get_model('cifar_resnet20_v1', classes=10)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, SIZE, SIZE)))
    randomize_bn(net, np.random.RandomState(0))
    return qat.convert_model(net)


@pytest.fixture(scope='module')
def resnet():
    return _resnet()


def _batches(n=3, batch=4, seed=1, size=SIZE):
    rng = np.random.RandomState(seed)
    return [mx.nd.array(rng.normal(size=(batch, 3, size, size))) for _ in range(n)]


def _limits(net, data):
    return qat.calibrate(net, data, 'max')


def _within(method, ours, theirs, limit, hists=None):
    """True when the ncnn engine's threshold ``theirs`` is within the tolerance of MXNet's
    ``ours`` (``limit``: the layer's max, the histogram's upper edge)."""
    bound = RELATIVE * abs(ours)
    if METHODS[method].histogram and method != 'aciq':
        bound += BINS * limit / th.DEFAULT_BINS
    if abs(ours - theirs) <= bound:
        return True
    if method != 'kl' or hists is None:
        return False
    (_, div_a), (_, div_b) = (th.kl_divergences(h) for h in hists)
    pick_a, pick_b = int(np.argmin(div_a)), int(np.argmin(div_b))
    return (div_a[pick_b] - div_a[pick_a] <= KL_TIE * div_a[pick_a]
            and div_b[pick_a] - div_b[pick_b] <= KL_TIE * div_b[pick_b])


@pytest.mark.parametrize('method', RANGE_METHODS)
def test_ncnn_engine_equals_mxnet_within_tolerance(resnet, method):
    data = _batches()
    limits = _limits(resnet, data)
    ours = qat.calibrate(resnet, data, method)
    theirs = qat.calibrate(resnet, data, method, engine='ncnn', threads=1)
    assert ours.keys() == theirs.keys() and len(ours) == 22  # every layer, the first conv too
    hists = None
    if method == 'kl':
        hists = observers.collect_histograms(resnet, data), \
            observers.collect_histograms(resnet, data, engine='ncnn', threads=1)
    for name in ours:
        pair = (hists[0][name], hists[1][name]) if hists else None
        assert _within(method, ours[name], theirs[name], limits[name], pair), \
            (method, name, ours[name], theirs[name])
    # the tolerance is not vacuous: the ranges agree far closer than it
    if method in ('max', 'ema', 'aciq'):
        assert max(abs(ours[k] - theirs[k]) / ours[k] for k in ours) < RELATIVE / 10


@pytest.mark.parametrize('method', ['ema', 'max', 'kl', 'aciq'])
@pytest.mark.parametrize('signed', [True, False])
def test_shared_block_dense_and_unsigned_inputs(method, signed):
    """A block called twice (its per-batch values in the same order as MXNet's: 'ema' reads
    the order), a Dense after a mean (ncnn's flat InnerProduct input), unsigned inputs."""
    mx.random.seed(5)
    net = _Twice()
    net.initialize(mx.init.Xavier())
    qat.convert_model(net, config=qat.QuantConfig(input_signed=signed))
    rng = np.random.RandomState(0)
    data = [mx.nd.array(rng.normal(scale=1 + i, size=(2, 3, 8, 8))) for i in range(4)]
    ours = qat.calibrate(net, data, method)
    theirs = qat.calibrate(net, data, method, engine='ncnn', threads=1)
    limits = _limits(net, data)
    hists = None
    if method == 'kl':
        hists = observers.collect_histograms(net, data), \
            observers.collect_histograms(net, data, engine='ncnn', threads=1)
    assert ours.keys() == theirs.keys()
    for name in ours:
        pair = (hists[0][name], hists[1][name]) if hists else None
        assert _within(method, ours[name], theirs[name], limits[name], pair), \
            (name, ours[name], theirs[name])


def test_ncnn_engine_sees_the_same_calls_and_sizes(resnet):
    """Per block the same number of per-batch values (calls x batches) and the same element
    counts as the MXNet graph."""
    data = _batches()
    blocks = observers.quantized(resnet)
    stats = {}
    for engine in ENGINES:
        ranges, summaries, count = observers.collect(resnet, blocks, data, None, 0, 'aciq',
                                                     bins=th.DEFAULT_BINS, summary=True,
                                                     engine=engine, threads=1)
        stats[engine] = ({b.name: len(v) for b, v in ranges.items()},
                         {b.name: (s.total, s.sample_size) for b, s in summaries.items()})
        assert count == len(data)
    assert stats['mxnet'] == stats['ncnn']


@pytest.mark.parametrize('method', ['max', 'kl'])
def test_ncnn_engine_is_deterministic(resnet, method):
    data = _batches()
    first = qat.calibrate(resnet, data, method, engine='ncnn', threads=1)
    assert qat.calibrate(resnet, data, method, engine='ncnn', threads=1) == first
    if method == 'max':  # and whatever ncnn's thread count
        assert qat.calibrate(resnet, data[:1], method, engine='ncnn', threads=2) == \
            qat.calibrate(resnet, data[:1], method, engine='ncnn', threads=1)


def test_the_model_it_runs_is_the_exported_fp32_model(resnet, tmp_path):
    """The fp32 model traced before calibration (float mode, no ranges needed) is byte for
    byte the one ``export`` writes after it."""
    qat.calibrate(resnet, _batches(), 'max')
    with temporary_mode(resnet, quantize=False):
        param, weights = ncnn_files.render(trace(resnet, (3, SIZE, SIZE)).float_graph())
    files = export(resnet, str(tmp_path), (3, SIZE, SIZE))
    assert open(files['param']).read() == param
    assert open(files['bin'], 'rb').read() == weights


def test_easyquant_and_method_choice_take_the_engine(resnet):
    from qat.analysis import selection
    data = _batches(2)
    found = qat.calibrate(resnet, data, 'easyquant', engine='ncnn', threads=1, max_samples=4,
                          steps=3)
    assert len(found) == 22
    choice = selection.choose_method(resnet, data, ['max', 'kl'], engine='ncnn', threads=1)
    assert choice is not None


class _Sine(nn.HybridBlock):
    def __init__(self):
        super().__init__(prefix='sine_')
        with self.name_scope():
            self.conv = nn.Conv2D(4, 3, in_channels=3)
            self.dense = nn.Dense(3, in_units=144)

    def hybrid_forward(self, F, x):
        return self.dense(F.sin(self.conv(x)))


def test_bad_engine_and_unexportable_net():
    net = _Sine()
    net.initialize()
    qat.convert_model(net)
    data = _batches(1, size=8)
    with pytest.raises(UserError, match=r"unknown calibration engine 'foo'; valid: mxnet, "
                                        r"ncnn"):
        qat.calibrate(net, data, 'max', engine='foo')
    with pytest.raises(UserError, match="threads must be a positive integer"):
        qat.calibrate(net, data, 'max', engine='ncnn', threads=0)
    with pytest.raises(UserError, match=r"cannot be exported to ncnn: .*'sin'.*calibrate "
                                        r"with engine 'mxnet' \(qat calibrate --engine mxnet\)"):
        qat.calibrate(net, data, 'max', engine='ncnn', threads=1)
    assert qat.calibrate(net, data, 'max')  # the default engine calibrates it
    with pytest.raises(UserError, match=r"\(N, C, H, W\) image batches"):
        qat.calibrate(_flat_net(), [mx.nd.ones((2, 6))], 'max', engine='ncnn', threads=1)


def _flat_net():
    net = nn.HybridSequential(prefix='flat_')
    with net.name_scope():
        net.add(nn.Dense(3, in_units=6))
    net.initialize()
    return qat.convert_model(net)


# ----- the command ----------------------------------------------------------------------------
def _argv(images, out, *extra):
    return ['--model', 'tests.test_ptq_cli:tiny_net', '--images', str(images),
            '--shape', '12,12,3', '--mean', '127.5,127.5,127.5',
            '--norm', '0.0078125,0.0078125,0.0078125', '--output', str(out),
            '--batch-size', '4'] + list(extra)


def test_command_engine_ncnn_tables(tmp_path, images, capsys):
    tables = {}
    for run, engine in (('a', 'ncnn'), ('b', 'ncnn'), ('c', 'mxnet')):
        status, stdout, stderr = run_cli(_argv(images, tmp_path / run, '--engine', engine,
                                            '--threads', '1', '--method', 'max'), capsys)
        assert status == 0, stderr
        assert f"batches of 4), engine {engine}" in stdout
        tables[run] = (tmp_path / run / 'model.table').read_bytes()
    assert tables['a'] == tables['b']  # byte-identical run after run
    _, ncnn_scales = read_table(str(tmp_path / 'a' / 'model.table'))
    weights, mxnet_scales = read_table(str(tmp_path / 'c' / 'model.table'))
    assert ncnn_scales.keys() == mxnet_scales.keys() == {'tiny_conv0', 'tiny_conv1',
                                                         'tiny_dense0'}
    for name, scale in mxnet_scales.items():
        assert abs(ncnn_scales[name] - scale) <= RELATIVE * scale, name
    assert os.path.isfile(tmp_path / 'a' / 'model-int8.param')


def test_command_bad_engine(tmp_path, images, capsys):
    status, _, stderr = run_cli(_argv(images, tmp_path / 'x', '--engine', 'foo'), capsys)
    assert status == 2
    lines = stderr.strip().splitlines()
    assert lines == ["qat calibrate: error: --engine foo: unknown calibration engine; valid: "
                     "mxnet, ncnn"]
    assert not (tmp_path / 'x').exists()


def test_a_detector_calibrates_on_its_ncnn_model():
    """A GluonCV SSD (exported with ncnn's DetectionOutput): the heads' and backbone's inputs
    come from its fp32 ncnn model."""
    from tests.test_detection import tiny_ssd
    mx.random.seed(0)
    net = tiny_ssd()
    net.initialize(mx.init.Xavier())
    data = _batches(2, batch=2, size=64)
    net(data[0])
    qat.convert_model(net)
    ours = qat.calibrate(net, data, 'max')
    theirs = qat.calibrate(net, data, 'max', engine='ncnn', threads=1)
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert abs(theirs[name] - value) <= RELATIVE * value, name
