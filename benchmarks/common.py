"""What the benchmarks share: their command line, the GluonCV zoo of the deploy benchmarks,
and interleaved median timing (each variant timed in turn, round after round, so that
machine noise hits all of them alike)."""
import argparse
import statistics
import time

# (GluonCV name, input size) of the deploy and agreement benchmarks
ZOO = (('resnet18_v1', 224), ('mobilenet1.0', 224), ('mobilenetv2_1.0', 224),
       ('cifar_resnet20_v1', 32))


def parser(module, doc):
    """The argument parser of ``python -m <module>``, its help text the module docstring."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_models_option(arguments, default=ZOO):
    arguments.add_argument('--models', nargs='+', default=[f"{m}:{s}" for m, s in default],
                           help='name:input_size')


def parse_models(specs):
    """[(name, size)] of 'name:input_size' specs."""
    return [(spec.split(':')[0], int(spec.split(':')[1])) for spec in specs]


def stopwatch(function, *args):
    """A function that calls ``function(*args)`` and returns the seconds it took."""
    def run():
        start = time.perf_counter()
        function(*args)
        return time.perf_counter() - start
    return run


def interleaved_medians(runs, rounds, warmup=1):
    """{key: median seconds} of ``runs`` ({key: function() -> the seconds it measured}):
    ``warmup`` untimed rounds, then ``rounds`` rounds calling every function once in turn."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            times[key].append(run())
    return {key: statistics.median(values) for key, values in times.items()}
