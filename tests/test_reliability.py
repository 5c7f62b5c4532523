"""Nothing lost or half-written: the run-folder lock between two real processes, a run
killed inside the export resumed to the same files, a diverging run stopped with its last
good checkpoint, files that follow the umask."""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from qat.app import runfolder, stages
from qat.errors import BusyError, NonFiniteError
from qat.fileio import atomic_write
from tests.helpers import tiny_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')


def quiet(*args):
    pass


def _qat(*args, **kwargs):
    return subprocess.Popen([sys.executable, '-m', 'qat.cli', *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    """Two `qat train` of the same run folder, the second started while the first holds the
    lock: the second exits 2 naming the first's pid and changes nothing; the first finishes."""
    recipe = tiny_recipe(tmp_path, 'shared', float={'epochs': 3}, qat={'epochs': 3})
    folder = tmp_path / 'checkpoints' / 'shared'
    first = _qat('train', recipe)
    deadline = time.time() + 120
    while not (folder / runfolder.LOCK).exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    second = _qat('train', recipe, '--resume')
    out, err = second.communicate(timeout=120)
    assert second.returncode == 2, err
    assert f"process {first.pid}" in err and 'being written by another run' in err
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert not (folder / runfolder.LOCK).exists()        # released at the end
    assert json.loads((folder / 'state.json').read_text())['done'][-1] == 'verify'


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
    folder = tmp_path / 'run'
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (folder / runfolder.LOCK).write_text(f"{socket.gethostname()} {dead.pid}\n")
    taken = runfolder.RunFolder(str(folder))
    taken.lock()
    assert (folder / runfolder.LOCK).read_text().split()[1] == str(os.getpid())
    assert f"process {dead.pid}, which is gone" in caplog.text
    taken.unlock()
    assert not (folder / runfolder.LOCK).exists()
    (folder / runfolder.LOCK).write_text(f"{socket.gethostname()} 1\n")  # init: alive
    with pytest.raises(BusyError, match='process 1 on'):
        runfolder.RunFolder(str(folder)).lock()


KILL_IN_EXPORT = """
import importlib, os, signal, sys
from qat.app import stages
export_module = importlib.import_module('qat.deploy.export')  # the module, not the function
real = export_module.caffe.write_caffe

def write_then_die(graph, prototxt, caffemodel, name):
    real(graph, prototxt, caffemodel, name)   # the staging folder holds every file now
    os.kill(os.getpid(), signal.SIGKILL)

export_module.caffe.write_caffe = write_then_die
stages.run_recipe(sys.argv[1], out=lambda *a: None)
"""


def test_a_run_killed_inside_the_export_resumes_to_the_same_files(tmp_path):
    whole = stages.run_recipe(tiny_recipe(tmp_path, 'whole', export={'enabled': True}),
                              out=quiet)
    path = tiny_recipe(tmp_path, 'killed', export={'enabled': True})
    script = tmp_path / 'kill.py'
    script.write_text(KILL_IN_EXPORT)
    killed = subprocess.run([sys.executable, str(script), path], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    export = tmp_path / 'checkpoints' / 'killed' / 'export'
    assert glob.glob(str(export / '.export-*'))            # what the kill left behind
    assert not (export / 'model-int8.bin').exists()         # and nothing half-written
    resumed = stages.run_recipe(path, resume=True, out=quiet)
    assert not glob.glob(str(export / '.export-*'))        # cleaned by the later export
    for kind in ('param', 'bin', 'int8_param', 'int8_bin', 'table', 'manifest'):
        name = os.path.basename(whole['export'][kind])
        ours = (export / name).read_bytes()
        theirs = (tmp_path / 'checkpoints' / 'whole' / 'export' / name).read_bytes()
        assert ours == theirs, kind
    assert resumed['verify_passed'] is True
    # paths in state.json are relative to the run folder, so the folder can move
    assert resumed['export']['int8_bin'] == os.path.join('export', 'model-int8.bin')


def _poison_after(stage, epoch, step):
    """A callback that puts a NaN into the first weight after the given step (after the
    checkpoint the tiny recipe writes at step 7)."""
    def callback(at_stage, at_epoch, at_step, net):
        if (at_stage, at_epoch, at_step) == (stage, epoch, step):
            param = next(p for p in net.collect_params().values() if p.name.endswith('weight'))
            for array in param.list_data():
                array[:] = float('nan')
    return callback


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    path = tiny_recipe(tmp_path, 'nan')
    # the ReLU after the poisoned conv hides the NaN from the loss; the next checkpoint
    # (step 14) finds it in the parameters
    with pytest.raises(NonFiniteError, match=r"float epoch 1, step 14: parameter \S+conv0_weight "
                                             r"holds NaN"):
        stages.run_recipe(path, callbacks=[_poison_after('float', 0, 8)], out=quiet)
    folder = tmp_path / 'checkpoints' / 'nan'
    state = json.loads((folder / 'state.json').read_text())   # still the last commit
    assert (state['stage'], state['epoch'], state['step']) == ('float', 0, 7)
    assert not (folder / runfolder.LOCK).exists()
    for name in state['files'].values():
        assert (folder / name).exists()
    resumed = stages.run_recipe(path, resume=True, out=quiet)  # from the good checkpoint
    assert resumed['float'] > 10


def test_a_huge_learning_rate_stops_in_the_first_steps(tmp_path):
    path = tiny_recipe(tmp_path, 'huge', float={'lr': 1e12})
    with pytest.raises(NonFiniteError, match=r"float epoch 1, step \d+: the loss is "
                                             r"(nan|inf).*lower float.lr"):
        stages.run_recipe(path, out=quiet)
    state = json.loads((tmp_path / 'checkpoints' / 'huge' / 'state.json').read_text())
    assert state['done'] == []  # the run folder has its initial commit


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / 'a.txt'), 'x')
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / 'a.txt').st_mode & 0o777) == oct(0o644)
