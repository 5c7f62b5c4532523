"""What the benchmarks share: their command line, the GluonCV zoo of the deploy benchmarks,
and the interleaved median timing of ``qat.timing``."""
import argparse

# (the benchmarks use them)
from qat.timing import interleaved_medians, interleaved_times, stopwatch  # noqa: F401

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
