"""Training: learning-rate schedules, a plain fit loop, devices and workers, and the
checkpointed epoch loop of a recipe stage.

Devices and distributed training: ``run.devices`` splits each batch over contexts, gradients
are summed through a kvstore, and after every step the state that is not trained is made one
again: range trackers take the maximum over the copies (each copy saw part of the batch, and
the tracker follows the batch max |x|, so the maximum of the updated copies is exactly the
update a single device would make from the whole batch), BatchNorm running statistics the
mean. With ``run.kvstore: dist_sync`` the same holds across machines (the per-worker values
are gathered through the kvstore). Each worker trains on its shard of every epoch (samples
rank, rank + workers, ...); rank 0 writes the checkpoints, TensorBoard events and exports.
"""
import math
import random
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd

from ..analysis.stats import layer_stats
from ..convert import load_parameters
from ..errors import NonFiniteError
from ..metrics import accuracy
from ..nn import quant_blocks
from ..nn.learned import with_learned_ranges
from ..report import progress
from .data import batches, epoch_order, iterate

# Distributed kvstore keys: a block of gradient keys per stage, and a state-sync key per
# vector length (so no key ever changes shape on the servers).
KV_GRAD_KEYS, KV_SYNC_KEYS = 1 << 16, 1 << 24

# optimizer name -> the recipe keys it takes (besides lr)
OPTIMIZERS = {'sgd': ('momentum', 'wd'), 'nag': ('momentum', 'wd'), 'adam': ('wd',)}


def _milestones(stage, steps):
    # MXNet changes the rate once num_update exceeds a step: milestone m takes effect at the
    # first update of epoch m.
    return [max(1, m * steps - 1) for m in stage['milestones']]


# schedule name -> mx.lr_scheduler over a stage's updates (stage section, updates per epoch,
# total updates)
SCHEDULES = {
    'constant': lambda stage, steps, total: mx.lr_scheduler.FactorScheduler(
        step=total + 1, factor=1.0, base_lr=stage['lr']),
    'cosine': lambda stage, steps, total: mx.lr_scheduler.CosineScheduler(
        max_update=total, base_lr=stage['lr'], final_lr=0.0),
    'step': lambda stage, steps, total: mx.lr_scheduler.MultiFactorScheduler(
        step=_milestones(stage, steps) or [total + 1], factor=stage['factor'],
        base_lr=stage['lr']),
}


def schedule(stage, steps):
    """The learning rate of a training stage as a function of the number of updates done:
    ``stage['schedule']`` (an ``mx.lr_scheduler``) over the stage's ``epochs * steps``
    updates, times a linear warm-up from 0 over ``warmup_epochs`` (multiplied, so the
    schedule keeps its shape over the whole stage)."""
    scheduler = SCHEDULES[stage['schedule']](stage, steps, max(1, stage['epochs'] * steps))
    warmup = stage['warmup_epochs'] * steps

    def lr_at(num_update):
        return (min(1.0, num_update / warmup) if warmup else 1.0) * scheduler(num_update)
    return lr_at


def learning_rate(stage, epoch, steps=1000):
    """The learning rate at (fractional) ``epoch`` of a stage with ``steps`` updates per
    epoch."""
    return schedule(stage, steps)(int(round(epoch * steps)))


# ----- the plain loop ------------------------------------------------------------------------
def evaluate(net, x, y, batch_size=256):
    """Top-1 accuracy (%) of ``net`` on numpy arrays ``x``, ``y``."""
    return accuracy(net, batches(x, y, batch_size))


def fit(net, x, y, epochs, batch_size=64, optimizer='sgd', optimizer_params=None, seed=0,
        progress=print):
    """Plain supervised training on numpy arrays with softmax cross-entropy; one summary line
    per epoch through ``progress``."""
    optimizer_params = optimizer_params or {'learning_rate': 0.05, 'momentum': 0.9,
                                            'wd': 1e-4}
    trainer = gluon.Trainer(net.collect_params(), optimizer, optimizer_params)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for epoch in range(epochs):
        start, total, seen = time.time(), 0.0, 0
        for data, label in batches(x, y, batch_size, shuffle=True, seed=seed + epoch):
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            trainer.step(data.shape[0])
            total += float(loss.sum().asscalar())
            seen += data.shape[0]
        progress(f"epoch {epoch + 1}/{epochs}: loss {total / seen:.4f} "
            f"({time.time() - start:.1f} s)")
    return net


def reseed(*numbers):
    """Seed python, numpy and mxnet from a tuple of non-negative integers."""
    seed = int(np.random.RandomState(list(numbers)).randint(2 ** 31 - 1))
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


def check_finite(net, where, folder, loss):
    """Refuse to checkpoint a net with a NaN or infinite parameter (a ReLU can hide it from
    the loss), naming it; the last good checkpoint stays."""
    for param in net.collect_params().values():
        if param._data is not None and not np.all(np.isfinite(param.data().asnumpy())):
            raise NonFiniteError(f"{where}: parameter {param.name} holds NaN or infinite "
                                 f"values (the loss was {loss:.4g}); stopped, the last good "
                                 f"checkpoint is kept in {folder.folder} (lower the learning "
                                 f"rate, then resume)")


class StopRun(Exception):
    """Raised by a callback to stop a run (tests use it to simulate a kill)."""


# ----- devices and workers -------------------------------------------------------------------
def parse_device(text):
    kind, index = text[:-1].split('(')
    return mx.gpu(int(index)) if kind == 'gpu' else mx.cpu(int(index))


class Devices:
    """The contexts of one worker and, with a distributed kvstore, its place among the
    workers; keeps the untrained state (trackers, BN statistics) one over all copies."""

    def __init__(self, devices, kvstore):
        self.contexts = [parse_device(d) for d in devices]
        self.kvstore, self.rank, self.workers = kvstore, 0, 1
        self.distributed = kvstore.startswith('dist')
        if self.distributed:
            self.kvstore = mx.kv.create(kvstore)
            self.rank, self.workers = self.kvstore.rank, self.kvstore.num_workers
        self._sync_keys = set()

    def barrier(self):
        if self.workers > 1:
            self.kvstore._barrier()

    def shard(self, order):
        """This worker's part of a sample order: every workers-th sample (the same count on
        every worker, which a synchronous kvstore needs)."""
        return order[:len(order) - len(order) % self.workers][self.rank::self.workers]

    @staticmethod
    def _synced_params(net):
        """Parameters with a copy per device that training changes without gradients."""
        return [p for p in net.collect_params().values()
                if p.grad_req == 'null' and not p.name.endswith(('qmode', 'qconfig'))]

    def sync_state(self, net):
        """Make the range trackers (max) and BN statistics (mean) one over devices and
        workers (see the module doc)."""
        params = self._synced_params(net)
        if len(self.contexts) == 1 and self.workers == 1 or not params:
            return
        ctx = self.contexts[0]
        values, is_tracker = [], []
        for param in params:
            copies = nd.stack(*[a.as_in_context(ctx) for a in param.list_data()])
            tracker = param.name.endswith('range_ema')
            values.append(copies.max(axis=0) if tracker else copies.mean(axis=0))
            is_tracker.append(tracker)
        if self.workers > 1:
            values = self._across_workers(values, is_tracker)
        for param, value in zip(params, values):
            for array in param.list_data():
                value.copyto(array)

    def _across_workers(self, values, is_tracker):
        """Reduce per-worker values through the kvstore: each worker pushes its values in its
        own row of a (workers, n) matrix, the servers sum the rows, every worker pulls them
        all and reduces (max for trackers, mean otherwise)."""
        flat = nd.concat(*[v.reshape(-1) for v in values], dim=0)
        rows = nd.zeros((self.workers, flat.size), ctx=flat.context)
        key = KV_SYNC_KEYS + flat.size
        if key not in self._sync_keys:
            self.kvstore.init(key, rows)
            self._sync_keys.add(key)
        rows[self.rank] = flat
        self.kvstore.push(key, rows)
        self.kvstore.pull(key, out=rows)
        maxima, means = rows.max(axis=0), rows.mean(axis=0)
        reduced, offset = [], 0
        for value, tracker in zip(values, is_tracker):
            part = (maxima if tracker else means)[offset:offset + value.size]
            reduced.append(part.reshape(value.shape))
            offset += value.size
        return reduced

    def gradient_keys(self, params, stage_id):
        """The distributed kvstore keys of a stage's gradients (each stage has its own, so
        the servers' arrays never change shape), initialized with rank 0's parameters, which
        every worker then takes."""
        keys = [KV_GRAD_KEYS * (stage_id + 1) + i for i in range(len(params))]
        # Plain copies: the kvstore cannot send arrays held in an MKLDNN layout.
        values = [nd.array(p.data(self.contexts[0]).asnumpy()) for p in params]
        self.kvstore.init(keys, values)
        self.kvstore.pull(keys, out=values)
        for param, value in zip(params, values):
            param.set_data(value)
        return keys


# ----- the epoch loop of a recipe stage ------------------------------------------------------
class Trainer:
    """The data and the checkpointed training loop of a recipe run; ``qat.app.stages.Run``
    adds the stages. Needs ``recipe``, ``seed``, ``devices``, ``folder`` (a RunFolder),
    ``train_set``, ``classes``, ``preprocess``, ``augment``, ``callbacks``, ``out``, ``log``."""

    metric_name = 'val top-1'  # what ``evaluate`` measures (in %)

    def train_batches(self, epoch, step):
        """This worker's (data, label) batches of ``epoch`` from batch ``step`` on."""
        return iterate(self.train_set, self.preprocess, self.recipe['run']['batch_size'],
                       order=self.shard(epoch), start=step, augment=self.augment,
                       augment_seed=(self.seed, epoch, self.devices.rank),
                       workers=self.recipe['data']['workers'], classes=self.classes)

    def batch_losses(self, net, xs, ys):
        """Per-sample losses of one batch, a list over devices (called under
        ``autograd.record``)."""
        loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        return [loss_fn(net(x), y) for x, y in zip(xs, ys)]

    def distill_losses(self, net, xs, targets, temperature):
        """Per-sample distillation losses of one batch (a list over devices; called under
        ``autograd.record``): ``T^2`` times the cross-entropy of ``net``'s outputs softened by
        ``T`` to the teacher's softened probabilities ``targets`` (Hinton et al. 2015; ``T^2``
        keeps the gradient's size independent of ``T``)."""
        return [-(p * nd.log_softmax(net(x) / temperature)).sum(axis=1) * temperature ** 2
                for x, p in zip(xs, targets)]

    def teacher(self):
        """The run's float net (``float.params``), the teacher of ``qat.distill``."""
        net = self._float_net()
        load_parameters(net, self.folder.path('float.params'), ctx=self.devices.contexts)
        return net

    def shard(self, epoch):
        """This worker's samples of ``epoch`` (the order depends on (seed, epoch) only)."""
        return self.devices.shard(epoch_order(len(self.train_set), self.seed, epoch))

    def train(self, stage, stage_id, net, section, on_epoch=None):
        """Train ``net`` for the ``section``'s epochs, resuming from the stage's checkpoint;
        ``on_epoch(net, epoch)`` runs at every epoch start (the QAT schedules)."""
        run, devices, folder = self.recipe['run'], self.devices, self.folder
        steps = math.ceil(len(self.shard(0)) / run['batch_size'])
        params = {name: section[name] for name in OPTIMIZERS[section['optimizer']]}
        # Distributed: the Trainer updates locally and gradients go through our own keys.
        optimizer = mx.optimizer.create(section['optimizer'], learning_rate=section['lr'],
                                        **params)
        if section.get('range_lr'):
            optimizer = with_learned_ranges(optimizer, net, section['range_lr'])
        trainer = gluon.Trainer(net.collect_params(), optimizer,
                                kvstore=None if devices.distributed else devices.kvstore,
                                update_on_kvstore=False)
        trained = [p for p in net.collect_params().values() if p.grad_req != 'null']
        if devices.distributed:
            keys = devices.gradient_keys(trained, stage_id)
        epoch, step, total, seen = 0, 0, 0.0, 0
        resumed = folder.resume(stage, net, trainer, devices.contexts)
        if resumed is not None:
            epoch, step, total, seen = resumed
            self.out(f"{stage}: resuming at epoch {epoch + 1}, step {step}")
        lr_at = schedule(section, steps)
        temperature = section.get('distill', 0.0)
        teacher = self.teacher() if temperature and section['epochs'] > epoch else None
        while epoch < section['epochs']:
            if step == 0 and on_epoch is not None:
                on_epoch(net, epoch)
            reseed(self.seed, stage_id, epoch, step)
            bar = progress(label=f"{stage} {epoch + 1}/{section['epochs']}", total=steps,
                           initial=step, enabled=run['progress'] and devices.rank == 0)
            start = time.time()
            for data, label in self.train_batches(epoch, step):
                lr = lr_at(epoch * steps + step)
                trainer.set_learning_rate(lr)
                xs = gluon.utils.split_and_load(data, devices.contexts, even_split=False)
                ys = gluon.utils.split_and_load(label, devices.contexts, even_split=False)
                if teacher is not None:
                    targets = [nd.softmax(teacher(x) / temperature) for x in xs]
                    with autograd.record():
                        losses = self.distill_losses(net, xs, targets, temperature)
                else:
                    with autograd.record():
                        losses = self.batch_losses(net, xs, ys)
                autograd.backward(losses)
                if devices.distributed:  # sum over devices and workers
                    devices.kvstore.pushpull(keys, [p.list_grad() for p in trained],
                                             out=[p.list_grad() for p in trained])
                trainer.step(data.shape[0] * devices.workers)  # the mean over all samples
                devices.sync_state(net)
                loss = sum(float(l.sum().asscalar()) for l in losses)
                if not math.isfinite(loss):
                    bar.close()
                    raise NonFiniteError(
                        f"{stage} epoch {epoch + 1}, step {step + 1}: the loss is {loss} (lr "
                        f"{lr:.3g}); stopped, the last good checkpoint is kept in "
                        f"{folder.folder} (lower {stage}.lr, then resume or start again)")
                total, seen, step = total + loss, seen + data.shape[0], step + 1
                folder.state['global_step'] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
                if folder.state['global_step'] % run['log_steps'] == 0:
                    self.log({f'{stage}/loss': loss / data.shape[0], f'{stage}/lr': lr})
                for callback in self.callbacks:
                    callback(stage, epoch, step, net)
                if run['checkpoint_steps'] and step % run['checkpoint_steps'] == 0 \
                        and step < steps:
                    check_finite(net, f"{stage} epoch {epoch + 1}, step {step}", folder,
                                 total / seen)
                    folder.checkpoint(stage, net, trainer, epoch, step, (total, seen))
                    reseed(self.seed, stage_id, epoch, step)
            bar.close()
            self._end_epoch(stage, net, section, epoch, total / max(seen, 1), lr,
                            time.time() - start)
            epoch, step, total, seen = epoch + 1, 0, 0.0, 0
            folder.checkpoint(stage, net, trainer, epoch, step, (total, seen))
        return net

    def _end_epoch(self, stage, net, section, epoch, loss, lr, seconds):
        """Evaluate, report and log the epoch, check the parameters, record the history."""
        acc = self.evaluate(net)
        record = {'stage': stage, 'epoch': epoch + 1, 'loss': loss, 'accuracy': acc, 'lr': lr,
                  'seconds': seconds}
        self.out(f"{stage} epoch {epoch + 1}/{section['epochs']}: loss {loss:.4f}, "
                 f"{self.metric_name} {acc:.2f}%, lr {lr:.3g} ({seconds:.1f} s)")
        scalars = {f'{stage}/epoch_loss': loss, f'{stage}/accuracy': acc}
        if quant_blocks(net) and self.logging:
            x, _ = next(iter(self.val_batches(self.recipe['run']['batch_size'])))
            scalars.update({f'{stage}/{k}': v for k, v in
                            layer_stats(net, x.as_in_context(self.devices.contexts[0])).items()})
        self.log(scalars)
        check_finite(net, f"{stage} epoch {epoch + 1}", self.folder, loss)
        self.folder.state['history'].append(record)
