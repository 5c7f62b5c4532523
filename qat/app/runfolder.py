"""The run folder: ``state.json`` (the commit point), the checkpoints it names, each stage's
parameters, and the saved recipe.

``state.json`` (format version, stage, epoch, step, history, results) is written atomically
after the files it names (``<stage>/e<epoch>-s<step>.params`` with the quantization modes and
configs, ``.states`` with the optimizer state), so a killed run resumes from the last commit.
Only rank 0 writes; the others read what it wrote.
"""
import os

import yaml

from ..convert import load_parameters, save_parameters
from ..fileio import atomic_path, read_json, write_json
from .recipe import dump as dump_recipe

FORMAT_VERSION = 1


class RunFolder:
    """``<run.out>/<run.name>/`` of one run; ``rank`` 0 writes, ``barrier()`` waits for the
    other workers."""

    def __init__(self, folder, rank=0, barrier=lambda: None):
        self.folder, self.rank, self.barrier = folder, rank, barrier
        self.state = None

    def path(self, *parts):
        return os.path.join(self.folder, *parts)

    def start(self, recipe, resume):
        """The state to continue from: a fresh one (the recipe saved), or with ``resume`` the
        last commit (the recipe must be the saved one)."""
        state_file = self.path('state.json')
        if os.path.exists(state_file) and not resume:
            raise FileExistsError(f"{self.folder} already holds a run: continue it with "
                                  f"--resume, or choose another run.name (--set run.name=...)")
        if resume and os.path.exists(state_file):
            state = read_json(state_file)
            if state.get('format_version') != FORMAT_VERSION:
                raise ValueError(f"{state_file}: checkpoint format "
                                 f"{state.get('format_version')}, this version reads "
                                 f"{FORMAT_VERSION}")
            with open(self.path('recipe.yaml')) as f:
                saved = yaml.safe_load(f)
            changed = [f"{s}.{k}" for s in saved for k in saved[s]
                       if recipe.get(s, {}).get(k) != saved[s][k]]
            if changed:
                raise ValueError(f"{self.path('recipe.yaml')}: --resume with a different "
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
