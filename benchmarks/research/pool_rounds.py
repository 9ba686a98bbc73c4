"""Pool the rounds of several `memory3 bench speed` runs: memory/none throughput within each round
(every round runs every setting in turn), grouped by the memory config each run read.

On a shared machine one run of a few rounds moves by several points from the next; the median over
the rounds of every run made with one setting is the steadier figure. Nothing is timed here: it
reads the JSON the runs wrote.

    python benchmarks/research/pool_rounds.py RUN.json [RUN.json ...] [--batch 32] [--report BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from memory3.eval.report import table, update_section
from memory3.eval.speed import round_ratios


def memory_over_none(run: dict[str, Any], batch: int, cache: str) -> list[float]:
    """memory/none throughput of each round of one run, at one batch size and memory cache."""
    rows = [r for r in run["rows"] if r["batch"] == batch]
    none = next((r for r in rows if r["mode"] == "none"), None)
    memory = next((r for r in rows if r["mode"] == "memory" and r["cache"] == cache), None)
    if none is None or memory is None:
        return []
    return round_ratios(memory["throughput"], none["throughput"])


# settings every pooled run must share: a ratio is only comparable under the same ones
SAME = ("model", "dtype", "kv_dtype", "device", "threads")
SAME_CONFIG = ("prompt_tokens", "new_tokens", "k")


def settings(run: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(run.get(k) for k in SAME) + tuple(run.get("config", {}).get(k) for k in SAME_CONFIG)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="JSON written by `memory3 bench speed --out` or `bench all`")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--cache",
        default="warm",
        choices=("warm", "cold"),
        help="memory cache whose rounds to pool (one: warm and cold of a round share its `none` run)",
    )
    ap.add_argument("--report", help="update the section `speed-rounds` of this Markdown file")
    args = ap.parse_args()
    runs, pooled, first = [], {}, None
    for path in args.runs:
        run = json.loads(Path(path).read_text())
        first = first or (path, settings(run))
        if settings(run) != first[1]:
            raise SystemExit(
                f"{path} ran with {dict(zip(SAME + SAME_CONFIG, settings(run), strict=True))}, "
                f"{first[0]} with {dict(zip(SAME + SAME_CONFIG, first[1], strict=True))}: pool runs "
                "of one setting only"
            )
        kept = run.get("memory", {}).get("kept_tokens")
        r = memory_over_none(run, args.batch, args.cache)
        if not r:
            continue
        pooled.setdefault(kept, []).extend(r)
        runs.append(
            {
                "run": path,
                "kept tokens": kept,
                "date": run.get("machine", {}).get("date", ""),
                "rounds": len(r),
                "memory/none by round": " ".join(f"{x:.3f}" for x in r),
                "median": statistics.median(r),
            }
        )
    if not runs:
        raise SystemExit(f"no run holds batch {args.batch} with both `none` and `memory` rows")
    summary = [
        {
            "kept tokens": kept,
            "rounds": len(r),
            "median": statistics.median(r),
            "min": min(r),
            "max": max(r),
            "rounds ≥ 0.95": sum(x >= 0.95 for x in r),
        }
        for kept, r in sorted(pooled.items(), key=lambda kv: kv[0] or 0)
    ]
    print(json.dumps({"runs": runs, "pooled": summary}, indent=1))
    if args.report:
        cmd = "python benchmarks/research/pool_rounds.py " + " ".join(args.runs) + f" --batch {args.batch}"
        cmd += f" --cache {args.cache} --report {args.report}"
        body = (
            f"memory/none throughput at batch {args.batch}, {args.cache} memory cache, within each round "
            "of every speed run given (each round runs both modes one after the other), pooled by tokens "
            "kept per head. No new timing: the runs' own JSON.\n\n"
            + table(runs)
            + "\n\nPooled:\n\n"
            + table(summary)
        )
        update_section(
            args.report,
            "speed-rounds",
            "Speed: memory/none over the rounds of several runs",
            cmd,
            body,
            {"runs": runs, "pooled": summary},
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
