"""The fast calibration path against the slow one it replaced: the hybridized multi-output
graph gives the same thresholds as the block-by-block hooks (shared blocks, Dense, unsigned
inputs, every range and histogram method), the compiled histogram counts what numpy and the
device histogram count, ACIQ's default rule reads the data once, and the KL search by rows
equals a loop over the candidates bit for bit."""
import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import qat
from qat.calibration import METHODS, kernels, observers
from qat.calibration import thresholds as th


class _Twice(nn.HybridBlock):
    """conv -> relu -> the same conv again (one block, two calls), pool, dense."""

    def __init__(self):
        super().__init__(prefix='twice_')
        with self.name_scope():
            self.conv = nn.Conv2D(4, 3, padding=1, in_channels=4)
            self.first = nn.Conv2D(4, 3, padding=1, in_channels=3)
            self.bn = nn.BatchNorm(in_channels=4)
            self.dense = nn.Dense(5, in_units=4)

    def hybrid_forward(self, F, x):
        x = F.relu(self.bn(self.first(x)))
        x = self.conv(F.relu(self.conv(x)))
        return self.dense(F.mean(x, axis=(2, 3)))


def _batches(n=4, seed=0):
    rng = np.random.RandomState(seed)
    return [mx.nd.array(rng.normal(scale=1 + i, size=(2, 3, 8, 8))) for i in range(n)]


def _net(config):
    mx.random.seed(5)
    net = _Twice()
    net.initialize(mx.init.Xavier())
    return qat.convert_model(net, config=config)


RANGE_METHODS = [name for name, spec in METHODS.items() if not spec.search]


@pytest.mark.parametrize('method', RANGE_METHODS)
@pytest.mark.parametrize('signed', [True, False])
def test_graph_equals_block_by_block(method, signed, monkeypatch):
    config = qat.QuantConfig(input_signed=signed)
    fast_net, slow_net = _net(config), _net(config)
    blocks = [block for _, block in qat.quant_blocks(fast_net)]
    taps = observers._Taps(fast_net, blocks)
    assert taps.usable, taps.reason
    assert sum(block.name == 'twice_conv0' for block, _ in taps.calls) == 2  # both calls
    fast = qat.calibrate(fast_net, _batches(), method=method)
    monkeypatch.setattr(observers._Taps, 'usable', property(lambda self: False))
    slow = qat.calibrate(slow_net, _batches(), method=method)
    assert fast == slow  # exact: same activations, same binning, integer counts


class _Host(nn.Block):
    """A step through numpy: no symbol can stand for it."""

    def forward(self, x):
        return mx.nd.array(np.tanh(x.asnumpy()))


def test_untraceable_net_runs_block_by_block():
    net = nn.Sequential()
    net.add(nn.Conv2D(4, 3, in_channels=3), _Host(), nn.Dense(3, in_units=144))
    net.initialize()
    qat.convert_model(net)
    blocks = [block for _, block in qat.quant_blocks(net)]
    assert not observers._Taps(net, blocks).usable
    thresholds = qat.calibrate(net, _batches(2), method='max')
    assert 0 < thresholds[blocks[1].name] <= 1  # tanh's range: the hooks saw the dense input


class _Counting:
    """A re-iterable list of batches that counts its passes."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


@pytest.mark.parametrize('options, passes', [({}, 1), ({'spread': 'moments'}, 2),
                                             ({'distribution': 'laplace'}, 2)])
def test_aciq_range_rule_reads_the_data_once(options, passes):
    net = _net(qat.QuantConfig())
    data = _Counting(_batches())
    one = qat.calibrate(net, data, method='aciq', **options)
    assert data.passes == passes
    if passes == 1:  # the summary gives what the full histogram gives
        blocks = [block for _, block in qat.quant_blocks(net)]
        _, histograms, _ = observers.collect(net, blocks, _batches(), None, 0, 'aciq', 2048)
        assert one == {block.name: th.aciq(hist, 8) for block, hist in histograms.items()}


def _awkward(signed, limit=2.5, bins=64):
    """Values on bin edges, at and above the limit, zeros, negatives, tiny and huge."""
    rng = np.random.RandomState(1)
    edges = np.arange(bins + 1, dtype=np.float32) * np.float32(limit / bins)
    x = np.concatenate([rng.normal(size=5000), edges, -edges, np.zeros(50), [limit, -limit],
                        [limit * 1.5, -limit * 3, 1e-30, -1e-38, 1e-45]]).astype(np.float32)
    return x if signed else x + np.float32(0.25)


@pytest.mark.parametrize('signed', [True, False])
@pytest.mark.parametrize('limit', [2.5, 0.0])
def test_compiled_numpy_and_device_histograms_count_alike(signed, limit, monkeypatch):
    x, bins = _awkward(signed), 64
    native = kernels.counts(x, limit, bins, signed)
    monkeypatch.setitem(kernels._state, 'function', None)  # the numpy fallback
    plain = kernels.counts(x, limit, bins, signed)
    device, top = observers._device_histogram(mx.nd.array(x), limit, bins, signed)
    assert np.array_equal(native[0], plain[0])
    assert np.array_equal(native[0], device.asnumpy())
    assert native[1] == plain[1] == max(float(top.asscalar()), 0.0)
    if limit:  # values above the limit land in the last bin, exact zeros in none
        mag = th.magnitude(x, signed)
        assert native[0].sum() == np.count_nonzero(mag)
        assert native[0][-1] == np.count_nonzero(th.bin_index(mag, limit, bins) == bins - 1)


def test_numpy_counting_gives_the_same_thresholds(monkeypatch):
    compiled = qat.calibrate(_net(qat.QuantConfig()), _batches(), method='kl')
    monkeypatch.setitem(kernels._state, 'function', None)  # as without a compiler
    assert qat.calibrate(_net(qat.QuantConfig()), _batches(), method='kl') == compiled


def test_the_compiled_histogram_is_there():
    """The fast path is what this machine runs (a C compiler is part of the dev setup)."""
    assert kernels.native_histogram() is not None


def _kl_loop(hist, levels, eps=th.KL_EPS):
    """The KL divergences one candidate at a time (the earlier implementation)."""
    bins = hist.bins
    h = hist.counts / float(hist.nonzero)
    cum = np.concatenate([[0.0], np.cumsum(h)])
    level = np.arange(levels + 1)
    out = []
    for t in range(levels, bins):
        per_level = t / levels
        bounds = level * per_level
        whole = np.floor(bounds).astype(np.int64)
        mass = cum[whole] + (bounds - whole) * h[np.minimum(whole, bins - 1)]
        density = np.diff(mass) / per_level
        k = np.arange(t + 1)
        owner = np.minimum(k * levels // t, levels - 1)
        expanded = np.diff(mass[owner] + (k - owner * per_level) * density[owner]) + eps
        clipped = h[:t] + eps
        clipped[-1] += cum[bins] - cum[t]
        out.append(np.sum(clipped * np.log(clipped / expanded)))
    return np.array(out)


@pytest.mark.parametrize('bits, signed, bins', [(8, True, 2048), (4, True, 300), (8, False, 700),
                                                (2, True, 64)])
@pytest.mark.parametrize('kind', ['normal', 'relu', 'heavy'])
def test_kl_rows_equal_the_loop_bit_for_bit(bits, signed, bins, kind):
    rng = np.random.RandomState(bins)
    x = {'normal': rng.normal(size=20000), 'relu': np.maximum(rng.normal(size=20000), 0),
         'heavy': rng.standard_cauchy(size=20000)}[kind]
    hist = th.Histogram.of(x, bins=bins, signed=signed)
    _, divergences = th.kl_divergences(hist, bits)
    assert np.array_equal(divergences, _kl_loop(hist, th.qmax(bits, signed) + 1))
