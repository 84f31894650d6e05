"""Sum a jax.profiler trace per XLA op: where a step's device time goes.

Reads the ``*.xplane.pb`` that ``bench/train_step.py --profile DIR`` (or
``bench/embed_throughput.py --profile DIR``) writes and adds up the duration of every executed
HLO op (events that carry an ``hlo_op`` stat; on CPU one line per worker thread, so the total
is thread time, not wall time). Control-flow ops (``while``, ``conditional``, ``call``) are left
out: the ops of their bodies are recorded inside their span and counted themselves. Prints the top ops and the totals per op kind (the op name
without its ``.N`` suffix: ``fusion``, ``dot``, ``copy``, ``loop_*_fusion``...), each with its
share of the summed op time, and with ``--steps`` the milliseconds per step.

To see what a fusion computes, dump the optimised HLO beside the profile
(``XLA_FLAGS="--xla_dump_to=D --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step_fn.*"``)
and look the op name up there.

COMMAND: python bench/train_step.py --config configs/bench.py:small --steps 3 --warmup 1 --profile /tmp/prof
COMMAND: python bench/profile_ops.py /tmp/prof --steps 3
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

from jax.profiler import ProfileData


def op_times(path: Path, module: str | None = None) -> dict[str, tuple[float, int]]:
    """{hlo op name: (summed ns, count)} over every thread of the trace at ``path``."""
    out: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for plane in ProfileData.from_file(str(path)).planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                op = stats.get("hlo_op")
                if op is None or kind(op) in CONTAINERS or (module and module not in str(stats.get("hlo_module", ""))):
                    continue
                out[op][0] += event.duration_ns
                out[op][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


CONTAINERS = ("while", "conditional", "call")


def kind(op: str) -> str:
    return re.sub(r"\.\d+$", "", op)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile", type=Path, help="the --profile directory, or one .xplane.pb")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds (to print ms per step)")
    p.add_argument("--top", type=int, default=25, help="how many single ops to list")
    p.add_argument("--module", default=None, help="only ops of HLO modules whose name contains this")
    a = p.parse_args()
    files = [a.profile] if a.profile.is_file() else sorted(a.profile.glob("plugins/profile/*/*.xplane.pb"))
    if not files:
        raise SystemExit(f"no .xplane.pb under {a.profile} (expected plugins/profile/<run>/*.xplane.pb)")
    times = op_times(files[-1], a.module)
    if not times:
        raise SystemExit(f"{files[-1]} holds no HLO op events" + (f" of a module matching {a.module!r}" if a.module else ""))
    total = sum(t for t, _ in times.values())
    per_step = lambda ns: ns / 1e6 / a.steps  # noqa: E731
    print(f"{files[-1]}: {len(times)} ops, {per_step(total):.1f} ms of op time per step (summed over threads)")
    kinds: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for op, (t, n) in times.items():
        kinds[kind(op)][0] += t
        kinds[kind(op)][1] += n
    print(f"\n{'op kind':40s} {'ms/step':>9s} {'share':>7s} {'calls':>7s}")
    for k, (t, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])[:a.top]:
        print(f"{k[:40]:40s} {per_step(t):9.2f} {100 * t / total:6.1f}% {n // a.steps:7d}")
    print(f"\n{'op':40s} {'ms/step':>9s} {'share':>7s} {'calls':>7s}")
    for op, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:a.top]:
        print(f"{op[:40]:40s} {per_step(t):9.2f} {100 * t / total:6.1f}% {n // a.steps:7d}")


if __name__ == "__main__":
    main()
