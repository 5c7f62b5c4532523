"""Interleaved median timing: each variant timed in turn, round after round, so that machine
noise hits all of them alike (the benchmarks and latency-aware export use it)."""
import statistics
import time


def stopwatch(function, *args):
    """A function that calls ``function(*args)`` and returns the seconds it took."""
    def run():
        start = time.perf_counter()
        function(*args)
        return time.perf_counter() - start
    return run


def interleaved_times(runs, rounds, warmup=1):
    """{key: [seconds of each round]} of ``runs`` ({key: function() -> the seconds it
    measured}): ``warmup`` untimed rounds, then ``rounds`` rounds calling every function once
    in turn."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            times[key].append(run())
    return times


def interleaved_medians(runs, rounds, warmup=1):
    """{key: median seconds} of ``interleaved_times``."""
    return {key: statistics.median(values)
            for key, values in interleaved_times(runs, rounds, warmup).items()}
