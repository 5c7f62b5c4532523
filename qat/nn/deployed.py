"""The fp32 layers that sit between int8 layers and that ncnn computes with its own float32
arithmetic: once deployed (quantize and BN frozen) these blocks compute it the same way, so
the next int8 layer sees the device's codes (docs/ncnn-int8-contract.md §3.6). Before that
they are exactly the float block they replaced (training unchanged).
"""
import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock, nn

from .. import ops
from ..errors import UserError
from .layers import MODE_FLAGS, _Originals, _share


# Mode flags of a stand-alone BatchNorm (a subset of MODE_FLAGS), in the order they are saved
# in its ``bn_qmode`` parameter.
BN_MODE_FLAGS = ('quantize', 'bn_frozen')


class DeployedFloatBlock(HybridBlock):
    """Base of the float blocks that, once deployed (quantize and BN frozen), compute what
    ncnn's fp32 layer computes, so the next int8 layer sees the device's codes: one float
    block replaced, the flags ``BN_MODE_FLAGS``. ``set_mode`` accepts every flag of
    ``MODE_FLAGS`` and ignores the ones it does not carry, so that the net-wide mode functions
    can visit every mode block (``qat.nn.mode_blocks``)."""

    def __init__(self, float_block):
        super().__init__(prefix=float_block.prefix, params=float_block.params)
        self._originals = _Originals(float_block)
        self._mode = {'quantize': True, 'bn_frozen': False}

    @property
    def deployed(self):
        return self._mode['quantize'] and self._mode['bn_frozen']

    @property
    def mode(self):
        """The current mode flags (a copy): ``BN_MODE_FLAGS`` only."""
        return dict(self._mode)

    def set_mode(self, **flags):
        """Change mode flags (any of ``MODE_FLAGS``); the graph is rebuilt on the next
        call."""
        unknown = set(flags) - set(MODE_FLAGS)
        if unknown:
            raise UserError(f"unknown mode flag(s) {sorted(unknown)}; valid: {MODE_FLAGS}")
        self._mode.update({k: bool(v) for k, v in flags.items() if k in BN_MODE_FLAGS})
        self._mode_changed()
        self._clear_cached_op()

    def _mode_changed(self):
        """Hook: keep a saved copy of the flags in step (QBatchNorm's ``bn_qmode``)."""

    @property
    def float_blocks(self):
        """The float block this block replaced."""
        return self._originals.blocks

    def to_float(self):
        """The float block this block replaced, sharing the (trained) parameters."""
        return self._originals.blocks[0]

    def __repr__(self):
        flags = ', '.join(name for name in BN_MODE_FLAGS if self._mode[name])
        return f"{type(self).__name__}({self.name}; {flags})"


class QBatchNorm(DeployedFloatBlock):
    """A BatchNorm that stays a layer of its own (not folded into a conv, as in pre-activation
    nets), computed in the deployed form as ncnn computes its fp32 BatchNorm.

    Shares the BatchNorm's prefix and Parameters (same names). While BN is not frozen, or
    with quantization disabled: exactly ``nn.BatchNorm`` (the same op: batch statistics and
    running-statistics updates in training, running statistics in inference). BN frozen:
    ``ops.batchnorm_ncnn`` with the running statistics (no more updates), bit for bit what
    the exported ncnn BatchNorm layer gives (docs/ncnn-int8-contract.md §3.6), so the next
    int8 layer sees the codes the device computes.

    Not a ``QuantBlock`` (no weights to quantize, no input range): ``qat.quant_blocks`` does
    not list it; ``qat.nn.mode_blocks`` does. Its flags are ``BN_MODE_FLAGS``, saved in the
    ``bn_qmode`` parameter; ``set_mode`` accepts every flag of ``MODE_FLAGS`` and ignores
    the ones it does not carry, so that net-wide mode functions can visit every mode block.
    """

    def __init__(self, bn):
        if type(bn) is not nn.BatchNorm or bn._kwargs.get('axis', 1) != 1:
            raise TypeError(f"{bn.name}: QBatchNorm needs an nn.BatchNorm(axis=1), got "
                            f"{type(bn).__name__}")
        super().__init__(bn)
        self._bn_kwargs = dict(bn._kwargs)
        for attr in ('gamma', 'beta', 'running_mean', 'running_var'):
            _share(self, getattr(bn, attr), attr)
        self.bn_qmode = self.params.get('bn_qmode', shape=(len(BN_MODE_FLAGS),),
                                        grad_req='null', differentiable=False,
                                        init=mx.init.Constant(self._mode_vector()))
        if bn.running_var._data is not None:
            self.bn_qmode.initialize(ctx=bn.running_var.list_ctx())

    @classmethod
    def from_float(cls, bn, config=None):
        """The converter (``config`` is not used: nothing is quantized). A BatchNorm over
        another axis than 1 is returned as it is (left float)."""
        if bn._kwargs.get('axis', 1) != 1:
            return bn
        return cls(bn)

    # ----- modes (saved in ``bn_qmode``) ------------------------------------------------
    def _mode_vector(self):
        return np.array([float(self._mode[name]) for name in BN_MODE_FLAGS], np.float32)

    def _mode_changed(self):
        self.bn_qmode.init = mx.init.Constant(self._mode_vector())
        if self.bn_qmode._data is not None:
            self.bn_qmode.set_data(mx.nd.array(self._mode_vector()))

    def load_mode(self):
        """Take the mode flags from the (loaded) ``bn_qmode`` parameter."""
        values = self.bn_qmode.data().asnumpy()
        self._mode = {name: bool(values[i] > 0.5) for i, name in enumerate(BN_MODE_FLAGS)}
        self._clear_cached_op()

    # ----- forward -----------------------------------------------------------------------
    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var, bn_qmode=None):
        if self.deployed:
            return ops.batchnorm_ncnn(F, x, gamma, beta, running_mean, running_var,
                                      self._bn_kwargs['eps'], self._bn_kwargs['fix_gamma'],
                                      name='fwd')
        return F.BatchNorm(x, gamma, beta, running_mean, running_var, name='fwd',
                           **self._bn_kwargs)

    def cast(self, dtype):
        """As ``nn.BatchNorm``: its parameters stay float32 in a float16 net."""
        if np.dtype(dtype).name == 'float16':
            dtype = 'float32'
        super().cast(dtype)



class QAvgPool2D(DeployedFloatBlock):
    """An ``nn.AvgPool2D`` between int8 layers, computed in the deployed form as ncnn
    computes its fp32 average pooling (``ops.avgpool_ncnn``).

    Only the configuration ncnn runs differently from MXNet's Pooling is converted (see
    ``from_float``): NCHW, valid (floor) windows, ``count_include_pad`` (GluonCV's
    inception pools). While quantization is off or BN is not frozen: exactly
    ``nn.AvgPool2D`` (the same op). Quantize and BN frozen (the deployed mode): ncnn's sum
    in window order times float32(1 / area), bit for bit what the exported ncnn Pooling
    layer gives, packing on and off, so the next int8 layer sees the device's codes.

    No parameters: its flags (``BN_MODE_FLAGS``, as ``QBatchNorm``) are set by the net-wide
    mode functions (``qat.nn.mode_blocks`` lists it) and, on loading a checkpoint, taken
    from the first quantized block.
    """

    def __init__(self, pool):
        if not self.exact_in_ncnn(pool):
            raise TypeError(f"{pool.name}: QAvgPool2D needs an nn.AvgPool2D (NCHW, valid "
                            f"windows, count_include_pad), got {type(pool).__name__} "
                            f"{getattr(pool, '_kwargs', {})}")
        super().__init__(pool)
        self._pool_kwargs = dict(pool._kwargs)

    @staticmethod
    def exact_in_ncnn(pool):
        """Whether ``ops.avgpool_ncnn`` is what ncnn computes for ``pool``: an
        ``nn.AvgPool2D``, NCHW, valid windows, ``count_include_pad``. (Without
        count_include_pad, ncnn divides by the area with packing off, as MXNet does, and
        multiplies by its reciprocal for a packed blob: no single form; left float.)"""
        kwargs = getattr(pool, '_kwargs', {})
        return type(pool) is nn.AvgPool2D and kwargs.get('layout', 'NCHW') == 'NCHW' \
            and kwargs.get('pooling_convention', 'valid') == 'valid' \
            and not kwargs.get('global_pool', False) \
            and kwargs.get('count_include_pad', True)

    @classmethod
    def from_float(cls, pool, config=None):
        """The converter (``config`` is not used: nothing is quantized). Any other pooling
        configuration is returned as it is (left float)."""
        return cls(pool) if cls.exact_in_ncnn(pool) else pool

    # ----- forward -----------------------------------------------------------------------
    def hybrid_forward(self, F, x):
        if self.deployed:
            kw = self._pool_kwargs
            return ops.avgpool_ncnn(F, x, kw['kernel'], kw['stride'], kw['pad'], name='fwd')
        return F.Pooling(x, name='fwd', **self._pool_kwargs)
