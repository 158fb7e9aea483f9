"""Where a traced generation's GPU time and GPU idle time go, from ``bench_pipelines.py --profile --trace T.json.gz``.

    python benchmarks/read_trace.py T_star-d30_b1.json.gz [--top 25] [--gap-us 5] [--depth 1]

Prints the GPU's busy and idle time over the generation's span, then two tables keyed by where the host issued the
work (the innermost ``--depth`` lines of this package on the issuing stack; a CUDA graph's kernels count for the line
that replays the graph):
  * kernel time: what the GPU ran, by issuing line;
  * idle before: the gaps (longer than ``--gap-us``) that end when a kernel starts, charged to that kernel's issuing
    line, with how late the host issued it (the launch's time minus the gap's start: positive, the host was behind).
A profiled run's host is slower than an unprofiled one (more so with stacks), so idle time is an upper bound; the
ranking is what it is for.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict

NAME, START, END, LAUNCH, FRAMES = range(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--gap-us", type=float, default=5.0, help="idle gaps shorter than this are launch latency")
    parser.add_argument("--depth", type=int, default=1, help="how many lines of the issuing stack make a key")
    args = parser.parse_args()
    with gzip.open(args.trace, "rt") as file:
        kernels = sorted(json.load(file), key=lambda row: row[START])
    if not kernels:
        print("no GPU events in the trace")
        return 1
    busy_us, idle_us, late_us, gaps = defaultdict(float), defaultdict(float), defaultdict(float), defaultdict(int)
    covered, short_gaps = kernels[0][START], 0.0
    for kernel in kernels:
        line = " <- ".join(kernel[FRAMES][: args.depth]) or "(no line of this package)"
        busy_us[line] += kernel[END] - kernel[START]
        gap = kernel[START] - covered
        if gap > args.gap_us:
            idle_us[line] += gap
            gaps[line] += 1
            if kernel[LAUNCH] is not None:
                late_us[line] += kernel[LAUNCH] - covered
        elif gap > 0:
            short_gaps += gap
        covered = max(covered, kernel[END])
    span = kernels[-1][END] - kernels[0][START]
    print(
        f"{len(kernels)} kernels in a {span / 1e3:.2f} ms span: {sum(busy_us.values()) / 1e3:.2f} ms of kernels, "
        f"{sum(idle_us.values()) / 1e3:.2f} ms idle in {sum(gaps.values())} gaps over {args.gap_us:g} us, "
        f"{short_gaps / 1e3:.2f} ms in shorter ones"
    )
    print("\nkernel time by issuing line (ms):")
    for line, us in sorted(busy_us.items(), key=lambda item: -item[1])[: args.top]:
        print(f"  {us / 1e3:8.2f}  {line}")
    print("\nidle before a kernel, by its issuing line (ms idle, gaps, ms the launches came after the gaps began):")
    for line, us in sorted(idle_us.items(), key=lambda item: -item[1])[: args.top]:
        print(f"  {us / 1e3:8.2f} {gaps[line]:6d} {late_us[line] / 1e3:8.2f}  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
