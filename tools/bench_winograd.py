"""Which int8 3x3 s1 convs the Winograd bound proves safe, and the latency of the guards.

    python tools/bench_winograd.py [--rounds 20]

Random-initialized resnet18_v1 (224x224) and cifar_resnet20_v1 (32x32), exported to ncnn int8
with no guard ('unsafe'), 31=64 on every Winograd conv ('off'), and 31=64 where the bound
fails ('bound'); see ``qat.benchmarks.winograd_guard_report``.
"""
import argparse

from qat.benchmarks import format_table, winograd_guard_report

MODELS = (('resnet18_v1', 224), ('cifar_resnet20_v1', 32))
POLICIES = ('unsafe', 'off', 'bound')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=20)
    args = parser.parse_args()
    for model, size in MODELS:
        rows, times = winograd_guard_report(model, size, rounds=args.rounds)
        print(f"\n## {model} ({size}x{size}): Winograd convs proven safe")
        print(format_table(rows, ['layer', 'in', 'out', 'max |y| (8-bit)', 'safe 8-bit',
                            'safe 8-bit, ReLU input', 'safe 6-bit']))
        counts = [sum(row[i] for row in rows) for i in (4, 5, 6)]
        print(f"\nsafe / total: 8-bit {counts[0]}/{len(rows)}, 8-bit with ReLU inputs "
              f"{counts[1]}/{len(rows)}, 6-bit {counts[2]}/{len(rows)}")
        threads = sorted({n for _, n in times})
        print(f"\nmedian latency, ms ({args.rounds} interleaved rounds)")
        print(format_table([[policy] + ['%.2f' % times[policy, n] for n in threads]
                            for policy in POLICIES],
                           ['policy'] + [f'{n} thread(s)' for n in threads]))


if __name__ == '__main__':
    main()
