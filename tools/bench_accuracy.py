"""Float vs PTQ vs QAT accuracy on the bundled digits at W8A8 / W4A4 / W3A3 / W2A2 (mean over
three seeds), through the recipe trainer: ``python tools/bench_accuracy.py [--set key=value]``."""
import argparse

from qat.benchmarks import accuracy_table

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
parser.add_argument('--bits', type=int, nargs='+', default=[8, 4, 3, 2])
parser.add_argument('--out', default='checkpoints/bench-accuracy', help='run folders')
parser.add_argument('--set', dest='overrides', action='append', default=[],
                    metavar='KEY=VALUE', help='recipe override for every run')
args = parser.parse_args()
print(accuracy_table(args.seeds, args.bits, args.out, overrides=args.overrides)[1])
