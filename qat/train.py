"""Training: evaluation, a plain fit loop, and the recipe trainer.

``run_recipe`` runs a recipe's stages in order, each a plain step with its outputs in the run
folder ``<run.out>/<run.name>/``:

    float    optional float pre-training                         -> float.params
    ptq      convert, calibrate, freeze; accuracy at the recipe's
             bits and at calibrate.report_bits                    -> ptq.params
    qat      quantization-aware fine-tuning (schedules of input
             quantization, BN and range freezing)                 -> qat.params
    export   qat.deploy.export (ncnn int8 and Caffe)              -> export/
    verify   qat.deploy.verify (ncnn runtime vs. simulation)      -> verify.json

Checkpoints: ``state.json`` (format version, stage, epoch, step, history, results) is the
commit point, written atomically after the files it names (``<stage>/e<epoch>-s<step>.params``
with the quantization modes, ``.states`` with the optimizer state). Randomness is reseeded from
(seed, stage, epoch, step) at every epoch start and checkpoint, and the data order of an epoch
depends on (seed, epoch) only, so ``resume=True`` ends exactly where an uninterrupted run ends.

Devices and distributed training: ``run.devices`` splits each batch over contexts, gradients
are summed through a kvstore, and after every step the non-trained state is made one again:
range trackers take the maximum over the copies (each copy saw part of the batch, and the
tracker follows the batch max |x|, so the maximum of the updated copies is exactly the update a
single device would make from the whole batch), BatchNorm running statistics the mean.
With ``run.kvstore: dist_sync`` the same holds across machines (the per-worker values are
gathered through the kvstore). Launch a scheduler, the servers and the workers with the same
DMLC_* variables (on one machine: DMLC_PS_ROOT_URI=127.0.0.1)::

    export DMLC_PS_ROOT_URI=10.0.0.1 DMLC_PS_ROOT_PORT=9091 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2
    DMLC_ROLE=scheduler python -c "import mxnet" &      # on the root host
    DMLC_ROLE=server    python -c "import mxnet" &      # one per server
    DMLC_ROLE=worker qat train recipe.yaml --set run.kvstore=dist_sync   # on every worker

Each worker trains on its shard of every epoch (samples rank, rank + workers, ...); rank 0
writes the checkpoints, TensorBoard events and exports (the run folder should be shared for
--resume).
"""
import contextlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time

import mxnet as mx
import numpy as np
import yaml
from mxnet import autograd, gluon, nd

from .benchmarks import format_table
from .calibrate import calibrate
from .config import QuantConfig
from .convert import (convert_model, first_layer, freeze_bn, freeze_ranges, load_parameters,
                      quant_blocks, quantize_input, save_parameters, walk)
from .data import Augment, Preprocess, batches, epoch_order, iterate, open_split
from .layers import QConv2DBatchNorm
from .recipe import dump as dump_recipe, load as load_recipe

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STAGES = ('float', 'ptq', 'qat', 'export', 'verify')
# Distributed kvstore keys: a block of gradient keys per stage, and a state-sync key per
# vector length (so no key ever changes shape on the servers).
KV_GRAD_KEYS, KV_SYNC_KEYS = 1 << 16, 1 << 24

# optimizer name -> the recipe keys it takes (besides lr)
OPTIMIZERS = {'sgd': ('momentum', 'wd'), 'nag': ('momentum', 'wd'), 'adam': ('wd',)}

# schedule name -> lr multiplier f(progress in [0, 1], stage section)
SCHEDULES = {
    'constant': lambda progress, stage: 1.0,
    'cosine': lambda progress, stage: 0.5 * (1.0 + math.cos(math.pi * progress)),
    'step': lambda progress, stage: stage['factor'] ** sum(
        progress * stage['epochs'] >= m for m in stage['milestones']),
}


def learning_rate(stage, epoch):
    """The learning rate at (fractional) ``epoch`` of a training stage: the schedule times a
    linear warm-up over ``warmup_epochs``."""
    warmup = min(1.0, epoch / stage['warmup_epochs']) if stage['warmup_epochs'] else 1.0
    return stage['lr'] * warmup * SCHEDULES[stage['schedule']](epoch / stage['epochs'], stage)


# ----- evaluation and the plain loop ---------------------------------------------------------
def accuracy(net, data, ctx=None):
    """Top-1 accuracy (%) of ``net`` over an iterable of (data, label) batches."""
    correct = seen = 0
    for x, y in data:
        if ctx is not None:
            x = x.as_in_context(ctx)
        predicted = net(x).argmax(axis=1).as_in_context(y.context)
        correct += int((predicted == y.astype('float32')).sum().asscalar())
        seen += y.shape[0]
    return 100.0 * correct / max(seen, 1)


def evaluate(net, x, y, batch_size=256):
    """Top-1 accuracy (%) of ``net`` on numpy arrays ``x``, ``y``."""
    return accuracy(net, batches(x, y, batch_size))


def fit(net, x, y, epochs, batch_size=64, optimizer='sgd', optimizer_params=None, seed=0,
        progress=print):
    """Plain supervised training with softmax cross-entropy; one summary line per epoch."""
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


# ----- files ---------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path):
    """A temporary path next to ``path`` to write to; renamed onto ``path`` on success."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-')
    os.close(handle)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path, text):
    """Write ``text`` (str or bytes) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            f.write(text.encode() if isinstance(text, str) else text)


def write_json(path, value):
    atomic_write(path, json.dumps(value, indent=1, sort_keys=True) + '\n')


# ----- TensorBoard (the tensorboard package's own writer and protos; no TensorFlow) ---------
class Scalars:
    """Scalar summaries in a TensorBoard event folder."""

    def __init__(self, folder, resume_step=None):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        from tensorboard.compat.proto import event_pb2, summary_pb2
        self._event, self._summary = event_pb2, summary_pb2
        _after_existing_event_files(folder)
        self._writer = EventFileWriter(folder)
        if resume_step is not None:
            # TensorBoard drops the events of the killed run from this step on.
            self._writer.add_event(event_pb2.Event(
                wall_time=time.time(), step=resume_step,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def add(self, step, values):
        """Write {tag: value} at global ``step``."""
        summary = self._summary.Summary(value=[
            self._summary.Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in values.items()])
        self._writer.add_event(self._event.Event(wall_time=time.time(), step=int(step),
                                                 summary=summary))

    def close(self):
        self._writer.close()


def _after_existing_event_files(folder):
    """Wait until a new event file name (timestamped in whole seconds) sorts after the
    existing ones, since TensorBoard reads the files in name order."""
    os.makedirs(folder, exist_ok=True)
    stamps = [int(name.split('.')[3]) for name in os.listdir(folder)
              if name.startswith('events.out.tfevents.') and name.split('.')[3].isdigit()]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


class Progress:
    """A plain-text progress bar on stderr (only when it is a terminal)."""

    def __init__(self, label, total, enabled=True):
        self.label, self.total, self.start = label, total, time.time()
        self.enabled = enabled and sys.stderr.isatty()
        self._shown = 0.0

    def update(self, done, loss):
        now = time.time()
        if not self.enabled or (now - self._shown < 0.2 and done < self.total):
            return
        self._shown = now
        filled = int(30 * done / max(self.total, 1))
        rate = done / max(now - self.start, 1e-9)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                         f"{done}/{self.total} loss {loss:.4f} {rate:.1f} it/s ")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write('\r' + ' ' * 100 + '\r')
            sys.stderr.flush()


# ----- models --------------------------------------------------------------------------------
def _gluoncv_model(name, kwargs):
    from gluoncv.model_zoo import get_model
    return get_model(name, **kwargs)


def _factory_model(name, kwargs):
    import importlib
    module, function = name.split(':')
    return getattr(importlib.import_module(module), function)(**kwargs)


MODEL_BUILDERS = {'gluoncv': _gluoncv_model, 'factory': _factory_model}


def build_model(section, input_shape, contexts, seed):
    """The float net of a recipe's ``model`` section, initialized (seeded) or loaded from
    ``checkpoint``, with every shape known (one forward pass)."""
    mx.random.seed(seed)
    with mx.name.NameManager():  # fresh name counters: the same block names in every process
        net = MODEL_BUILDERS[section['source']](section['name'], dict(section['kwargs']))
    if section['checkpoint']:
        net.load_parameters(section['checkpoint'], ctx=contexts)
    else:
        net.initialize(mx.init.Xavier(), ctx=contexts)
    net(nd.zeros((1,) + tuple(input_shape), ctx=contexts[0]))
    return net


def quant_config(section, bits=None):
    """(QuantConfig, layer_configs) of a recipe's ``quantize`` section; ``bits`` replaces
    weight and input bits (not the first layer's)."""
    config = QuantConfig(weight_bits=bits or section['weight_bits'],
                         input_bits=bits or section['input_bits'],
                         weight_granularity=section['granularity'],
                         input_signed=section['signed'], fake_bn=section['fake_bn'],
                         range_momentum=section['range_momentum'])
    return config, section['first_layer_bits']


def _convert(net, section, bits=None):
    config, first_bits = quant_config(section, bits)
    layer_configs = None
    if first_bits is not None:
        layer_configs = {first_layer(net): config.updated(weight_bits=first_bits,
                                                          input_bits=first_bits)}
    return convert_model(net, exclude=section['exclude'], config=config,
                         layer_configs=layer_configs)


def _parse_device(text):
    kind, index = text[:-1].split('(')
    return mx.gpu(int(index)) if kind == 'gpu' else mx.cpu(int(index))


# ----- per-layer statistics ------------------------------------------------------------------
def clipped_fraction(x, threshold, signed=True):
    """Fraction of the elements of ``x`` outside the quantization range: ``|x| > T`` (signed)
    or ``x > T or x < 0`` (unsigned)."""
    outside = (nd.abs(x) > threshold) if signed else ((x > threshold) + (x < 0))
    return float(outside.mean().asscalar())


@contextlib.contextmanager
def _imperative(net):
    """Run ``net`` block by block (so forward hooks fire), then restore hybridization."""
    blocks = [net] + [b for *_, b in walk(net)]
    active = {b: b._active for b in blocks if hasattr(b, '_active')}
    for b in active:
        b._active = False
        b._clear_cached_op()
    try:
        yield
    finally:
        for b, was_active in active.items():
            b._active = was_active
            b._clear_cached_op()


def layer_stats(net, x):
    """{tag: value} per quantized block on one batch ``x``: input range, mean weight scale
    and fraction of clipped inputs."""
    seen = {}
    blocks = quant_blocks(net)
    handles = [block.register_forward_pre_hook(
        lambda block, inputs: seen.__setitem__(block, inputs[0])) for _, block in blocks]
    try:
        with _imperative(net):
            net(x)
    finally:
        for handle in handles:
            handle.detach()
    stats = {}
    for _, block in blocks:
        ctx = x.context
        weight = block.weight.data(ctx)
        if isinstance(block, QConv2DBatchNorm):
            bias = block.bias.data(ctx) if getattr(block, 'bias', None) is not None else None
            weight, _ = block.folded_weight_bias(
                nd, weight, bias, *(getattr(block, a).data(ctx) for a in
                                    ('gamma', 'beta', 'running_mean', 'running_var')))
        channels = getattr(block, '_channels', None) or block._units
        _, scales = block._quantized_weight(nd, weight, channels, block.groups)  # as trained
        stats[f'weight_scale/{block.name}'] = float(scales.mean().asscalar())
        tracked = block.input_threshold()
        if tracked is not None:
            stats[f'input_range/{block.name}'] = tracked
            if block in seen:
                stats[f'clipped/{block.name}'] = clipped_fraction(seen[block], tracked,
                                                                  block.config.input_signed)
    return stats


# ----- the recipe trainer --------------------------------------------------------------------
class Reiterable:
    """An iterable that calls ``make()`` for a fresh iterator each time."""

    def __init__(self, make):
        self._make = make

    def __iter__(self):
        return self._make()


class StopRun(Exception):
    """Raised by a callback to stop a run (tests use it to simulate a kill)."""


def _reseed(*numbers):
    """Seed python, numpy and mxnet from a tuple of non-negative integers."""
    seed = int(np.random.RandomState(list(numbers)).randint(2 ** 31 - 1))
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


class Run:
    """One recipe run: the run folder, devices, data and the stages (see the module doc)."""

    def __init__(self, recipe, resume=False, callbacks=(), out=print):
        self.recipe, self.callbacks, self.out = recipe, list(callbacks), out
        run = recipe['run']
        self.folder = os.path.join(run['out'], run['name'])
        self.seed = run['seed']
        self.contexts = [_parse_device(d) for d in run['devices']]
        self.kvstore = run['kvstore']
        self.rank, self.workers = 0, 1
        self.distributed = run['kvstore'].startswith('dist')
        if self.distributed:
            self.kvstore = mx.kv.create(run['kvstore'])
            self.rank, self.workers = self.kvstore.rank, self.kvstore.num_workers
        self.preprocess = Preprocess.from_recipe(recipe['preprocess'])
        self.state = self._start_state(resume)
        self.train_set = open_split(recipe['data'], 'train')
        self.augment = Augment(recipe['data']['flip'], recipe['data']['pad_crop'])
        self.scalars = None
        if run['tensorboard'] and self.rank == 0:
            self.scalars = Scalars(os.path.join(self.folder, 'tensorboard'),
                                   self.state['global_step'] + 1 if resume else None)
        self._sync_keys = set()
        self._final = None
        if self.workers > 1:
            self.kvstore._barrier()  # every worker has read the state before anyone writes

    # ----- state and checkpoints -----------------------------------------------------------
    def _path(self, *parts):
        return os.path.join(self.folder, *parts)

    def _start_state(self, resume):
        state_file = self._path('state.json')
        if os.path.exists(state_file) and not resume:
            raise FileExistsError(f"{self.folder} already holds a run: continue it with "
                                  f"--resume, or choose another run.name (--set run.name=...)")
        if resume and os.path.exists(state_file):
            with open(state_file) as f:
                state = json.load(f)
            if state.get('format_version') != FORMAT_VERSION:
                raise ValueError(f"{state_file}: checkpoint format "
                                 f"{state.get('format_version')}, this version reads "
                                 f"{FORMAT_VERSION}")
            with open(self._path('recipe.yaml')) as f:
                saved = yaml.safe_load(f)
            changed = [f"{s}.{k}" for s in saved for k in saved[s]
                       if self.recipe[s][k] != saved[s][k]]
            if changed:
                raise ValueError(f"{self._path('recipe.yaml')}: --resume with a different "
                                 f"recipe (changed: {', '.join(changed)}); resume with the "
                                 "same recipe and overrides")
            return state
        state = {'format_version': FORMAT_VERSION, 'done': [], 'stage': None, 'epoch': 0,
                 'step': 0, 'epoch_loss': [0.0, 0], 'global_step': 0, 'files': {},
                 'history': [], 'results': {}}
        if self.rank == 0:
            os.makedirs(self.folder, exist_ok=True)
            dump_recipe(self.recipe, self._path('recipe.yaml'))
        return state

    def _commit(self, **changes):
        """Update the state and write state.json (the commit point), then metrics.json."""
        self.state.update(changes)
        if self.rank != 0:
            return
        write_json(self._path('state.json'), self.state)
        write_json(self._path('metrics.json'), {
            'format_version': FORMAT_VERSION, 'history': self.state['history'],
            'results': self.state['results']})

    def _checkpoint(self, stage, net, trainer, epoch, step, epoch_loss):
        """Write the parameters (with modes) and optimizer state of ``stage`` at (epoch,
        step), commit (with the epoch's running loss), then remove the previous checkpoint
        files."""
        old = dict(self.state['files'])
        files = {'params': f"{stage}/e{epoch:04d}-s{step:06d}.params",
                 'states': f"{stage}/e{epoch:04d}-s{step:06d}.states"}
        if self.rank == 0:
            os.makedirs(self._path(stage), exist_ok=True)
            save_parameters(net, self._path(files['params']))
            with atomic_path(self._path(files['states'])) as tmp:
                trainer.save_states(tmp)
        self._commit(stage=stage, epoch=epoch, step=step, files=files,
                     epoch_loss=list(epoch_loss))
        if self.rank == 0:
            for name in old.values():
                if name not in files.values() and os.path.exists(self._path(name)):
                    os.remove(self._path(name))

    def _save(self, net, name):
        """Save ``net`` as ``name`` in the run folder (rank 0), which every worker reads next."""
        if self.rank == 0:
            save_parameters(net, self._path(name))
        if self.workers > 1:
            self.kvstore._barrier()

    def _finish_stage(self, stage, **results):
        """Record the stage's results as done; its last checkpoint is no longer needed."""
        old = list(self.state['files'].values())
        self.state['results'].update(results)
        self._commit(done=self.state['done'] + [stage], stage=None, epoch=0, step=0,
                     files={})
        if self.rank == 0:
            for name in old:
                if os.path.exists(self._path(name)):
                    os.remove(self._path(name))

    def _log(self, values):
        if self.scalars is not None:
            self.scalars.add(self.state['global_step'], values)

    # ----- data ----------------------------------------------------------------------------
    def _val_batches(self, limit=None):
        return validation_batches(self.recipe, self.preprocess, limit)

    def _calibration_batches(self):
        """The first ``calibrate.batches`` training batches in a fixed order, re-iterable
        (some calibration methods read them twice)."""
        size = self.recipe['run']['batch_size']
        order = epoch_order(len(self.train_set), self.seed, 0)
        order = order[:size * self.recipe['calibrate']['batches']]
        return Reiterable(lambda: iterate(self.train_set, self.preprocess, size, order=order,
                                          workers=self.recipe['data']['workers']))

    def _shard(self, epoch):
        """This worker's samples of ``epoch``: every workers-th of the epoch order (the same
        count on every worker, which a synchronous kvstore needs)."""
        order = epoch_order(len(self.train_set), self.seed, epoch)
        return order[:len(order) - len(order) % self.workers][self.rank::self.workers]

    def evaluate(self, net):
        return accuracy(net, self._val_batches(), self.contexts[0])

    # ----- synchronizing the state that is not trained -------------------------------------
    def _synced_params(self, net):
        """Parameters with a copy per device that training changes without gradients."""
        return [p for p in net.collect_params().values()
                if p.grad_req == 'null' and not p.name.endswith('qmode')]

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

    def _gradient_keys(self, params, stage_id):
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

    # ----- training ------------------------------------------------------------------------
    def train(self, stage, net, section, on_epoch=None):
        """Train ``net`` for the ``section``'s epochs, resuming from the stage's checkpoint;
        ``on_epoch(net, epoch)`` runs at every epoch start (the QAT schedules)."""
        run = self.recipe['run']
        stage_id = STAGES.index(stage)
        steps = math.ceil(len(self._shard(0)) / run['batch_size'])
        params = {name: section[name] for name in OPTIMIZERS[section['optimizer']]}
        # Distributed: the Trainer updates locally and gradients go through our own keys.
        trainer = gluon.Trainer(net.collect_params(), section['optimizer'],
                                dict(params, learning_rate=section['lr']),
                                kvstore=None if self.distributed else self.kvstore,
                                update_on_kvstore=False)
        trained = [p for p in net.collect_params().values() if p.grad_req != 'null']
        if self.distributed:
            keys = self._gradient_keys(trained, stage_id)
        epoch = step = 0
        total, seen = 0.0, 0  # loss sum and samples of the current epoch
        if self.state['stage'] == stage:
            epoch, step = self.state['epoch'], self.state['step']
            total, seen = self.state['epoch_loss']
            load_parameters(net, self._path(self.state['files']['params']), ctx=self.contexts)
            trainer.load_states(self._path(self.state['files']['states']))
            self.out(f"{stage}: resuming at epoch {epoch + 1}, step {step}")
        loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        while epoch < section['epochs']:
            if step == 0 and on_epoch is not None:
                on_epoch(net, epoch)
            _reseed(self.seed, stage_id, epoch, step)
            order = self._shard(epoch)
            progress = Progress(f"{stage} {epoch + 1}/{section['epochs']}", steps,
                                run['progress'] and self.rank == 0)
            start = time.time()
            for data, label in iterate(self.train_set, self.preprocess, run['batch_size'],
                                       order=order, start=step, augment=self.augment,
                                       augment_seed=(self.seed, epoch, self.rank),
                                       workers=self.recipe['data']['workers']):
                lr = learning_rate(section, epoch + step / steps)
                trainer.set_learning_rate(lr)
                xs = gluon.utils.split_and_load(data, self.contexts, even_split=False)
                ys = gluon.utils.split_and_load(label, self.contexts, even_split=False)
                with autograd.record():
                    losses = [loss_fn(net(x), y) for x, y in zip(xs, ys)]
                autograd.backward(losses)
                if self.distributed:  # sum over devices and workers
                    self.kvstore.pushpull(keys, [p.list_grad() for p in trained],
                                          out=[p.list_grad() for p in trained])
                trainer.step(data.shape[0] * self.workers)  # the mean over all workers' samples
                self.sync_state(net)
                loss = sum(float(l.sum().asscalar()) for l in losses)
                total, seen, step = total + loss, seen + data.shape[0], step + 1
                self.state['global_step'] += 1
                progress.update(step, total / seen)
                if self.state['global_step'] % run['log_steps'] == 0:
                    self._log({f'{stage}/loss': loss / data.shape[0], f'{stage}/lr': lr})
                for callback in self.callbacks:
                    callback(stage, epoch, step, net)
                if run['checkpoint_steps'] and step % run['checkpoint_steps'] == 0 \
                        and step < steps:
                    self._checkpoint(stage, net, trainer, epoch, step, (total, seen))
                    _reseed(self.seed, stage_id, epoch, step)
            progress.close()
            acc = self.evaluate(net)
            record = {'stage': stage, 'epoch': epoch + 1, 'loss': total / max(seen, 1),
                      'accuracy': acc, 'lr': lr, 'seconds': time.time() - start}
            self.out(f"{stage} epoch {epoch + 1}/{section['epochs']}: loss "
                     f"{record['loss']:.4f}, val top-1 {acc:.2f}%, lr {lr:.3g} "
                     f"({record['seconds']:.1f} s)")
            scalars = {f'{stage}/epoch_loss': record['loss'], f'{stage}/accuracy': acc}
            if quant_blocks(net) and self.scalars is not None:
                x, _ = next(iter(self._val_batches(run['batch_size'])))
                scalars.update({f'{stage}/{k}': v for k, v in
                                layer_stats(net, x.as_in_context(self.contexts[0])).items()})
            self._log(scalars)
            self.state['history'].append(record)
            epoch, step, total, seen = epoch + 1, 0, 0.0, 0
            self._checkpoint(stage, net, trainer, epoch, step, (total, seen))
        return net

    # ----- stages --------------------------------------------------------------------------
    def _float_net(self):
        net = build_model(self.recipe['model'], self.preprocess.input_shape, self.contexts,
                          self.seed)
        net.hybridize(static_alloc=True)
        return net

    def _quantized_net(self, bits=None, params=None):
        """The float net converted (at ``bits``, default the recipe's), loaded from ``params``
        (a quantized checkpoint) or calibrated."""
        net = self._float_net()
        load_parameters(net, self._path('float.params'), ctx=self.contexts)
        _convert(net, self.recipe['quantize'], bits)
        if params is not None:
            load_parameters(net, params, ctx=self.contexts)
            return net
        cal = self.recipe['calibrate']
        calibrate(net, self._calibration_batches(), method=cal['method'],
                  num_batches=cal['batches'])
        self.sync_state(net)
        return net

    def stage_float(self):
        section = self.recipe['float']
        net = self._float_net()
        if section['epochs']:
            self.train('float', net, section)
        self._save(net, 'float.params')
        acc = self.evaluate(net)
        self._log({'float/accuracy': acc})
        self._finish_stage('float', float=acc)

    def stage_ptq(self):
        q = self.recipe['quantize']
        results = {}
        for bits in [None] + self.recipe['calibrate']['report_bits']:
            net = self._quantized_net(bits)
            freeze_bn(net)
            freeze_ranges(net)
            label = _scheme(q, bits)
            results[label] = self.evaluate(net)
            self.out(f"post-training {label}: val top-1 {results[label]:.2f}%")
            if bits is None:
                self._save(net, 'ptq.params')
        self._log({f'ptq/accuracy_{k}': v for k, v in results.items()})
        self._finish_stage('ptq', ptq=results)

    def _qat_schedule(self, net, epoch):
        """The QAT modes of ``epoch``: input quantization, BN and range freezing."""
        section = self.recipe['qat']
        on = epoch >= section['input_quant_epoch']
        wanted = {'quantize_input': on,
                  'bn_frozen': section['freeze_bn_epoch'] is not None
                  and epoch >= section['freeze_bn_epoch'],
                  'ranges_frozen': section['freeze_ranges_epoch'] is not None
                  and epoch >= section['freeze_ranges_epoch']}
        mode = quant_blocks(net)[0][1].mode
        if on and not mode['quantize_input'] and epoch > 0:
            cal = self.recipe['calibrate']  # the weights moved since calibration
            calibrate(net, self._calibration_batches(), method=cal['method'],
                      num_batches=cal['batches'])
            self.sync_state(net)
        if mode['quantize_input'] != wanted['quantize_input']:
            quantize_input(net, on)
        if mode['bn_frozen'] != wanted['bn_frozen']:
            freeze_bn(net, wanted['bn_frozen'])
        if mode['ranges_frozen'] != wanted['ranges_frozen']:
            freeze_ranges(net, wanted['ranges_frozen'])

    def stage_qat(self):
        section = self.recipe['qat']
        net = self._quantized_net(params=self._path('ptq.params'))
        if section['epochs']:
            self.train('qat', net, section, on_epoch=self._qat_schedule)
        freeze_bn(net)
        freeze_ranges(net)
        self._save(net, 'qat.params')
        acc = self.evaluate(net)
        self._log({'qat/final_accuracy': acc})
        self._finish_stage('qat', qat=acc)

    def final_net(self):
        """The deployed form: the QAT result (the PTQ one when QAT has no epochs)."""
        if self._final is None:
            self._final = self._quantized_net(params=self._path('qat.params'))
        return self._final

    def stage_export(self):
        section = self.recipe['export']
        if not section['enabled'] or self.rank != 0:
            return self._finish_stage('export')
        from .deploy.export import export
        shape = tuple(section['input_shape']) or self.preprocess.input_shape
        paths = export(self.final_net(), self._path('export'), input_shape=shape,
                       name=section['name'], winograd=section['winograd'])
        write_json(self._path('export', 'preprocess.json'), self.preprocess.ncnn())
        self.out(f"exported to {self._path('export')}")
        self._finish_stage('export', export={k: str(v) for k, v in paths.items()})

    def stage_verify(self):
        section = self.recipe['verify']
        if not (section['enabled'] and self.recipe['export']['enabled']) or self.rank != 0:
            return self._finish_stage('verify')
        from .deploy.verify import verify
        report = verify(self.final_net(), self._path('export'),
                        self._val_batches(section['samples']),
                        name=self.recipe['export']['name'],
                        report_path=self._path('verify.json'), **section['thresholds'])
        ncnn = 100.0 * report['accuracy']['ncnn_int8']
        self.out(f"verify: {'passed' if report['passed'] else 'FAILED: '}"
                 f"{'; '.join(report['failures'])} (ncnn int8 top-1 {ncnn:.2f}%, "
                 f"{report['samples']} images; report {self._path('verify.json')})")
        self._finish_stage('verify', verify_passed=bool(report['passed']), ncnn=ncnn)

    def run(self):
        stages = {'float': self.stage_float, 'ptq': self.stage_ptq, 'qat': self.stage_qat,
                  'export': self.stage_export, 'verify': self.stage_verify}
        try:
            for name in STAGES:
                if name not in self.state['done']:
                    stages[name]()
        finally:
            if self.scalars is not None:
                self.scalars.close()
        results = dict(self.state['results'], folder=self.folder, table=self.table())
        self.out(results['table'])
        return results

    def table(self):
        """The final Markdown table of accuracies."""
        r, q = self.state['results'], self.recipe['quantize']
        rows = [('float32', 'float', _pct(r.get('float')))]
        rows += [(f'{scheme}', 'PTQ (simulated)', _pct(acc))
                 for scheme, acc in r.get('ptq', {}).items()]
        if 'qat' in r:
            epochs = self.recipe['qat']['epochs']
            rows.append((_scheme(q), f'QAT {epochs} epochs (simulated)', _pct(r['qat'])))
        if r.get('ncnn') is not None:
            rows.append((_scheme(q), 'ncnn int8 (measured)', _pct(r['ncnn'])))
        return format_table(rows, [self.recipe['run']['name'], 'method', 'val top-1 (%)'])


def _scheme(section, bits=None):
    return f"W{bits or section['weight_bits']}A{bits or section['input_bits']}"


def _pct(value):
    return '-' if value is None else f"{value:.2f}"


def run_recipe(path, overrides=(), resume=False, callbacks=(), out=print, check_files=True):
    """Run the recipe at ``path`` with ``--set`` style ``overrides``; ``resume`` continues
    the run folder's last checkpoint. ``callbacks``: functions (stage, epoch, step, net)
    called after every training step (raise StopRun to stop). Returns the results:
    accuracies per stage ('float', 'ptq' {scheme: top-1}, 'qat', 'ncnn'), 'verify_passed',
    'export' paths, the run 'folder' and the final Markdown 'table'."""
    recipe = load_recipe(path, overrides, check_files=check_files)
    return Run(recipe, resume=resume, callbacks=callbacks, out=out).run()


def load_run(folder):
    """(final net, resolved recipe, Preprocess) of a run folder written by ``run_recipe``:
    the QAT result (the PTQ one if QAT did not run), on the CPU, modes restored."""
    recipe_file = os.path.join(folder, 'recipe.yaml')
    if not os.path.isfile(recipe_file):
        raise FileNotFoundError(f"{folder} is not a run folder (no recipe.yaml): run "
                                f"`qat train` first")
    recipe = load_recipe(recipe_file, check_files=False)
    params = [os.path.join(folder, name) for name in ('qat.params', 'ptq.params')]
    params = [path for path in params if os.path.isfile(path)]
    if not params:
        raise FileNotFoundError(f"{folder}: neither qat.params nor ptq.params; the run has "
                                f"not reached post-training quantization (resume it)")
    preprocess = Preprocess.from_recipe(recipe['preprocess'])
    contexts = [mx.cpu()]
    net = build_model(dict(recipe['model'], checkpoint=''), preprocess.input_shape, contexts,
                      recipe['run']['seed'])
    _convert(net, recipe['quantize'])
    load_parameters(net, params[0], ctx=contexts)
    return net, recipe, preprocess


def validation_batches(recipe, preprocess, limit=None):
    """The recipe's validation data, preprocessed, in order (``limit`` samples at most)."""
    dataset = open_split(recipe['data'], 'val')
    order = np.arange(len(dataset))[:limit or None]
    return iterate(dataset, preprocess, recipe['run']['eval_batch_size'], order=order,
                   workers=recipe['data']['workers'])
