"""Training-step time of converted vs float nets (issue 2 benchmark). Prints a Markdown table."""
import argparse

from qat.benchmarks import format_table, train_step_times

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument('--model', default='cifar_resnet20_v1')
parser.add_argument('--batch-size', type=int, default=64)
parser.add_argument('--size', type=int, default=32)
parser.add_argument('--rounds', type=int, default=15)
args = parser.parse_args()
times = train_step_times(args.model, args.batch_size, args.size, args.rounds)
base = times['float']
print(format_table([(name, f"{t * 1000:.1f}", f"{t / base:.2f}x") for name, t in times.items()],
                   [f"{args.model}, batch {args.batch_size}, {args.size}x{args.size}",
                    'median step (ms)', 'vs float']))
