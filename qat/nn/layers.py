"""Fake-quantized blocks: Conv2D, Dense, and Conv2D+BatchNorm with fake batchnorm.

Each block shares its Parameters with the float block(s) it replaces, keeps the float block's
prefix (so parameter and op names do not change), computes exactly the float block's function
while quantization is disabled, and returns to float with ``to_float()``.

The quantized forward is written in ncnn's own form (docs/ncnn-int8-contract.md §3.2): integer codes of the
input and of the weights, a convolution of the codes (exact integers in float32), then one
per-channel multiply by ``1 / (s_in * s_w)`` and the float bias.
"""
import warnings

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock, nn

from . import ranges
from .. import ops
from ..config import QuantConfig
from ..errors import UserError


# Mode flags, in the order they are saved in each block's ``qmode`` parameter.
MODE_FLAGS = ('quantize', 'quantize_input', 'online', 'bn_frozen', 'ranges_frozen')
DEFAULT_MODE = {'quantize': True, 'quantize_input': True, 'online': False,
                'bn_frozen': False, 'ranges_frozen': False}

# Mode and range parameters are deliberately absent from the float graph; Gluon's notice
# about unused parameters is silenced for exactly these names and no others.
warnings.filterwarnings(
    'ignore', message=r'Parameter (\S+_(qmode|qconfig|range_ema|range_ema_var|'
                      r'weight_threshold_factor|learned_threshold|weight_learned_threshold)'
                      r'(, )?)+ is not used')


class _Originals:
    """Holds the replaced float blocks without registering them as children (which a list
    attribute would invite Gluon to warn about)."""
    __slots__ = ('blocks',)

    def __init__(self, *blocks):
        self.blocks = blocks


def shared_factor(F, factor, channels, groups, granularity):
    """The weight-threshold multipliers (O,) actually applied: one per weight scale, so the
    scales keep the structure ncnn stores. 'channel' with ``groups == 1``: ``factor`` itself;
    grouped convs: the factor of each group's first channel, repeated over the group (one
    scale per group); 'tensor': ``factor[0]`` for every channel."""
    if granularity == 'tensor':
        return F.broadcast_to(F.slice_axis(factor, axis=0, begin=0, end=1), (channels,))
    if groups == 1:
        return factor
    first = F.slice_axis(F.reshape(factor, (groups, -1)), axis=1, begin=0, end=1)
    return F.repeat(F.reshape(first, (-1,)), repeats=channels // groups)


def _with_token(F, multiplier, token):
    """``multiplier`` (O,) plus the (1,) zero ``token`` (see ``QuantBlock._quantized_input``):
    on the per-channel multiplier, not the weight, so its gradient is a sum over O values."""
    return multiplier if token is None else F.broadcast_add(multiplier, token)


def _share(block, param, attr):
    """Register an existing Parameter of another block on ``block`` under ``attr``."""
    block.params.update({param.name: param})
    setattr(block, attr, param)


class QuantBlock(HybridBlock):
    """Base of the fake-quantized blocks: configuration, modes and the input range tracker.

    Parameters added to the float block's: ``range_ema`` (2,) tracker state (see
    ``qat.nn.ranges``), ``range_ema_var`` (2,) unused BatchNorm companion, ``qmode`` (5,) the
    mode flags and ``qconfig`` (8,) the ``QuantConfig`` with the checkpoint format
    (``QuantConfig.to_vector``), both saved with the parameters and read back by
    ``qat.load_parameters``,
    ``weight_threshold_factor`` (O,) a per-output-channel multiplier of the weight threshold
    max|w| (ones: the plain max; a scale search such as ``qat.easyquant`` sets it; see
    ``shared_factor`` for grouped convs and per-tensor scales),
    ``learned_threshold`` (1,) and ``weight_learned_threshold`` (O,): the input and weight
    ranges LSQ trains (``range_tracker='lsq'``), 0 = not started (the tracked range and
    max|w| times the factor are used then; ``init_learned_thresholds`` starts them).

    With LSQ the thresholds ``T`` are parameters: the input codes and the weight codes get
    LSQ's gradient towards ``T`` (``ops.lsq_quantize``; clipped values count with their
    bound), scaled by ``ops.lsq_gradient_factor``, and the output multiplier ``1 / (s_in s_w)``
    passes its own part on, which together is exactly LSQ's gradient of the dequantized value
    ``q * T / qmax``. The forward pass, and so the exported ``qmax / T``, is the same as for
    any other range.
    """

    def __init__(self, float_block, config):
        super().__init__(prefix=float_block.prefix, params=float_block.params)
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
        config = config.resolved()
        self._config = config
        self._mode = dict(DEFAULT_MODE)
        # Kept as plain attributes (not children) so the float block is not registered twice.
        self._originals = _Originals(float_block)
        self.weight = self.params.get('weight')
        if float_block.bias is not None:
            self.bias = self.params.get('bias')
        self.range_ema = self.params.get('range_ema', shape=(2,), init='zeros',
                                         grad_req='null', differentiable=False)
        self.range_ema_var = self.params.get('range_ema_var', shape=(2,), init='ones',
                                             grad_req='null', differentiable=False)
        self.qmode = self.params.get('qmode', shape=(len(MODE_FLAGS),), grad_req='null',
                                     differentiable=False,
                                     init=mx.init.Constant(self._mode_vector()))
        self.qconfig = self.params.get('qconfig', shape=(len(config.to_vector()),),
                                       grad_req='null', differentiable=False,
                                       init=mx.init.Constant(config.to_vector()))
        self.weight_threshold_factor = self.params.get(
            'weight_threshold_factor', shape=(self._out_channels(float_block),),
            init='ones', grad_req='null', differentiable=False)
        # Learned ranges: no weight decay (it would pull every range towards 0).
        self.learned_threshold = self.params.get('learned_threshold', shape=(1,),
                                                 init='zeros', grad_req='null', wd_mult=0.0)
        self.weight_learned_threshold = self.params.get(
            'weight_learned_threshold', shape=(self._out_channels(float_block),),
            init='zeros', grad_req='null', wd_mult=0.0)
        self._sync_grad_req()
        if float_block.act is not None:
            self.act = float_block.act

    # ----- configuration and modes ---------------------------------------------------------
    @property
    def config(self):
        """The block's QuantConfig; setting it also updates the saved ``qconfig``."""
        return self._config

    @config.setter
    def config(self, config):
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
        config = config.resolved()
        self._config = config
        self.qconfig.init = mx.init.Constant(config.to_vector())
        if self.qconfig._data is not None:
            self.qconfig.set_data(mx.nd.array(config.to_vector()))
        self._sync_grad_req()
        self._clear_cached_op()

    @property
    def learns_ranges(self):
        """True when the ranges are trained parameters (LSQ)."""
        return self._config.range_tracker == 'lsq'

    def _sync_grad_req(self):
        # Only learned ranges get gradients (an optimizer built later sees which).
        req = 'write' if self.learns_ranges else 'null'
        for param in (self.learned_threshold, self.weight_learned_threshold):
            if param.grad_req != req:
                param.grad_req = req

    def load_config(self):
        """Take the QuantConfig from the (loaded) ``qconfig`` parameter."""
        self.config = QuantConfig.from_vector(self.qconfig.data().asnumpy())

    @property
    def mode(self):
        """The current mode flags (a copy)."""
        return dict(self._mode)

    def _mode_vector(self):
        return np.array([float(self._mode[name]) for name in MODE_FLAGS], np.float32)

    def set_mode(self, **flags):
        """Change mode flags; the graph is rebuilt on the next call."""
        unknown = set(flags) - set(MODE_FLAGS)
        if unknown:
            raise UserError(f"unknown mode flag(s) {sorted(unknown)}; valid: {MODE_FLAGS}")
        self._mode.update({k: bool(v) for k, v in flags.items()})
        self.qmode.init = mx.init.Constant(self._mode_vector())
        if self.qmode._data is not None:
            self.qmode.set_data(mx.nd.array(self._mode_vector()))
        self._clear_cached_op()

    def load_mode(self):
        """Take the mode flags from the (loaded) ``qmode`` parameter."""
        values = self.qmode.data().asnumpy()
        self._mode = {name: bool(values[i] > 0.5) for i, name in enumerate(MODE_FLAGS)}
        self._clear_cached_op()

    # ----- ranges ------------------------------------------------------------------------
    def _tracked_threshold(self):
        """The tracked (EMA / calibrated) input range, a (1,) NDArray (0 when never set)."""
        return ranges.ema_value(mx.nd, self.range_ema.data(), mx.nd.zeros((1,)))

    def _threshold_array(self):
        """The input range the graph uses, as a (1,) NDArray (0 when never set)."""
        tracked = self._tracked_threshold()
        if self.learns_ranges:
            learned = self.learned_threshold.data()
            return mx.nd.where(learned > 0, learned, tracked)
        return tracked

    def input_threshold(self):
        """The input range (float): the learned one when LSQ has started, else the tracked
        one; None when it was never set."""
        value = float(self._threshold_array().asnumpy()[0])
        return value if value > 0 else None

    def set_input_threshold(self, threshold):
        """Set the input range (as calibration does): the tracked one and, with LSQ, the
        learned one."""
        self.range_ema.set_data(mx.nd.array([threshold, 1.0]))
        if self.learns_ranges:
            self.learned_threshold.set_data(mx.nd.array([threshold]))

    def init_learned_thresholds(self, force=False):
        """Start LSQ's learned ranges where they are 0 (all of them with ``force``): the
        input one from the tracked range (if set), the weight ones from max|w| times
        ``weight_threshold_factor``, per channel / group / tensor as used now. Returns True
        when something was set."""
        if not self.learns_ranges:
            return False
        changed = False
        tracked = self._tracked_threshold()
        if (force or self.learned_threshold.data().asscalar() == 0) \
                and tracked.asscalar() > 0:
            self.learned_threshold.set_data(tracked)
            changed = True
        if force or not self.weight_learned_threshold.data().asnumpy().any():
            weight, _ = self.folded_weight()
            self.weight_learned_threshold.set_data(self._max_weight_threshold(
                mx.nd, weight, weight.shape[0], self.groups,
                self.weight_threshold_factor.data(weight.context)))
            changed = True
        return changed

    def input_scale(self):
        """The deployed input scale ``qmax / T`` (float32) of the input range, or None
        when the range was never set; computed by the training graph's own functions."""
        if self.input_threshold() is None:
            return None
        scale = ops.scale_from_threshold(mx.nd, self._threshold_array(), self.config.input_bits,
                                         self.config.input_signed)
        return np.float32(scale.asnumpy()[0])

    # ----- the public quantizer API (export, statistics and scale searches use it) --------
    def folded_weight(self, ctx=None):
        """(weight, bias or None) NDArrays of the deployed layer: for conv+BN blocks the BN
        folded in with its running statistics (``ops.fold_bn``), else the block's own."""
        ctx = ctx or self.weight.list_ctx()[0]
        bias = getattr(self, 'bias', None)
        return self.weight.data(ctx), None if bias is None else bias.data(ctx)

    def weight_codes(self, weight=None):
        """(integer codes of ``weight`` (default: ``folded_weight``), float32 weight scales
        per output channel (O,)) as NDArrays, as the training graph computes them (max|w|
        times ``weight_threshold_factor``, per channel / group / tensor)."""
        if weight is None:
            weight, _ = self.folded_weight()
        return self._quantized_weight(mx.nd, weight, weight.shape[0], self.groups)

    def _learning(self, F, learned, count, bits, signed=True):
        """A learned threshold as the graph uses it: LSQ's gradient scale while the ranges
        train, no gradient once they are frozen."""
        if self._mode['ranges_frozen']:
            return F.BlockGrad(learned)
        return ops.scaled_gradient(F, learned, ops.lsq_gradient_factor(F, count, bits, signed))

    def _unused(self, F, learned):
        """A (1,) zero token that keeps a learned threshold the graph does not use in it
        (weights-only or online phases), so that it gets a zero gradient rather than a stale
        one (which Gluon's Trainer refuses); None without learned ranges."""
        if not self.learns_ranges:
            return None
        return F.reshape(F.sum(learned), (1,)) * 0

    def _quantized_input(self, F, x, state, anchor):
        """(codes of x, s_in, token) when input quantization is on, else (x, None, token).
        ``state``: the block's quantizer parameters as graph inputs (``range_ema``,
        ``range_ema_var``, ``learned_threshold``: LSQ's, used once it is set (> 0)).
        ``token`` is a (1,) zero to add on ``anchor``'s gradient path (see qat.nn.ranges)."""
        learned = state['learned_threshold']
        if not self._mode['quantize_input']:
            return x, None, self._unused(F, learned)
        cfg = self.config
        range_ema, range_ema_var = state['range_ema'], state['range_ema_var']
        online = self._mode['online']
        lsq = self.learns_ranges and not online
        tracking = not self._mode['ranges_frozen'] and not lsq
        batch = ops.batch_threshold(F, x, cfg.input_signed) if tracking or online else None
        if online:
            threshold = batch
        elif not lsq:
            threshold = None  # the tracked range: ranges.tracked_scale below
        else:
            fallback = batch if batch is not None else F.zeros_like(range_ema)
            threshold = ranges.ema_value(F, range_ema, F.slice_axis(fallback, 0, 0, 1))
        if lsq:
            # values per sample: one step size quantizes them all (LSQ's N)
            count = F.Cast(F.size_array(x), 'float32') / F.Cast(
                F.slice_axis(F.shape_array(x), axis=0, begin=0, end=1), 'float32')
            threshold = F.where(learned > 0, self._learning(
                F, learned, count, cfg.input_bits, cfg.input_signed), threshold)
        token = None if lsq else self._unused(F, learned)
        if tracking and cfg.range_tracker == 'ema':
            update = ranges.ema_update(F, batch, range_ema, range_ema_var, cfg.range_momentum,
                                       anchor)
            token = update if token is None else token + update
        learning = lsq and not self._mode['ranges_frozen']  # frozen: no scale gradient
        if threshold is None:
            s_in = ranges.tracked_scale(F, range_ema, batch, cfg.input_bits, cfg.input_signed)
        else:
            s_in = ops.scale_from_threshold(F, threshold, cfg.input_bits, cfg.input_signed,
                                            learned=learning)
        codes = ops.quantize_activation(F, x, s_in, cfg.input_bits, cfg.input_signed,
                                        learned=learning)
        return codes, s_in, token

    @staticmethod
    def _out_channels(float_block):
        return float_block._channels if isinstance(float_block, nn.Conv2D) \
            else float_block._units

    def _max_weight_threshold(self, F, weight, channels, groups, factor):
        """max|w| (``ops.weight_threshold``) times the factor, one value per output channel."""
        granularity = self.config.weight_granularity
        threshold = ops.weight_threshold(F, weight, channels, groups, granularity)
        return threshold * shared_factor(F, factor, channels, groups, granularity)

    def _quantized_weight(self, F, weight, channels, groups, factor=None, learned=None):
        """(codes of the weight, per-output-channel scale (O,)). The threshold is max|w|
        (``ops.weight_threshold``) times ``weight_threshold_factor`` (``factor``), or with LSQ
        the learned ``weight_learned_threshold`` (``learned``) once it is set; inside a graph
        both come as inputs, read from the parameters when None (as the exporter calls this)."""
        cfg = self.config
        if factor is None:
            factor = self.weight_threshold_factor.data(weight.context)
        if not self.learns_ranges and groups == 1 and cfg.weight_granularity == 'channel':
            fused = ops.quantize_weight_per_channel(F, weight, factor, cfg.weight_bits)
            if fused is not None:
                return fused
        threshold = self._max_weight_threshold(F, weight, channels, groups, factor)
        shape = (-1,) + (1,) * (3 if self._weight_ndim == 4 else 1)
        if not self.learns_ranges:
            s_w = ops.scale_from_threshold(F, threshold, cfg.weight_bits)
            return ops.quantize(F, weight, F.reshape(s_w, shape), cfg.weight_bits), s_w
        if learned is None:
            learned = self.weight_learned_threshold.data(weight.context)
        # one learned value per stored scale, like the factor; N = the weights it covers
        learned = shared_factor(F, learned, channels, groups, cfg.weight_granularity)
        shares = {'tensor': 1, 'channel': channels if groups == 1 else groups}
        count = F.Cast(F.size_array(weight), 'float32') / float(
            shares[cfg.weight_granularity])
        threshold = F.where(learned > 0, self._learning(F, learned, count, cfg.weight_bits),
                            threshold)
        s_w = ops.scale_from_threshold(F, threshold, cfg.weight_bits,
                                       learned=not self._mode['ranges_frozen'])
        return ops.lsq_quantize(F, weight, F.reshape(s_w, shape), cfg.weight_bits), s_w

    @staticmethod
    def output_multiplier(F, s_in, s_w):
        """ncnn's per-channel dequantization ``1 / (s_in * s_w)`` (float32)."""
        return 1.0 / F.broadcast_mul(s_in, s_w)

    def _apply_act(self, out):
        return self.act(out) if getattr(self, 'act', None) is not None else out

    # ----- back to float -----------------------------------------------------------------
    @property
    def float_blocks(self):
        """The float block(s) this block replaced (conv, or conv and its BatchNorm)."""
        return self._originals.blocks

    def to_float(self):
        """The float block(s) this block replaced, sharing the (trained) parameters."""
        blocks = self._originals.blocks
        if len(blocks) == 1:
            return blocks[0]
        seq = nn.HybridSequential(prefix='')
        seq.add(*blocks)
        return seq

    def __repr__(self):
        flags = ', '.join(name for name in MODE_FLAGS if self._mode[name])
        return (f"{type(self).__name__}({self.name}, w{self.config.weight_bits}"
                f"a{self.config.input_bits}, {self.config.weight_granularity}; {flags})")


class QConv2D(QuantBlock):
    """Fake-quantized ``nn.Conv2D`` (NCHW)."""
    _weight_ndim = 4

    def __init__(self, conv, config):
        if not isinstance(conv, nn.Conv2D) or conv._kwargs.get('layout', 'NCHW') != 'NCHW':
            raise TypeError(f"{conv.name}: QConv2D needs an NCHW nn.Conv2D, "
                            f"got {type(conv).__name__}")
        super().__init__(conv, config)
        self._conv_kwargs = dict(conv._kwargs)
        self._channels = conv._channels

    @classmethod
    def from_float(cls, block, config):
        return cls(block, config)

    @property
    def groups(self):
        return self._conv_kwargs['num_group']

    def _conv(self, F, x, weight, bias=None):
        kwargs = dict(self._conv_kwargs, no_bias=bias is None)
        if bias is None:
            return F.Convolution(x, weight, name='fwd', **kwargs)
        return F.Convolution(x, weight, bias, name='fwd', **kwargs)

    def _quantized_conv(self, F, x, weight, bias, state, extra_multiplier=None):
        """``(conv(x_q, w_q) * (1 / (s_in * s_w)) * extra_multiplier + bias``; with input
        quantization off, ``conv(x, w_q / s_w)`` instead. ``state``: the quantizer
        parameters (graph inputs by name)."""
        w_q, s_w = self._quantized_weight(F, weight, self._channels, self.groups,
                                          state['weight_threshold_factor'],
                                          state['weight_learned_threshold'])
        x_q, s_in, token = self._quantized_input(F, x, state, weight)
        if s_in is None and extra_multiplier is None:
            if token is not None:
                w_q = F.broadcast_add(w_q, F.reshape(token, (1, 1, 1, 1)))
            return self._conv(F, x, F.broadcast_div(w_q, F.reshape(s_w, (-1, 1, 1, 1))), bias)
        if s_in is None:
            multiplier = 1.0 / s_w
            out = self._conv(F, x, w_q)
        else:
            multiplier = self.output_multiplier(F, s_in, s_w)
            out = self._conv(F, x_q, w_q)
        if extra_multiplier is not None:
            multiplier = multiplier * extra_multiplier
        return self._scale_channels(F, out, _with_token(F, multiplier, token), bias)

    def _scale_channels(self, F, out, multiplier, bias):
        """``fma(out, multiplier[c], bias[c])``: ncnn's dequantization, one rounding."""
        return ops.dequantize(F, out, multiplier, bias, 4, name='dequantize')

    def hybrid_forward(self, F, x, weight, bias=None, **state):
        if not self._mode['quantize']:
            return self._apply_act(self._conv(F, x, weight, bias))
        return self._apply_act(self._quantized_conv(F, x, weight, bias, state))


class QConv2DBatchNorm(QConv2D):
    """Fake-quantized ``Conv2D`` followed by its ``BatchNorm``, with fake batchnorm.

    Training (BN not frozen), after Jacob et al. 2018 / Krishnamoorthi 2018: the weights are
    folded with the *running* statistics, ``w' = w * gamma / sqrt(var_r + eps)``, and
    quantized; the conv of the quantized folded weights is divided back by the fold factor and
    passed through the real BatchNorm op, which normalizes with the batch statistics and updates
    the running ones (in the backward pass, as MXNet 1.9 does). The output is
    ``conv(x, Q(w')) * sigma_r / sigma_B + ...``,
    the batch-statistics correction, with no extra convolution.
    After ``freeze_bn``: ``conv(x, Q(w')) + b'`` with running statistics, which is exactly what
    the deployed, BN-fused layer computes.
    """

    def __init__(self, conv, bn, config):
        if conv.act is not None:
            raise TypeError(f"{conv.name}: a conv with a built-in activation cannot absorb "
                            f"{bn.name}")
        super().__init__(conv, config)
        self._originals = _Originals(conv, bn)
        self._bn_kwargs = dict(bn._kwargs)
        if self._bn_kwargs.get('axis', 1) != 1:
            raise TypeError(f"{bn.name}: fake batchnorm needs BatchNorm(axis=1)")
        for attr in ('gamma', 'beta', 'running_mean', 'running_var'):
            _share(self, getattr(bn, attr), attr)

    @classmethod
    def from_float(cls, conv, bn, config):
        return cls(conv, bn, config)

    def _batchnorm(self, F, x, gamma, beta, running_mean, running_var):
        with self._originals.blocks[1].name_scope():
            return F.BatchNorm(x, gamma, beta, running_mean, running_var, name='fwd',
                               **self._bn_kwargs)

    def folded_weight_bias(self, F, weight, bias, gamma, beta, running_mean, running_var):
        """The conv with this BN folded in (running statistics): (w', b')."""
        return ops.fold_bn(F, weight, bias, gamma, beta, running_mean, running_var,
                           self._bn_kwargs['eps'], self._bn_kwargs['fix_gamma'])

    def folded_weight(self, ctx=None):
        ctx = ctx or self.weight.list_ctx()[0]
        weight, bias = super().folded_weight(ctx)
        bn = [getattr(self, name).data(ctx) for name in
              ('gamma', 'beta', 'running_mean', 'running_var')]
        return self.folded_weight_bias(mx.nd, weight, bias, *bn)

    def hybrid_forward(self, F, x, weight, bias=None, gamma=None, beta=None,
                       running_mean=None, running_var=None, **state):
        bn_params = (gamma, beta, running_mean, running_var)
        if not self._mode['quantize']:
            return self._batchnorm(F, self._conv(F, x, weight, bias), *bn_params)
        folded_weight, folded_bias = self.folded_weight_bias(F, weight, bias, *bn_params)
        if self._mode['bn_frozen']:
            return self._quantized_conv(F, x, folded_weight, folded_bias, state)
        factor = ops.bn_factor(F, gamma, running_var, self._bn_kwargs['eps'],
                               self._bn_kwargs['fix_gamma'])
        # A zero gamma gives zero folded weights and output beta; avoid 0/0 there.
        safe_factor = F.where(factor == 0, F.ones_like(factor), factor)
        unfolded = self._quantized_conv(F, x, folded_weight, bias, state,
                                        extra_multiplier=1.0 / safe_factor)
        return self._batchnorm(F, unfolded, *bn_params)


class QDense(QuantBlock):
    """Fake-quantized ``nn.Dense`` (any ``flatten``); one weight scale per output unit."""
    _weight_ndim = 2

    def __init__(self, dense, config):
        if not isinstance(dense, nn.Dense):
            raise TypeError(f"{dense.name}: QDense needs an nn.Dense, got {type(dense).__name__}")
        super().__init__(dense, config)
        self._units = dense._units
        self._flatten = dense._flatten

    @classmethod
    def from_float(cls, block, config):
        return cls(block, config)

    groups = 1

    def _fc(self, F, x, weight, bias=None):
        return F.FullyConnected(x, weight, bias, no_bias=bias is None, num_hidden=self._units,
                                flatten=self._flatten, name='fwd')

    def hybrid_forward(self, F, x, weight, bias=None, **state):
        if not self._mode['quantize']:
            return self._apply_act(self._fc(F, x, weight, bias))
        w_q, s_w = self._quantized_weight(F, weight, self._units, 1,
                                          state['weight_threshold_factor'],
                                          state['weight_learned_threshold'])
        x_q, s_in, token = self._quantized_input(F, x, state, weight)
        if s_in is None:
            multiplier, acc = 1.0 / s_w, self._fc(F, x, w_q)
        else:
            multiplier, acc = self.output_multiplier(F, s_in, s_w), self._fc(F, x_q, w_q)
        multiplier = _with_token(F, multiplier, token)
        # Named, so the deployed layer's output can be found in the traced graph.
        out = ops.dequantize(F, F.reshape(acc, (-1, self._units)), multiplier, bias, 2,
                             name='dequantize' if self._flatten else None, fused=False)
        if not self._flatten:
            out = F.reshape_like(out, acc, name='dequantize')
        return self._apply_act(out)


class FoldedBatchNorm(HybridBlock):
    """Stands where a BatchNorm was after it moved into the preceding conv: identity."""

    def __init__(self, bn, into):
        super().__init__(prefix=bn.prefix + 'folded_')
        self._originals = _Originals(bn)
        self._into = into.name

    @property
    def float_blocks(self):
        """The BatchNorm this block stands for."""
        return self._originals.blocks

    def hybrid_forward(self, F, x):
        return x

    def __repr__(self):
        return f"FoldedBatchNorm(into {self._into})"
