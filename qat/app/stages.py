"""The recipe run: its stages in order, each a plain step with its outputs in the run folder
``<run.out>/<run.name>/``::

    float    optional float pre-training                         -> float.params
    ptq      convert, calibrate, freeze; accuracy at the recipe's
             bits and at calibrate.report_bits                    -> ptq.params
    qat      quantization-aware fine-tuning (schedules of input
             quantization, BN and range freezing)                 -> qat.params
    export   qat.deploy.export (ncnn int8 and Caffe)              -> export/
    verify   qat.deploy.verify (ncnn runtime vs. simulation)      -> verify.json

and at the end ``summary.md`` with ``curves.png``. Randomness is reseeded from (seed, stage,
epoch, step) at every epoch start and checkpoint, and the data order of an epoch depends on
(seed, epoch) only, so ``resume=True`` ends exactly where an uninterrupted run ends.
"""
import os

import mxnet as mx
import numpy as np

from . import models
from ..analysis.selection import choose_method, format_choice
from ..batches import Reiterable
from ..calibration import calibrate
from ..config import QuantScheme
from ..convert import convert_model, load_parameters
from ..deploy import export, format_report, verify
from ..errors import MissingFileError, UserError
from ..fileio import read_json, write_json
from ..metrics import accuracy
from ..modes import freeze_bn, freeze_ranges, quantize_input
from ..nn import quant_blocks
from .checks import check_devices, check_labels, check_model, open_splits
from .data import Augment, Preprocess, epoch_order, iterate, open_split
from . import detection
from .detection import DetectionStages
from .detectors import gluon_backbone
from .recipe import load as load_recipe
from .reports import Scalars, results_table, scheme_name, write_summary
from .runfolder import RunFolder
from .trainer import Devices, Trainer

STAGES = ('float', 'ptq', 'qat', 'export', 'verify')


def quant_scheme(section, bits=None):
    """The QuantScheme of a recipe's ``quantize`` section; ``bits`` replaces weight and input
    bits (not the first layer's nor the per-layer overrides)."""
    scheme = QuantScheme.from_dict(section)
    return scheme if bits is None else scheme.with_bits(bits)


def build_model(section, input_shape, contexts, seed):
    """The float net of a recipe's ``model`` section, initialized (seeded) or loaded from
    ``checkpoint``, with every shape known."""
    return models.build(section['name'], section['kwargs'], section['source'],
                        params=section['checkpoint'] or None, seed=seed, ctx=contexts,
                        input_shape=input_shape, weights=section['weights'] or None)


def validation_batches(recipe, preprocess, limit=None, classes=None):
    """The recipe's validation data, preprocessed, in order (``limit`` samples at most;
    ``classes``: labels must lie in [0, classes))."""
    dataset = open_split(recipe['data'], 'val')
    order = np.arange(len(dataset))[:limit or None]
    return iterate(dataset, preprocess, recipe['run']['eval_batch_size'], order=order,
                   workers=recipe['data']['workers'], classes=classes)


def calibration_batches(recipe, train_set, preprocess, seed):
    """The first ``calibrate.batches`` training batches in a fixed order, re-iterable (some
    calibration methods read them twice): what the PTQ stage calibrates on."""
    size = recipe['run']['batch_size']
    order = epoch_order(len(train_set), seed, 0)[:size * recipe['calibrate']['batches']]
    return Reiterable(lambda: iterate(train_set, preprocess, size, order=order,
                                      workers=recipe['data']['workers']))


class Run(Trainer):
    """One recipe run: the run folder, devices, data and the stages (see the module doc)."""

    def __init__(self, recipe, resume=False, callbacks=(), out=print):
        self.recipe, self.callbacks, self.out = recipe, list(callbacks), out
        run = recipe['run']
        self.seed = run['seed']
        self.devices = Devices(run['devices'], run['kvstore'])
        self.preprocess = Preprocess.from_recipe(recipe['preprocess'])
        self._validate()  # before anything is written
        self.folder = RunFolder(os.path.join(run['out'], run['name']), self.devices.rank,
                                self.devices.barrier)
        self.folder.lock()
        try:
            self.folder.start(recipe, resume)
            self.augment = Augment(recipe['data']['flip'], recipe['data']['pad_crop'])
            self.scalars = None
            if run['tensorboard'] and self.devices.rank == 0:
                self.scalars = Scalars(self.folder.path('tensorboard'),
                                       self.folder.state['global_step'] + 1 if resume else None)
            self._final = None
            self.devices.barrier()  # every worker has read the state before anyone writes
        except BaseException:
            self.folder.unlock()
            raise

    def _validate(self):
        """The checks of ``qat.app.checks``: devices, data, model, labels, exclusions."""
        check_devices(self.devices.contexts, self.recipe['run']['devices'])
        self.train_set, val_set = open_splits(self.recipe['data'])
        net = build_model(self.recipe['model'], None, self.devices.contexts, self.seed)
        self.classes = check_model(net, self.preprocess.input_shape,
                                   self.recipe['quantize']['exclude'], self.devices.contexts[0])
        check_labels((self.train_set, val_set), self.classes)

    # ----- data and logging ----------------------------------------------------------------
    @property
    def logging(self):
        return self.scalars is not None

    def log(self, values):
        if self.scalars is not None:
            self.scalars.add(self.folder.state['global_step'], values)

    def val_batches(self, limit=None):
        return validation_batches(self.recipe, self.preprocess, limit, self.classes)

    def calibration_batches(self):
        return calibration_batches(self.recipe, self.train_set, self.preprocess, self.seed)

    def evaluate(self, net):
        return accuracy(net, self.val_batches(), self.devices.contexts[0])

    def calibration_inputs(self):
        """What calibration reads: the calibration batches (labels are ignored)."""
        return self.calibration_batches()

    def calibration_method(self):
        """The recipe's ``calibrate.method``, or the one the PTQ stage chose from
        ``calibrate.choose_from``."""
        return self.folder.state['results'].get('calibration_method') or \
            self.recipe['calibrate']['method']

    def _calibrate(self, net):
        cal = self.recipe['calibrate']
        if cal['choose_from'] and 'calibration_method' not in self.folder.state['results']:
            # scored on the calibration batches with their labels (training data)
            choice = choose_method(net, self.calibration_inputs(), cal['choose_from'],
                                   scored=list(self.calibration_batches()), max_samples=None,
                                   num_batches=cal['batches'])
            self.out(f"calibration method chosen by {choice['metric']} on the calibration "
                     f"batches:\n{format_choice(choice)}")
            self.folder.state['results']['calibration_method'] = choice['chosen']
        else:
            calibrate(net, self.calibration_inputs(), method=self.calibration_method(),
                      num_batches=cal['batches'])
        self.devices.sync_state(net)

    # ----- stages --------------------------------------------------------------------------
    def model_section(self):
        """The recipe's ``model`` section as the builder takes it."""
        return self.recipe['model']

    def _float_net(self):
        net = build_model(self.model_section(), self.preprocess.input_shape,
                          self.devices.contexts, self.seed)
        net.hybridize(static_alloc=True)
        return net

    def _quantized_net(self, bits=None, params=None):
        """The float net converted (at ``bits``, default the recipe's), loaded from ``params``
        (a quantized checkpoint) or calibrated."""
        net = self._float_net()
        load_parameters(net, self.folder.path('float.params'), ctx=self.devices.contexts)
        convert_model(net, config=quant_scheme(self.recipe['quantize'], bits))
        if params is not None:
            load_parameters(net, params, ctx=self.devices.contexts)
        else:
            self._calibrate(net)
        return net

    def stage_float(self):
        section = self.recipe['float']
        net = self._float_net()
        if section['epochs']:
            self.train('float', STAGES.index('float'), net, section)
        self.folder.save(net, 'float.params')
        acc = self.evaluate(net)
        if not section['epochs']:  # the last epoch logged it otherwise
            self.log({'float/accuracy': acc})
        self.folder.finish_stage('float', float=acc)

    def stage_ptq(self):
        results = {}
        for bits in [None] + self.recipe['calibrate']['report_bits']:
            net = self._quantized_net(bits)
            freeze_bn(net)
            freeze_ranges(net)
            label = scheme_name(self.recipe['quantize'], bits)
            results[label] = self.evaluate(net)
            self.out(f"post-training {label}: {self.metric_name} {results[label]:.2f}%")
            if bits is None:
                self.folder.save(net, 'ptq.params')
        self.log({f'ptq/accuracy_{k}': v for k, v in results.items()})
        self.folder.finish_stage('ptq', ptq=results)

    def _qat_schedule(self, net, epoch):
        """The QAT modes of ``epoch``: input quantization, BN and range freezing."""
        section = self.recipe['qat']
        on = epoch >= section['input_quant_epoch']
        wanted = {'bn_frozen': section['freeze_bn_epoch'] is not None
                  and epoch >= section['freeze_bn_epoch'],
                  'ranges_frozen': section['freeze_ranges_epoch'] is not None
                  and epoch >= section['freeze_ranges_epoch']}
        mode = quant_blocks(net)[0][1].mode
        if on and not mode['quantize_input'] and epoch > 0:
            self._calibrate(net)  # the weights moved since calibration
        if mode['quantize_input'] != on:
            quantize_input(net, on)
        if mode['bn_frozen'] != wanted['bn_frozen']:
            freeze_bn(net, wanted['bn_frozen'])
        if mode['ranges_frozen'] != wanted['ranges_frozen']:
            freeze_ranges(net, wanted['ranges_frozen'])

    def stage_qat(self):
        section = self.recipe['qat']
        net = self._quantized_net(params=self.folder.path('ptq.params'))
        if section['epochs']:
            self.train('qat', STAGES.index('qat'), net, section, on_epoch=self._qat_schedule)
        freeze_bn(net)
        freeze_ranges(net)
        self.folder.save(net, 'qat.params')
        acc = self.evaluate(net)
        self.log({'qat/final_accuracy': acc})
        self.folder.finish_stage('qat', qat=acc)

    def final_net(self):
        """The deployed form: the QAT result (the PTQ one when QAT has no epochs)."""
        if self._final is None:
            self._final = self._quantized_net(params=self.folder.path('qat.params'))
        return self._final

    def stage_export(self):
        section = self.recipe['export']
        if not section['enabled'] or self.devices.rank != 0:
            return self.folder.finish_stage('export')
        shape = tuple(section['input_shape']) or self.preprocess.input_shape
        folder = self.folder.path('export')
        paths = export(self.final_net(), folder, input_shape=shape, name=section['name'],
                       winograd=section['winograd'], **self.export_options())
        write_json(os.path.join(folder, 'preprocess.json'), self.preprocess.ncnn())
        self.out(f"exported to {folder}")
        self.folder.finish_stage('export', export={  # relative: the run folder can move
            k: os.path.relpath(v, self.folder.folder) for k, v in paths.items()})

    def export_options(self):
        """Task-specific keyword arguments of ``qat.deploy.export``."""
        return {}

    def stage_verify(self):
        section = self.recipe['verify']
        if not (section['enabled'] and self.recipe['export']['enabled']) \
                or self.devices.rank != 0:
            return self.folder.finish_stage('verify')
        report, results = self.verify_stage(self.folder.path('verify.json'))
        self.folder.finish_stage('verify', verify_passed=bool(report['passed']), **results)

    def verify_stage(self, report_path):
        """(verify's report, results: 'ncnn', the ncnn int8 model's metric on the
        validation images)."""
        section = self.recipe['verify']
        report = verify(self.final_net(), self.folder.path('export'),
                        self.val_batches(section['samples']),
                        name=self.recipe['export']['name'], report_path=report_path,
                        **section['thresholds'])
        ncnn = 100.0 * report['accuracy']['ncnn_int8']
        self.out(f"verify: {'passed' if report['passed'] else 'FAILED: '}"
                 f"{'; '.join(report['failures'])} (ncnn int8 top-1 {ncnn:.2f}%, "
                 f"{report['samples']} images; report {report_path})")
        for note in report.get('notes', []):
            self.out(f"verify: note: {note}")
        return report, {'ncnn': ncnn}

    def run(self):
        stages = {'float': self.stage_float, 'ptq': self.stage_ptq, 'qat': self.stage_qat,
                  'export': self.stage_export, 'verify': self.stage_verify}
        try:
            for name in STAGES:
                if name not in self.folder.state['done']:
                    stages[name]()
        finally:
            if self.scalars is not None:
                self.scalars.close()
            self.folder.unlock()
        state = self.folder.state
        table = results_table(self.recipe, state['results'], self.metric_name)
        if self.devices.rank == 0:
            write_summary(self.folder.folder, self.recipe, state, self.metric_name)
        results = dict(state['results'], folder=self.folder.folder, table=table)
        self.out(results['table'])
        return results


class DetectionRun(DetectionStages, Run):
    """A run of ``model.task: detection`` (``qat.app.detection``'s hooks)."""


# model.task -> the run class
RUNS = {'classification': Run, 'detection': DetectionRun}


def run_recipe(path, overrides=(), resume=False, callbacks=(), out=print, check_files=True):
    """Run the recipe at ``path`` with ``--set`` style ``overrides``; ``resume`` continues
    the run folder's last checkpoint. ``callbacks``: functions (stage, epoch, step, net)
    called after every training step (raise StopRun to stop). Returns the results:
    accuracies per stage ('float', 'ptq' {scheme: top-1}, 'qat', 'ncnn'), 'verify_passed',
    'export' paths, the run 'folder' and the final Markdown 'table'."""
    recipe = load_recipe(path, overrides, check_files=check_files)
    return RUNS[recipe['model']['task']](recipe, resume=resume, callbacks=callbacks,
                                         out=out).run()


def load_run(folder, task=None):
    """(final net, resolved recipe, Preprocess) of a run folder written by ``run_recipe``
    whose QAT stage finished (its result; with no QAT epochs, the PTQ net), on the CPU,
    modes and configs restored. A folder that is not a run, a run stopped before the end of
    QAT, or (with ``task``) a run of another ``model.task`` is an error naming it."""
    recipe_file = os.path.join(folder, 'recipe.yaml')
    if not os.path.isfile(recipe_file):
        raise MissingFileError(f"{folder} is not a run folder (no recipe.yaml): run "
                               f"`qat train` first")
    state = read_json(os.path.join(folder, 'state.json'))
    if 'qat' not in state.get('done', []):
        missing = next(stage for stage in STAGES if stage not in state.get('done', []))
        raise UserError(f"{folder}: the run stopped before finishing stage {missing!r} "
                        f"(there is no final net to export yet): continue it with "
                        f"`qat train <recipe> --resume`")
    recipe = load_recipe(recipe_file, check_files=False)
    if task is not None and recipe['model']['task'] != task:
        raise UserError(f"{folder}: a {recipe['model']['task']} run, not a {task} run")
    preprocess = Preprocess.from_recipe(recipe['preprocess'])
    contexts = [mx.cpu()]
    net = build_model(dict(recipe['model'], checkpoint=''), preprocess.input_shape, contexts,
                      recipe['run']['seed'])
    if recipe['model']['task'] == 'detection':
        gluon_backbone(net)  # as the run trained it
    convert_model(net, config=quant_scheme(recipe['quantize']))
    load_parameters(net, os.path.join(folder, 'qat.params'), ctx=contexts)
    return net, recipe, preprocess


def export_options(recipe):
    """``qat.deploy.export``'s task-specific options of a recipe (a detector's thresholds)."""
    return detection.export_options(recipe) if recipe['model']['task'] == 'detection' else {}


def verify_run(net, recipe, preprocess, folder, report_path, samples=0, name=None,
               out=print, **options):
    """``qat verify`` of a run's net against the export in ``folder`` on the recipe's
    validation data (``samples`` images, 0: all), with the recipe's thresholds and
    ``options`` (verify's ``packing``, ``threads``): the report, printed. A detection run
    adds the VOC07 mAP of the ncnn model and of the simulation decoded alike."""
    name = name or recipe['export']['name']
    options = dict(recipe['verify']['thresholds'], **options)
    if recipe['model']['task'] == 'detection':
        classes, batches = detection.validation(recipe, preprocess)
        shape = tuple(recipe['export']['input_shape']) or preprocess.input_shape
        report, _ = detection.verify_detector(net, folder, name, batches, classes, shape,
                                              report_path, out, samples=samples, **options)
    else:
        report = verify(net, folder, validation_batches(recipe, preprocess, samples),
                        name=name, report_path=report_path, **options)
    out(format_report(report))
    return report
