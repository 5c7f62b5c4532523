"""The run folder: ``state.json`` (the commit point), the checkpoints it names, each stage's
parameters, and the saved recipe.

``state.json`` (format version, stage, epoch, step, history, results) is written atomically
after the files it names (``<stage>/e<epoch>-s<step>.params`` with the quantization modes and
configs, ``.states`` with the optimizer state), so a killed run resumes from the last commit.
Only rank 0 writes; the others read what it wrote.
"""
import logging
import os
import socket

import yaml

from ..convert import load_parameters, save_parameters
from ..errors import BusyError, ExistsError, UserError
from ..fileio import atomic_path, read_json, write_json
from .recipe import dump as dump_recipe

FORMAT_VERSION = 1
LOCK = '.lock'

log = logging.getLogger(__name__)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class RunFolder:
    """``<run.out>/<run.name>/`` of one run; ``rank`` 0 writes, ``barrier()`` waits for the
    other workers."""

    def __init__(self, folder, rank=0, barrier=lambda: None):
        self.folder, self.rank, self.barrier = folder, rank, barrier
        self.state = None

    def path(self, *parts):
        return os.path.join(self.folder, *parts)

    # ----- the lock: one writer per run folder ------------------------------------------
    def lock(self):
        """Take the folder's lock (rank 0; the file ``.lock`` holds host and pid). Another
        live writer is a BusyError naming it; a lock left by a dead process is taken over."""
        if self.rank != 0:
            return
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as err:
            raise UserError(f"run.out: cannot create the run folder {self.folder}: "
                            f"{err.strerror or err}") from None
        for attempt in (1, 2):
            try:
                handle = os.open(self.path(LOCK), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None or attempt == 2:
                    raise BusyError(f"{self.folder} is being written by another run "
                                    f"({self._describe(holder)}, lock {self.path(LOCK)}); "
                                    f"wait for it, or choose another run.name") from None
                continue
            except OSError as err:
                raise UserError(f"run.out: cannot write into {self.folder}: "
                                f"{err.strerror or err}") from None
            with os.fdopen(handle, 'w') as f:
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
            self._locked = True
            return

    def _holder(self):
        """(host, pid) of a live lock holder other than this process; None after removing a
        stale lock (its process is gone)."""
        try:
            with open(self.path(LOCK)) as f:
                host, pid = f.read().split()
            pid = int(pid)
        except (OSError, ValueError):
            return ('?', '?')  # being written right now, or unreadable: treat as held
        if host == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
            if pid != os.getpid():
                log.warning("%s: taking over the lock of process %d, which is gone",
                            self.folder, pid)
            os.remove(self.path(LOCK))
            return None
        return host, pid

    @staticmethod
    def _describe(holder):
        return 'a process' if holder is None else f"process {holder[1]} on {holder[0]}"

    def unlock(self):
        if getattr(self, '_locked', False):
            self._locked = False
            if os.path.exists(self.path(LOCK)):
                os.remove(self.path(LOCK))

    def start(self, recipe, resume):
        """The state to continue from: a fresh one (the recipe saved), or with ``resume`` the
        last commit (the recipe must be the saved one)."""
        state_file = self.path('state.json')
        # rank 0 owns the folder: the other workers may find the state it just wrote
        if os.path.exists(state_file) and not resume and self.rank == 0:
            raise ExistsError(f"{self.folder} already holds a run: continue it with "
                              f"--resume, or choose another run.name (--set run.name=...)")
        if resume and os.path.exists(state_file):
            state = read_json(state_file)
            if state.get('format_version') != FORMAT_VERSION:
                raise UserError(f"{state_file}: checkpoint format "
                                 f"{state.get('format_version')}, this version reads "
                                 f"{FORMAT_VERSION}")
            try:
                with open(self.path('recipe.yaml')) as f:
                    saved = yaml.safe_load(f)
            except (OSError, yaml.YAMLError) as err:
                raise UserError(f"{self.path('recipe.yaml')}: the saved recipe cannot be "
                                f"read ({' '.join(str(err).split())})") from None
            if not isinstance(saved, dict):
                raise UserError(f"{self.path('recipe.yaml')}: the saved recipe is damaged")
            changed = [f"{s}.{k}" for s in saved for k in saved[s]
                       if recipe.get(s, {}).get(k) != saved[s][k]]
            if changed:
                raise UserError(f"{self.path('recipe.yaml')}: --resume with a different "
                                 f"recipe (changed: {', '.join(changed)}); resume with the "
                                 "same recipe and overrides")
            self.state = state
            return state
        self.state = {'format_version': FORMAT_VERSION, 'done': [], 'stage': None, 'epoch': 0,
                      'step': 0, 'epoch_loss': [0.0, 0], 'global_step': 0, 'files': {},
                      'history': [], 'results': {}}
        if self.rank == 0:
            os.makedirs(self.folder, exist_ok=True)
            dump_recipe(recipe, self.path('recipe.yaml'))
        self.commit()  # the folder always holds a state: --resume starts from here
        return self.state

    def commit(self, **changes):
        """Update the state and write state.json (the commit point), then metrics.json."""
        self.state.update(changes)
        if self.rank != 0:
            return
        write_json(self.path('state.json'), self.state)
        write_json(self.path('metrics.json'), {
            'format_version': FORMAT_VERSION, 'history': self.state['history'],
            'results': self.state['results']})

    def checkpoint(self, stage, net, trainer, epoch, step, epoch_loss):
        """Write the parameters (with modes and configs) and optimizer state of ``stage`` at
        (epoch, step), commit (with the epoch's running loss), then remove the previous
        checkpoint files."""
        old = dict(self.state['files'])
        files = {'params': f"{stage}/e{epoch:04d}-s{step:06d}.params",
                 'states': f"{stage}/e{epoch:04d}-s{step:06d}.states"}
        if self.rank == 0:
            os.makedirs(self.path(stage), exist_ok=True)
            save_parameters(net, self.path(files['params']))
            with atomic_path(self.path(files['states'])) as tmp:
                trainer.save_states(tmp)
        self.commit(stage=stage, epoch=epoch, step=step, files=files,
                    epoch_loss=list(epoch_loss))
        self._remove(name for name in old.values() if name not in files.values())

    def resume(self, stage, net, trainer, contexts):
        """(epoch, step, loss sum, samples) of ``stage``'s last checkpoint, loaded into ``net``
        and ``trainer``; None when the stage has none."""
        if self.state['stage'] != stage:
            return None
        load_parameters(net, self.path(self.state['files']['params']), ctx=contexts)
        trainer.load_states(self.path(self.state['files']['states']))
        total, seen = self.state['epoch_loss']
        return self.state['epoch'], self.state['step'], total, seen

    def save(self, net, name):
        """Save ``net`` as ``name`` (rank 0), which every worker reads next."""
        if self.rank == 0:
            save_parameters(net, self.path(name))
        self.barrier()

    def finish_stage(self, stage, **results):
        """Record the stage's results as done; its last checkpoint is no longer needed."""
        old = list(self.state['files'].values())
        self.state['results'].update(results)
        self.commit(done=self.state['done'] + [stage], stage=None, epoch=0, step=0, files={})
        self._remove(old)

    def _remove(self, names):
        if self.rank == 0:
            for name in names:
                if os.path.exists(self.path(name)):
                    os.remove(self.path(name))
