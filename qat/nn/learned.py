"""The update of learned ranges (LSQ's thresholds): Adam on ``log T``, every other parameter
by the training's own optimizer.

The graph gives each threshold ``T`` LSQ's gradient (``qat.ops.lsq_gradient_factor``). Fed to
SGD with the weights' learning rate, that gradient moves a threshold by far more than the
weights move: on mobilenet0.25 (per-channel, BN folded, 9-weight depthwise channels) the
first update took thresholds of 0.2-1.5 by up to 0.9, within 50 steps some were negative,
and the run fell to chance. Here a threshold moves by Adam's normalized step in the log
domain (Jain et al. 2020, "trained quantization thresholds"): ``T <- T * exp(-lr_T * m / (sqrt(v) + eps))``
with ``m``, ``v`` Adam's bias-corrected moments of ``dL/dlog T = T * dL/dT``. ``T`` stays
positive, each step changes it by about ``lr_T`` at most (relatively), whatever the scale of
its gradient, and a threshold not started (0) stays 0. ``lr_T`` follows the schedule of the
training's learning rate (``lr_T = range_lr * lr / lr_0``).
"""
import mxnet as mx
import numpy as np

from . import quant_blocks

RANGE_LR = 1e-3


def learned_range_names(net):
    """The names of the learned-threshold parameters of ``net``'s blocks that learn ranges."""
    names = set()
    for _, block in quant_blocks(net):
        if block.learns_ranges:
            names.update(p.name for p in (block.learned_threshold,
                                          block.weight_learned_threshold))
    return names


def _forwarded(name):
    """A property read from and written to ``self.base``'s attribute ``name``."""
    return property(lambda self: getattr(self.base, name),
                    lambda self, value: setattr(self.base, name, value))


class LearnedRangeOptimizer(mx.optimizer.Optimizer):
    """``base`` (an ``mx.optimizer.Optimizer``) for every parameter but those named in
    ``ranges``, which get Adam on their logarithm at ``range_lr`` (see the module). Give it to
    ``gluon.Trainer`` in place of the optimizer; it forwards the learning rate, the gradient
    rescaling and the parameters to ``base``, and pickles with the Trainer's states."""

    def __init__(self, base, ranges, range_lr=RANGE_LR, beta1=0.9, beta2=0.999, epsilon=1e-8):
        if range_lr <= 0:
            raise ValueError(f"range_lr must be positive, got {range_lr}")
        self.base = base
        super().__init__(learning_rate=base.lr, rescale_grad=base.rescale_grad)
        self.aggregate_num = base.aggregate_num
        self.ranges = frozenset(ranges)
        self.range_lr, self.start_lr = float(range_lr), float(base.lr)
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon

    # the Trainer sets these on its optimizer; the base one is the one that uses them
    param_dict = _forwarded('param_dict')
    rescale_grad = _forwarded('rescale_grad')

    def __getstate__(self):
        return dict(self.__dict__)  # the base drops its own param_dict

    def set_learning_rate(self, lr):
        self.lr = lr
        self.base.set_learning_rate(lr)

    def _is_range(self, index):
        return self.param_dict[index].name in self.ranges

    def create_state_multi_precision(self, index, weight):
        if self._is_range(index):  # m, v, steps; numpy: a few values each
            return [np.zeros(weight.shape, np.float32), np.zeros(weight.shape, np.float32), 0]
        return self.base.create_state_multi_precision(index, weight)

    def update_multi_precision(self, index, weight, grad, state):
        if not isinstance(index, (list, tuple)):
            if self._is_range(index):
                self._update_range(weight, grad, state)
            else:
                self.base.update_multi_precision(index, weight, grad, state)
            return
        rest = [k for k, i in enumerate(index) if not self._is_range(i)]
        if rest:
            self.base.update_multi_precision(*([seq[k] for k in rest]
                                               for seq in (index, weight, grad, state)))
        for k, i in enumerate(index):
            if self._is_range(i):
                self._update_range(weight[k], grad[k], state[k])

    def _update_range(self, threshold, grad, state):
        # In numpy (float32): a threshold is one value or one per channel, and a dozen tiny
        # MXNet ops per threshold cost more than the training step of a small net.
        m, v = state[0], state[1]
        state[2] += 1
        t, f32 = threshold.asnumpy(), np.float32
        g = grad.asnumpy() * f32(self.rescale_grad) * t  # dL/dlog T
        m[:] = f32(self.beta1) * m + f32(1 - self.beta1) * g
        v[:] = f32(self.beta2) * v + f32(1 - self.beta2) * np.square(g)
        m_hat = m / f32(1 - self.beta1 ** state[2])
        v_hat = v / f32(1 - self.beta2 ** state[2])
        lr = f32(self.range_lr * self.lr / self.start_lr)
        threshold[:] = t * np.exp(-lr * m_hat / (np.sqrt(v_hat) + f32(self.epsilon)))


def with_learned_ranges(optimizer, net, range_lr=RANGE_LR):
    """``optimizer`` (an ``mx.optimizer.Optimizer``) wrapped so that ``net``'s learned ranges
    get their own update (``LearnedRangeOptimizer``); ``optimizer`` itself when ``net``
    learns no ranges."""
    names = learned_range_names(net)
    return LearnedRangeOptimizer(optimizer, names, range_lr) if names else optimizer
