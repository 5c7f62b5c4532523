"""ncnn int8 vs fp32 latency and size of exported GluonCV models, per Winograd policy.

    python tools/bench_deploy.py [--repeats 30] [--threads 1 2]
"""
import argparse

from qat.deploy.benchmark import MODELS, deploy_benchmark, format_deploy_table

parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
parser.add_argument('--repeats', type=int, default=30, help='timed runs per variant')
parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
parser.add_argument('--models', nargs='+', default=[f"{m}:{s}" for m, s in MODELS],
                    help='name:input_size')
args = parser.parse_args()
models = [(spec.split(':')[0], int(spec.split(':')[1])) for spec in args.models]
print(format_deploy_table(deploy_benchmark(models, args.threads, args.repeats)))
