"""ncnn vs simulation agreement of exported GluonCV models (random init, calibrated).

    python tools/bench_agreement.py [--samples 8]
"""
import argparse

from qat.deploy.benchmark import MODELS, format_agreement_table, zoo_agreement

parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
parser.add_argument('--samples', type=int, default=8, help='random images per model')
args = parser.parse_args()
print(format_agreement_table(zoo_agreement(MODELS, args.samples)))
