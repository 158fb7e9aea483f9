"""Where a traced generation's GPU time and GPU idle time go, from ``bench_pipelines.py --profile --trace T.json.gz``.

    python benchmarks/read_trace.py T_star-d30_b1.json.gz [--top 25] [--gap-us 5] [--depth 1] [--gaps 10]

Prints the GPU's busy and idle time over the generation's span, then:
  * kernel time by issuing line (the innermost ``--depth`` lines of this package on the issuing stack; a CUDA graph's
    kernels count for the line that replays the graph);
  * idle before a kernel (gaps longer than ``--gap-us``), charged to that kernel's issuing line;
  * the ``--gaps`` largest gaps, each with the kernels on either side and the calls of this package the host was in
    while the GPU waited (the innermost first, with how much of the gap each covers).
A profiled run's host is slower than an unprofiled one (more so with stacks), so idle time is an upper bound; the
ranking is what it is for.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict

NAME, START, END, LAUNCH, LINES = range(5)


def host_calls_during(frames: list, begin: float, end: float, count: int = 6) -> list[str]:
    """The calls of this package that overlap ``[begin, end]``, the innermost (shortest) of those covering most of it
    first."""
    overlapping = [
        (min(f[2], end) - max(f[1], begin), f[2] - f[1], f[0]) for f in frames if f[1] < end and f[2] > begin
    ]
    overlapping.sort(key=lambda item: (-round(item[0] / max(end - begin, 1e-9), 1), item[1]))
    return [f"{line} ({covered / 1e3:.2f} of {length / 1e3:.2f} ms)" for covered, length, line in overlapping[:count]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--gap-us", type=float, default=5.0, help="idle gaps shorter than this are launch latency")
    parser.add_argument("--depth", type=int, default=1, help="how many lines of the issuing stack make a key")
    parser.add_argument("--gaps", type=int, default=10, help="the largest gaps to show with the host's calls")
    args = parser.parse_args()
    with gzip.open(args.trace, "rt") as file:
        trace = json.load(file)
    if isinstance(trace, list):  # session 33's first traces: kernels only
        trace = {"kernels": trace, "frames": []}
    kernels = sorted(trace["kernels"], key=lambda row: row[START])
    if not kernels:
        print("no GPU events in the trace")
        return 1
    busy_us, idle_us, gaps = defaultdict(float), defaultdict(float), defaultdict(int)
    covered, short_gaps, largest = kernels[0][START], 0.0, []
    for previous, kernel in zip([None] + kernels[:-1], kernels):
        line = " <- ".join(kernel[LINES][: args.depth]) or "(no line of this package)"
        busy_us[line] += kernel[END] - kernel[START]
        gap = kernel[START] - covered
        if gap > args.gap_us:
            idle_us[line] += gap
            gaps[line] += 1
            largest.append((gap, covered, previous[NAME], kernel[NAME]))
        elif gap > 0:
            short_gaps += gap
        covered = max(covered, kernel[END])
    origin, span = kernels[0][START], kernels[-1][END] - kernels[0][START]
    print(
        f"{len(kernels)} kernels in a {span / 1e3:.2f} ms span: {sum(busy_us.values()) / 1e3:.2f} ms of kernels, "
        f"{sum(idle_us.values()) / 1e3:.2f} ms idle in {sum(gaps.values())} gaps over {args.gap_us:g} us, "
        f"{short_gaps / 1e3:.2f} ms in shorter ones"
    )
    print("\nkernel time by issuing line (ms):")
    for line, us in sorted(busy_us.items(), key=lambda item: -item[1])[: args.top]:
        print(f"  {us / 1e3:8.2f}  {line}")
    print("\nidle before a kernel, by its issuing line (ms idle, gaps):")
    for line, us in sorted(idle_us.items(), key=lambda item: -item[1])[: args.top]:
        print(f"  {us / 1e3:8.2f} {gaps[line]:6d}  {line}")
    print(f"\nthe {args.gaps} largest gaps (ms from the first kernel):")
    for gap, begin, before, after in sorted(largest, reverse=True)[: args.gaps]:
        print(f"  {gap / 1e3:6.2f} ms at {(begin - origin) / 1e3:7.2f}: {before[:50]} -> {after[:50]}")
        for call in host_calls_during(trace["frames"], begin, begin + gap):
            print(f"        host in {call}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
