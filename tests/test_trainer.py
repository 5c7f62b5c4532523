"""The recipe trainer and the data loaders, on small data made here (and the bundled digits)."""
import json
import os
import socket
import subprocess
import sys
import time

import mxnet as mx
import numpy as np
import pytest

from qat.analysis.stats import layer_stats
from qat.app import data, runfolder, stages, trainer
from qat.app.recipe import load as load_recipe
from qat.convert import convert_model
from tests.helpers import random_image, tiny_net, tiny_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quiet(*args):
    pass


def stop_at(stage, epoch, step):
    """A callback that simulates a kill after (stage, epoch, step)."""
    def callback(s, e, k, net):
        if (s, e, k) == (stage, epoch, step):
            raise trainer.StopRun(f"killed at {stage} epoch {epoch} step {step}")
    return callback


def saved_params(path):
    return {k: v.asnumpy() for k, v in mx.nd.load(path).items()}


def history(folder):
    with open(os.path.join(folder, 'metrics.json')) as f:
        metrics = json.load(f)
    return [{k: v for k, v in r.items() if k != 'seconds'} for r in metrics['history']], \
        metrics['results']


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(folder, 'tensorboard'))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


# ----- resume --------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """One uninterrupted run, and the same run killed twice (mid-epoch in float pre-training,
    then in QAT after the BN/range schedules switched) and resumed each time."""
    tmp = tmp_path_factory.mktemp('resume')
    whole = stages.run_recipe(tiny_recipe(tmp, 'whole'), out=quiet)
    return whole, killed_and_resumed(tiny_recipe(tmp, 'killed'), ('float', 1, 10),
                                     ('qat', 2, 16))


def killed_and_resumed(path, *kills):
    """The results of the recipe at ``path`` run with a simulated kill at each (stage,
    epoch, step) of ``kills`` in turn, resumed after each."""
    for number, kill in enumerate(kills):
        with pytest.raises(trainer.StopRun):
            stages.run_recipe(path, resume=number > 0, callbacks=[stop_at(*kill)], out=quiet)
    return stages.run_recipe(path, resume=True, out=quiet)


def assert_same_parameters(whole, resumed):
    """Each stage's parameters of two runs bit-identical."""
    for name in ('float.params', 'ptq.params', 'qat.params'):
        ours = saved_params(os.path.join(resumed['folder'], name))
        theirs = saved_params(os.path.join(whole['folder'], name))
        assert ours.keys() == theirs.keys()
        for key in ours:  # the same arithmetic on the same batches: bit-exact
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{name}: {key}")


def test_resume_after_kill_ends_exactly_like_an_uninterrupted_run(runs):
    whole, resumed = runs
    assert_same_parameters(whole, resumed)
    assert history(resumed['folder']) == history(whole['folder'])
    assert {k: v for k, v in resumed.items() if k not in ('folder', 'table')} == \
        {k: v for k, v in whole.items() if k not in ('folder', 'table')}


def test_run_folder_holds_resolved_recipe_state_and_metrics(runs):
    whole, _ = runs
    folder = whole['folder']
    recipe = load_recipe(os.path.join(folder, 'recipe.yaml'))  # the resolved recipe reloads
    assert recipe['qat']['epochs'] == 3 and recipe['run']['name'] == 'whole'
    with open(os.path.join(folder, 'state.json')) as f:
        state = json.load(f)
    assert state['format_version'] == runfolder.FORMAT_VERSION
    assert state['done'] == list(stages.STAGES)
    records, results = history(folder)
    assert [(r['stage'], r['epoch']) for r in records] == \
        [('float', 1), ('float', 2), ('qat', 1), ('qat', 2), ('qat', 3)]
    assert set(results['ptq']) == {'W8A8', 'W4A4'}
    assert results['float'] > 50  # the tiny net learns the digits
    assert '| W8A8 | QAT 3 epochs (simulated) |' in whole['table']
    # nothing half-written is left behind, and finished stages drop their checkpoints
    leftovers = [n for _, _, files in os.walk(folder) for n in files if n.startswith('.tmp')]
    assert not leftovers
    assert not os.listdir(os.path.join(folder, 'qat'))


def test_qat_schedule_switched_modes_and_final_net_is_frozen(runs):
    whole, _ = runs
    params = saved_params(os.path.join(whole['folder'], 'qat.params'))
    modes = [v for k, v in params.items() if k.endswith('qmode')]
    assert modes
    from qat.nn import MODE_FLAGS
    for mode in modes:
        flags = dict(zip(MODE_FLAGS, mode > 0.5))
        assert flags['quantize'] and flags['quantize_input']
        assert flags['bn_frozen'] and flags['ranges_frozen']


def test_tensorboard_scalars_read_back_and_resume_leaves_no_duplicates(runs):
    whole, resumed = runs
    ours, theirs = scalars(resumed['folder']), scalars(whole['folder'])
    for tag in ('float/loss', 'float/lr', 'float/accuracy', 'qat/loss', 'qat/lr',
                'qat/accuracy', 'ptq/accuracy_W8A8', 'qat/final_accuracy'):
        assert tag in ours, sorted(ours)
    steps = [s for s, _ in ours['qat/loss']]
    assert steps == sorted(set(steps))  # the killed run's later events were dropped
    for tag in theirs:
        assert [s for s, _ in ours[tag]] == [s for s, _ in theirs[tag]], tag
        np.testing.assert_allclose([v for _, v in ours[tag]], [v for _, v in theirs[tag]],
                                   rtol=0, atol=0, err_msg=tag)
    # per layer, once per epoch: input range, weight scale, fraction of clipped inputs
    for kind in ('input_range', 'weight_scale', 'clipped'):
        tags = [t for t in ours if t.startswith(f'qat/{kind}/')]
        assert len(tags) == 3, (kind, sorted(ours))  # two convs and the dense layer
        for tag in tags:
            assert len(ours[tag]) == 3
    clipped = [v for t in ours if t.startswith('qat/clipped/') for _, v in ours[t]]
    assert all(0 <= v < 0.5 for v in clipped)
    lrs = [v for _, v in ours['float/lr']]
    assert lrs[0] < lrs[5]  # warm-up
    assert ours['qat/lr'][-1][1] < 0.02 * 0.1  # cosine decays to ~0


def test_existing_run_needs_resume_and_the_same_recipe(runs, tmp_path):
    whole, _ = runs
    path = os.path.join(os.path.dirname(whole['folder']), '..', 'whole.yaml')
    with pytest.raises(FileExistsError, match='--resume'):
        stages.run_recipe(path, out=quiet)
    with pytest.raises(ValueError, match=r'changed: qat\.lr'):
        stages.run_recipe(path, ['qat.lr=0.5'], resume=True, out=quiet)
    again = stages.run_recipe(path, resume=True, out=quiet)  # all done: just the results
    assert again['qat'] == whole['qat']


# ----- devices -------------------------------------------------------------------------------
def test_two_devices_train_like_one(tmp_path):
    """The batch split over cpu(0) and cpu(1), gradients summed through the kvstore, the range
    trackers made one (max) after every step. Without BatchNorm (whose batch statistics depend
    on how the batch is split) the result is the one-device result up to float summation order.
    Few steps, since a rounding flip in fake quantization would amplify a last-bit
    difference."""
    common = {'batch_size': 32, 'checkpoint_steps': 0}
    # EMA ranges and calibration: the trackers are what devices must agree on, and a range
    # that moves continuously with the weights; learned (LSQ) ranges are parameters like the
    # weights but amplify a last-bit difference within a few steps, and an MSE range can
    # step by one histogram bin
    sections = dict(model={'kwargs': {'bn': False}}, data={'val_fraction': 0.9},
                    float={'epochs': 1}, qat={'epochs': 2, 'input_quant_epoch': 0,
                                              'freeze_bn_epoch': None,
                                              'freeze_ranges_epoch': None},
                    calibrate={'report_bits': [], 'method': 'ema'},
                    quantize={'range_tracker': 'ema'})
    one = stages.run_recipe(tiny_recipe(tmp_path, 'one', run=dict(common), **sections),
                           out=quiet)
    two = stages.run_recipe(tiny_recipe(tmp_path, 'two', run=dict(
        common, devices=['cpu(0)', 'cpu(1)']), **sections), out=quiet)
    ours = saved_params(os.path.join(two['folder'], 'qat.params'))
    theirs = saved_params(os.path.join(one['folder'], 'qat.params'))
    ranges = [k for k in ours if k.endswith('range_ema')]
    assert len(ranges) == 3
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-5,
                                   err_msg=key)
    assert abs(two['qat'] - one['qat']) <= 0.5


def test_sync_state_takes_max_of_trackers_and_mean_of_bn_stats(tmp_path):
    recipe = load_recipe(tiny_recipe(tmp_path, 'sync', run={'devices': ['cpu(0)', 'cpu(1)']}))
    run = stages.Run(recipe, out=quiet)
    net = tiny_net()
    net.initialize(ctx=run.devices.contexts)
    net(mx.nd.zeros((2, 3, 8, 8), ctx=mx.cpu(0)))
    convert_model(net, config=stages.quant_scheme(recipe['quantize']))
    tracker = [p for p in net.collect_params().values() if p.name.endswith('range_ema')][0]
    mean = [p for p in net.collect_params().values() if p.name.endswith('running_mean')][0]
    tracker.list_data()[0][:] = mx.nd.array([0.5, 0.2])
    tracker.list_data()[1][:] = mx.nd.array([0.7, 0.2])
    mean.list_data()[0][:] = 1.0
    mean.list_data()[1][:] = 3.0
    run.devices.sync_state(net)
    for copy in tracker.list_data():
        np.testing.assert_array_equal(copy.asnumpy(), np.float32([0.7, 0.2]))
    for copy in mean.list_data():
        np.testing.assert_array_equal(copy.asnumpy(), np.full(mean.shape, 2.0))


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


WORKER = """
import sys
import mxnet as mx
from qat.app import stages, trainer

def save_final(stage, epoch, step, net):
    if stage == 'qat' and epoch == 0 and step == int(sys.argv[3]):
        net.save_parameters(sys.argv[2])
        raise trainer.StopRun('enough')

try:
    stages.run_recipe(sys.argv[1], callbacks=[save_final], out=lambda *a: None)
except trainer.StopRun:
    pass
"""


def dist_sync_workers(tmp_path, path, step):
    """The parameters of two workers (a scheduler and one server beside them, on loopback,
    DMLC_* variables) running the recipe at ``path``, each on its shard, saved after
    ``step`` steps of QAT."""
    env = dict(os.environ, DMLC_PS_ROOT_URI='127.0.0.1', DMLC_PS_ROOT_PORT=str(_free_port()),
               DMLC_NUM_SERVER='1', DMLC_NUM_WORKER='2', OMP_NUM_THREADS='1',
               PYTHONPATH=ROOT)
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, '-c', 'import mxnet'], cwd=ROOT,
                              env=dict(env, DMLC_ROLE=role)) for role in ('scheduler', 'server')]
    outputs = [str(tmp_path / f'worker{i}.params') for i in range(2)]
    workers = [subprocess.Popen([sys.executable, str(script), path, out, str(step)], cwd=ROOT,
                                env=dict(env, DMLC_ROLE='worker'),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for out in outputs]
    try:
        deadline = time.time() + 300
        for worker in workers:
            log, _ = worker.communicate(timeout=max(1, deadline - time.time()))
            assert worker.returncode == 0, log.decode()[-3000:]
        for proc in procs:
            proc.wait(timeout=60)
    finally:
        for proc in procs + workers:
            if proc.poll() is None:
                proc.kill()
    return [saved_params(p) for p in outputs]


def assert_workers_agree(first, second):
    assert first.keys() == second.keys()
    assert any(k.endswith('range_ema') for k in first)
    for key in first:
        np.testing.assert_allclose(first[key], second[key], rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.slow
def test_dist_sync_workers_agree(tmp_path):
    """Two dist_sync workers, each training on its shard: after the steps their parameters
    (weights, BN statistics, ranges) are the same."""
    path = tiny_recipe(tmp_path, 'dist', run={'kvstore': 'dist_sync', 'checkpoint_steps': 0,
                                              'tensorboard': False},
                       float={'epochs': 1}, qat={'epochs': 1, 'input_quant_epoch': 0,
                                                 'freeze_bn_epoch': None,
                                                 'freeze_ranges_epoch': None})
    assert_workers_agree(*dist_sync_workers(tmp_path, path, 4))


def test_recipe_chooses_its_calibration_method(tmp_path):
    """``calibrate.choose_from``: the PTQ stage scores each method on the calibration
    batches, keeps the best for the whole run (QAT's recalibration too), and the run then
    equals one with that ``method``."""
    sections = dict(float={'epochs': 1}, qat={'epochs': 2, 'input_quant_epoch': 1,
                                              'freeze_bn_epoch': None,
                                              'freeze_ranges_epoch': None},
                    quantize={'weight_bits': 3, 'input_bits': 3})
    lines = []
    chosen = stages.run_recipe(tiny_recipe(
        tmp_path, 'chosen', calibrate={'batches': 2, 'report_bits': [4],
                                       'choose_from': ['max', 'percentile', 'mse']},
        **sections), out=lines.append)
    method = chosen['calibration_method']
    table = next(line for line in lines if 'calibration method chosen by' in line)
    scores = {row.split('|')[1].strip(): float(row.split('|')[2])
              for row in table.splitlines()[3:]}
    assert sorted(scores) == ['max', 'mse', 'percentile']
    assert method == max(scores, key=lambda m: (scores[m], -['max', 'percentile',
                                                             'mse'].index(m)))
    assert 'top-1 accuracy' in table
    plain = stages.run_recipe(tiny_recipe(
        tmp_path, 'plain', calibrate={'batches': 2, 'report_bits': [4], 'method': method},
        **sections), out=quiet)
    assert (chosen['ptq'], chosen['qat']) == (plain['ptq'], plain['qat'])
    assert_same_parameters(chosen, plain)


# ----- learning rate -------------------------------------------------------------------------
def test_learning_rate_schedules():
    stage = {'lr': 0.1, 'epochs': 10, 'warmup_epochs': 2, 'schedule': 'step',
             'milestones': [5, 8], 'factor': 0.1}
    assert trainer.learning_rate(stage, 1.0) == pytest.approx(0.05)  # half way through warm-up
    assert trainer.learning_rate(stage, 4.9) == pytest.approx(0.1)
    assert trainer.learning_rate(stage, 5.0) == pytest.approx(0.01)
    assert trainer.learning_rate(stage, 9.0) == pytest.approx(0.001)
    cosine = dict(stage, schedule='cosine', warmup_epochs=0)
    assert trainer.learning_rate(cosine, 0) == pytest.approx(0.1)
    assert trainer.learning_rate(cosine, 5) == pytest.approx(0.05)
    assert trainer.learning_rate(dict(stage, schedule='constant', warmup_epochs=0), 7) == 0.1


# ----- data ----------------------------------------------------------------------------------
def section(**values):
    return dict({'source': 'digits', 'root': '', 'train': 'train', 'val': 'val',
                 'val_fraction': 0.2, 'workers': 0, 'flip': False, 'pad_crop': 0}, **values)


def test_image_folder_loads_classes_and_rgb_pixels(image_folder):
    root, rgb = image_folder
    train_set = data.open_split(section(source='folder', root=str(root)), 'train')
    val_set = data.open_split(section(source='folder', root=str(root)), 'val')
    assert (len(train_set), len(val_set)) == (8, 6)
    for i, path in enumerate(train_set.paths):
        image, label = train_set.item(i)
        assert label == (0 if '/cat/' in path else 1)
        if path in rgb:  # PNG is lossless: exactly the RGB pixels written
            np.testing.assert_array_equal(image, rgb[path][0])
    assert sorted(set(val_set.labels)) == [0, 1]


def test_image_folder_errors_name_the_problem(tmp_path):
    (tmp_path / 'train').mkdir()
    (tmp_path / 'val').mkdir()
    with pytest.raises(ValueError, match='no class subfolders'):
        data.open_split(section(source='folder', root=str(tmp_path)), 'train')
    (tmp_path / 'train' / 'cat').mkdir()
    with pytest.raises(ValueError, match=r'data.train: no images .* in the class subfolders'):
        data.open_split(section(source='folder', root=str(tmp_path)), 'train')
    with pytest.raises(FileNotFoundError, match='data.train: folder not found'):
        data.open_split(section(source='folder', root=str(tmp_path / 'nope')), 'train')
    (tmp_path / 'val' / 'bird').mkdir()
    with pytest.raises(ValueError, match=r"classes \['bird'\]"):
        data.open_split(section(source='folder', root=str(tmp_path)), 'val')


def test_list_file(image_folder):
    root, rgb = image_folder
    lines = [f"{os.path.relpath(p, root)} {label}" for p, (_, label) in sorted(rgb.items())]
    (root / 'train.txt').write_text('# path label\n' + '\n'.join(lines) + '\n\n')
    (root / 'val.txt').write_text(lines[0] + '\n')
    lists = section(source='list', root=str(root), train='train.txt', val='val.txt')
    dataset = data.open_split(lists, 'train')
    assert len(dataset) == len(rgb)
    for i, path in enumerate(dataset.paths):
        image, label = dataset.item(i)
        np.testing.assert_array_equal(image, rgb[path][0])
        assert label == rgb[path][1]
    (root / 'val.txt').write_text('just-a-path\n')
    with pytest.raises(ValueError, match=r"val.txt:1: expected 'path label'"):
        data.open_split(lists, 'val')


def test_recordio(tmp_path):
    images = [random_image(9, 11, i) for i in range(5)]
    for split in ('train', 'val'):
        record = mx.recordio.MXIndexedRecordIO(str(tmp_path / f'{split}.idx'),
                                               str(tmp_path / f'{split}.rec'), 'w')
        for i, img in enumerate(images):
            header = mx.recordio.IRHeader(0, float(i % 3), i, 0)
            record.write_idx(i, mx.recordio.pack_img(header, img[:, :, ::-1], img_fmt='.png'))
        record.close()
    dataset = data.open_split(section(source='recordio', root=str(tmp_path),
                                      train='train.rec', val='val.rec'), 'train')
    assert len(dataset) == 5
    for i, img in enumerate(images):
        image, label = dataset.item(i)
        np.testing.assert_array_equal(image, img)
        assert label == i % 3


def test_cifar10_from_the_binary_files_on_disk(tmp_path, monkeypatch):
    """MXNet's CIFAR10 reads data_batch_*.bin / test_batch.bin (a label byte, then 3x32x32
    bytes, channel-major); these are tiny stand-ins, so its checksum test is bypassed."""
    from mxnet.gluon.data.vision import datasets
    monkeypatch.setattr(datasets, 'check_sha1', lambda *a: True)
    rs = np.random.RandomState(0)
    chw = {}
    for name in data.CIFAR10_FILES:
        records = rs.randint(0, 256, (2, 3073)).astype(np.uint8)
        records[:, 0] = rs.randint(0, 10, 2)
        records.tofile(str(tmp_path / name))
        chw[name] = records
    train_set = data.open_split(section(source='cifar10', root=str(tmp_path)), 'train')
    val_set = data.open_split(section(source='cifar10', root=str(tmp_path)), 'val')
    assert (len(train_set), len(val_set)) == (10, 2)
    image, label = val_set.item(1)
    expected = chw['test_batch.bin'][1]
    assert label == expected[0]
    np.testing.assert_array_equal(image, expected[1:].reshape(3, 32, 32).transpose(1, 2, 0))


def test_digits_arrays_are_the_digits_source_preprocessed():
    pre = data.Preprocess(size=(16, 16), mean=(127.5,) * 3, std=(127.5,) * 3)
    (_, y_train), (x_test, y_test) = data.digits(size=16)
    val = data.open_split(section(), 'val')
    assert len(val) == len(y_test) and len(data.open_split(section(), 'train')) == len(y_train)
    x, y = next(data.iterate(val, pre, len(val)))
    np.testing.assert_array_equal(y.asnumpy(), y_test)
    # one preprocessing path: the arrays are the recipe's preprocessed images, exactly
    np.testing.assert_array_equal(x.asnumpy(), x_test)


def test_preprocess_is_ncnns_formula():
    """(x - mean) * norm per channel, after a resize and the pixel-order swap."""
    rgb = random_image(4, 6, 1).astype(np.float32)
    pre = data.Preprocess(size=(4, 6), mean=(10, 20, 30), std=(2, 4, 8), pixel='BGR')
    out = pre([rgb])[0]
    bgr = rgb[:, :, ::-1]
    for c, (m, s) in enumerate(zip((10, 20, 30), (2, 4, 8))):
        np.testing.assert_array_equal(out[c], (bgr[:, :, c] - np.float32(m)) * np.float32(1 / s))
    assert pre.ncnn() == {'pixel': 'BGR', 'height': 4, 'width': 6, 'mean': [10, 20, 30],
                          'norm': [0.5, 0.25, 0.125]}
    gray = data.Preprocess(size=(2, 3), channels=1, mean=(0,), std=(1,))
    assert gray([rgb]).shape == (1, 1, 2, 3)


def test_epoch_order_and_iterate_resume_midway():
    assert np.array_equal(data.epoch_order(50, 1, 3), data.epoch_order(50, 1, 3))
    assert not np.array_equal(data.epoch_order(50, 1, 3), data.epoch_order(50, 1, 4))
    dataset = data.ArraySet(np.random.RandomState(0).rand(23, 5, 5, 3) * 255, np.arange(23),
                            'random')
    pre = data.Preprocess(size=(5, 5))
    augment = data.Augment(flip=True, pad_crop=1)
    order = data.epoch_order(23, 0, 0)
    full = [(x.asnumpy(), y.asnumpy()) for x, y in data.iterate(
        dataset, pre, 5, order=order, augment=augment, augment_seed=(0, 0))]
    tail = [(x.asnumpy(), y.asnumpy()) for x, y in data.iterate(
        dataset, pre, 5, order=order, start=2, augment=augment, augment_seed=(0, 0),
        workers=2)]
    assert [len(y) for _, y in full] == [5, 5, 5, 5, 3]
    for (xa, ya), (xb, yb) in zip(full[2:], tail):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    plain = next(data.iterate(dataset, pre, 5, order=order))[0].asnumpy()
    assert not np.array_equal(plain, full[0][0])  # the augmentation did something


# ----- export and verify (qat.deploy) ---------------------------------------------------------
def test_export_and_verify_stages_run_ncnn(tmp_path):
    pytest.importorskip('qat.deploy.verify')
    pytest.importorskip('ncnn')
    result = stages.run_recipe(tiny_recipe(
        tmp_path, 'export', float={'epochs': 1}, qat={'epochs': 1, 'input_quant_epoch': 0,
                                                      'freeze_bn_epoch': None,
                                                      'freeze_ranges_epoch': None},
        export={'enabled': True, 'name': 'tiny'}, verify={'samples': 64}), out=quiet)
    folder = os.path.join(result['folder'], 'export')
    assert os.path.isfile(os.path.join(folder, 'tiny-int8.param'))
    with open(os.path.join(folder, 'preprocess.json')) as f:
        text = f.read()
    values = json.loads(text)
    # the same float32 norm, written short: ncnn's tools read at most 19 characters a number
    assert values == {'pixel': 'RGB', 'height': 8, 'width': 8,
                      'mean': [127.5] * 3, 'norm': [0.007843138] * 3}
    assert np.float32(values['norm'][0]) == np.float32(1 / 127.5)
    assert '0.007843137718737125' not in text
    with open(os.path.join(result['folder'], 'verify.json')) as f:
        report = json.load(f)
    assert report['samples'] == 64
    assert result['verify_passed'] is report['passed'] is True
    assert result['ncnn'] == pytest.approx(100 * report['accuracy']['ncnn_int8'])
    assert '| W8A8 | ncnn int8 (measured) |' in result['table']


@pytest.mark.slow
def test_digits_recipe_end_to_end(tmp_path):
    """The main job: float, PTQ W8A8 / W4A4, QAT W8A8, ncnn int8 export, verified."""
    pytest.importorskip('qat.deploy.verify')
    result = stages.run_recipe(os.path.join(ROOT, 'recipes', 'digits.yaml'),
                              [f'run.out={tmp_path}'], out=quiet)
    assert result['float'] > 95
    assert result['ptq']['W8A8'] >= result['float'] - 1
    assert result['ptq']['W4A4'] >= result['float'] - 3
    assert result['qat'] >= result['float'] - 1
    assert result['verify_passed']
    assert abs(result['ncnn'] - result['qat']) <= 0.6  # at most 2 of 359 images differ


def test_layer_stats_report_the_weight_scales_the_net_quantizes_with():
    """The logged mean weight scale follows weight_threshold_factor (set by EasyQuant)."""
    import mxnet as mx
    import qat
    net = tiny_net()
    net.initialize()
    x = mx.nd.random.normal(shape=(4, 3, 8, 8))
    net(x)
    qat.convert_model(net)
    qat.calibrate(net, [x])
    before = layer_stats(net, x)
    block = qat.quant_blocks(net)[0][1]
    block.weight_threshold_factor.set_data(mx.nd.ones(block.weight_threshold_factor.shape) * 2)
    after = layer_stats(net, x)
    key = f'weight_scale/{block.name}'
    assert abs(after[key] - before[key] / 2) <= 1e-6 * before[key]


def test_run_folder_holds_the_summary_and_the_curves(runs):
    """summary.md: the final table and one row per epoch; curves.png: a real PNG. The killed
    and resumed run writes the same summary (its history is the uninterrupted one's)."""
    whole, resumed = runs
    text = open(os.path.join(whole['folder'], 'summary.md')).read()
    assert whole['table'] in text
    records, _ = history(whole['folder'])
    epoch_rows = [line for line in text.splitlines()
                  if line.startswith(('| float |', '| qat |'))]
    assert len(epoch_rows) == len(records) == 5
    with open(os.path.join(whole['folder'], 'curves.png'), 'rb') as handle:
        assert handle.read(8) == b'\x89PNG\r\n\x1a\n'
    again = open(os.path.join(resumed['folder'], 'summary.md')).read()
    rows = [line.rsplit('|', 2)[0] for line in again.splitlines()    # seconds differ
            if line.startswith(('| float |', '| qat |', '| W'))]
    assert rows == [line.rsplit('|', 2)[0] for line in text.splitlines()
                    if line.startswith(('| float |', '| qat |', '| W'))]
