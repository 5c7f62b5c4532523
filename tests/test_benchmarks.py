"""Every benchmark module runs as ``python -m benchmarks.<name> --help`` from the repository
root (imports resolve, the parser is built) and its help lists the module's options."""
import os
import pkgutil
import subprocess
import sys

import benchmarks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# benchmark module -> the options its help must mention
OPTIONS = {
    'train_step': ['--model', '--batch-size', '--size', '--rounds'],
    'accuracy': ['--seeds', '--bits', '--out', '--set'],
    'narrow': ['--nets', '--seeds', '--bits', '--variants', '--out'],
    'ptq': ['--model', '--size', '--epochs', '--seed'],
    'deploy': ['--repeats', '--threads', '--models'],
    'agreement': ['--samples', '--models'],
    'winograd': ['--rounds'],
    'zoo': ['--families', '--samples', '--repeats'],
    'latency': ['--rounds', '--threads', '--models'],
    'memory': ['--repeats', '--threads', '--models', '--train-model', '--batch'],
    'calibration': ['--model', '--images', '--methods', '--rounds', '--threads', '--scaling'],
    'detection': ['--recipes', '--sizes', '--out', '--repeats', '--threads', '--set'],
    'detection_ptq': ['--recipe', '--bits', '--budget', '--methods', '--out'],
}
HELPERS = {'common'}


def test_every_benchmark_module_is_checked():
    modules = {info.name for info in pkgutil.iter_modules(benchmarks.__path__)}
    assert modules - HELPERS == set(OPTIONS)


def test_benchmark_help():
    # all at once: each start imports mxnet (about 2 s)
    processes = {name: subprocess.Popen([sys.executable, '-m', f'benchmarks.{name}', '--help'],
                                        cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                 for name in OPTIONS}
    for name, process in processes.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"benchmarks.{name} --help failed:\n{err}"
        assert f"python -m benchmarks.{name}" in out
        for option in OPTIONS[name]:
            assert option in out, f"benchmarks.{name} --help does not mention {option}"
        assert f"python -m benchmarks.{name}" in benchmarks.__doc__, \
            f"benchmarks/__init__.py does not list {name}"
