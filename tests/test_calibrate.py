"""Calibration sets each layer's input range from float activations and restores the net."""
import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import qat
from qat.calibration.methods import _ema


def _net():
    mx.random.seed(3)
    net = nn.HybridSequential()
    net.add(nn.Conv2D(8, 3, padding=1), nn.BatchNorm(), nn.Activation('relu'),
            nn.Conv2D(8, 3, padding=1, groups=2), nn.GlobalAvgPool2D(), nn.Dense(10))
    net.initialize(mx.init.Xavier())
    return net


def _batches(n=4, seed=0):
    rng = np.random.RandomState(seed)
    return [mx.nd.array(rng.normal(scale=1 + i, size=(2, 3, 8, 8))) for i in range(n)]


def _float_inputs(net, batches):
    """Per-batch max |input| of every Conv/Dense in the float net (the oracle)."""
    seen = {}
    hooks = [b.register_forward_pre_hook(
        lambda blk, inp: seen.setdefault(blk.name, []).append(np.abs(inp[0].asnumpy()).max()))
        for b in net._children.values() if isinstance(b, (nn.Conv2D, nn.Dense))]
    for batch in batches:
        net(batch)
    for h in hooks:
        h.detach()
    return seen


@pytest.mark.parametrize('method', ['max', 'ema'])
def test_ranges_equal_float_activation_statistics(method):
    net, batches = _net(), _batches()
    expected = _float_inputs(net, batches)
    qat.convert_model(net)
    net.hybridize()
    qat.quantize_input(net, online=True)
    thresholds = qat.calibrate(net, batches, method=method)
    momentum = qat.QuantConfig().range_momentum
    for name, ranges in expected.items():
        want = max(ranges) if method == 'max' else _ema(ranges, momentum)
        # float32 max of the same tensor: identical; the EMA is summed in float64.
        assert thresholds[name] == pytest.approx(want, rel=1e-6)
    for _, block in qat.quant_blocks(net):
        assert block.input_threshold() == pytest.approx(thresholds[block.name], rel=1e-6)
        assert block.mode['online'] and block.mode['quantize']  # modes restored
    assert net._active  # hybridization restored


def test_bias_corrected_ema_starts_at_first_value():
    assert _ema([5.0], 0.9) == pytest.approx(5.0)
    assert _ema([2.0, 4.0], 0.5) == pytest.approx((0.25 * 2 + 0.5 * 4) / 0.75)


def test_bad_calibration_input():
    net = qat.convert_model(_net())
    with pytest.raises(ValueError, match="unknown calibration method 'kl2'"):
        qat.calibrate(net, _batches(), method='kl2')
    with pytest.raises(ValueError, match='empty'):
        qat.calibrate(net, [])
    with pytest.raises(ValueError, match='no quantized blocks'):
        qat.calibrate(_net(), _batches())


# ----- histogram methods (qat.thresholds) ----------------------------------------------------
from qat.calibration import thresholds as th  # noqa: E402
from qat.calibration import collect_histograms  # noqa: E402

HISTOGRAM_METHODS = ['kl', 'aciq', 'percentile', 'mse']


def _ready_net(config=None):
    """The test net, initialized by one float forward, converted."""
    net = _net()
    net(_batches(1)[0])
    return qat.convert_model(net, config=config or qat.QuantConfig())


def _captured_inputs(net, batches):
    """{block name: [numpy input per batch]} of every quantized block in float mode."""
    seen = {}
    blocks = [block for _, block in qat.quant_blocks(net)]
    modes = [block.mode for block in blocks]
    for block in blocks:
        block.set_mode(quantize=False)
    hooks = [b.register_forward_pre_hook(
        lambda blk, inp: seen.setdefault(blk.name, []).append(inp[0].asnumpy()))
        for b in blocks]
    for batch in batches:
        net(batch)
    for hook, block, mode in zip(hooks, blocks, modes):
        hook.detach()
        block.set_mode(**mode)
    return seen


@pytest.mark.parametrize('method', HISTOGRAM_METHODS)
@pytest.mark.parametrize('config', [qat.QuantConfig(),
                                    qat.QuantConfig(input_bits=4, input_signed=False),
                                    qat.QuantConfig(input_bits=2)],
                         ids=['s8', 'u4', 's2'])
def test_histogram_methods_equal_thresholds_of_the_float_inputs(method, config):
    net, batches = _ready_net(config), _batches(6)
    inputs = _captured_inputs(net, batches)
    net.hybridize()
    thresholds = qat.calibrate(net, batches, method=method)
    for _, block in qat.quant_blocks(net):
        values = np.concatenate([x.ravel() for x in inputs[block.name]])
        hist = th.Histogram.of(values, signed=config.input_signed,
                               sample_size=inputs[block.name][0][0].size)
        want = th.THRESHOLDS[method](hist, config.input_bits)
        # exact: the device bins exactly as numpy (identical counts), and the default ACIQ
        # ('range') depends only on the largest input and the elements per sample
        assert thresholds[block.name] == want
        assert 0 < want <= hist.absmax
        # stored as float32 in the range tracker
        assert block.input_threshold() == pytest.approx(want, rel=1e-7)
        assert block.mode['quantize'] and not block.mode['online']  # modes restored
    assert net._active  # hybridization restored


@pytest.mark.parametrize('signed', [True, False])
def test_device_histograms_equal_numpy_histograms(signed):
    """Streaming on the device (two passes, per-batch histograms summed) == one numpy
    histogram of all the inputs at once."""
    net, batches = _ready_net(qat.QuantConfig(input_signed=signed)), _batches(5)
    inputs = _captured_inputs(net, batches)
    histograms = collect_histograms(net, batches, bins=512)
    assert sorted(histograms) == sorted(inputs)
    for name, hist in histograms.items():
        values = np.concatenate([x.ravel() for x in inputs[name]])
        want = th.Histogram.of(values, bins=512, signed=signed,
                               sample_size=inputs[name][0][0].size)
        np.testing.assert_array_equal(hist.counts, want.counts)
        assert (hist.limit, hist.total, hist.zeros, hist.absmax, hist.sample_size) == (
            want.limit, want.total, want.zeros, want.absmax, want.sample_size)
        assert hist.nonzero > 0 and (signed or hist.zeros > 0)  # unsigned: negatives are zeros


@pytest.mark.parametrize('method, options', [('kl', {}), ('mse', {}),
                                             ('aciq', {'distribution': 'laplace'}),
                                             ('percentile', {'percentile': 99.0})])
def test_histogram_calibration_is_deterministic(method, options):
    results = []
    for _ in range(2):
        net = _ready_net()
        thresholds = qat.calibrate(net, _batches(4), method=method, **options)
        stored = [block.range_ema.data().asnumpy().tobytes()
                  for _, block in qat.quant_blocks(net)]
        results.append((np.array(sorted(thresholds.values())).tobytes(), stored))
    assert results[0] == results[1]
    assert len(results[0][1]) == 3


def test_histogram_calibration_options():
    net, batches = _ready_net(), _batches(4)
    inputs = _captured_inputs(net, batches)
    largest = {name: max(np.abs(x).max() for x in xs) for name, xs in inputs.items()}
    # percentile 100 = the largest input; fewer bins change the KL histogram
    assert qat.calibrate(net, batches, method='percentile', percentile=100) == pytest.approx(
        {name: float(v) for name, v in largest.items()}, rel=1e-7)
    kl_512 = qat.calibrate(net, batches, method='kl', bins=512)
    for name, xs in inputs.items():
        hist = th.Histogram.of(np.concatenate([x.ravel() for x in xs]), bins=512)
        assert kl_512[name] == th.kl(hist, 8)
    ema = qat.calibrate(net, (b for b in batches), method='ema')  # one pass: a generator works
    assert ema == qat.calibrate(net, batches, method='ema')


def test_bad_histogram_calibration_input():
    net, batches = _ready_net(), _batches(3)
    with pytest.raises(ValueError, match='one-shot iterator'):
        qat.calibrate(net, (b for b in batches), method='kl')
    with pytest.raises(ValueError, match=r"'kl' has no option\(s\) \['percentile'\]"):
        qat.calibrate(net, batches, method='kl', percentile=99.0)
    with pytest.raises(ValueError, match=r"'ema' has no option\(s\) \['bins'\]"):
        qat.calibrate(net, batches, method='ema', bins=512)
    with pytest.raises(ValueError, match='percentile must be in'):
        qat.calibrate(net, batches, method='percentile', percentile=0)
    with pytest.raises(ValueError, match='distribution must be'):
        qat.calibrate(net, batches, method='aciq', distribution='cauchy')

    class Shrinking:
        """Re-iterable that gives one batch fewer every time."""
        def __init__(self, items):
            self.items = list(items)

        def __iter__(self):
            items, self.items = self.items, self.items[:-1]
            return iter(items)

    with pytest.raises(ValueError, match='3 batches in the first pass and 2 in the second'):
        qat.calibrate(net, Shrinking(batches), method='mse')


def test_methods_registry_describes_every_method():
    # one registry: the range methods and the EasyQuant search (the search is the only one
    # that is not a range reduction)
    assert sorted(qat.CALIBRATION_METHODS) == ['aciq', 'easyquant', 'ema', 'kl', 'max', 'mse',
                                               'percentile']
    assert [n for n, spec in qat.CALIBRATION_METHODS.items() if spec.search] == ['easyquant']
    for name, spec in qat.CALIBRATION_METHODS.items():
        assert len(spec.description) > 20
        assert spec.histogram == (name in HISTOGRAM_METHODS)
        assert ('bins' in spec.options) == spec.histogram
    # the per-batch reductions are still callable as before
    assert qat.CALIBRATION_METHODS['max']([1.0, 3.0, 2.0], qat.QuantConfig()) == 3.0
