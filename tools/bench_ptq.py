"""Post-training quantization on digits: accuracy per calibration method and bit width,
automatic mixed precision at W4A4, and KL calibration throughput (qat.ptq_benchmark).

    python tools/bench_ptq.py [--model cifar_resnet20_v1] [--size 16] [--epochs 10] [--seed 0]
"""
import argparse

from qat.ptq_benchmark import report

parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
parser.add_argument('--model', default='cifar_resnet20_v1', help='GluonCV model name')
parser.add_argument('--size', type=int, default=16, help='input size (pixels)')
parser.add_argument('--epochs', type=int, default=10, help='float training epochs')
parser.add_argument('--seed', type=int, default=0)
args = parser.parse_args()
report(args.model, args.size, args.epochs, args.seed, out=lambda line: print(line, flush=True))
