"""Run one registered benchmark, or list them all.

    python benchmarks/run.py --list
    python benchmarks/run.py NAME [--help] [its arguments]

Every benchmarks/bench_*.py registers its experiments with the harness (benchmarks/harness.py);
each still runs on its own too, as `python benchmarks/bench_NAME.py [its arguments]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import discover, run_experiment, shown


def main(argv: list[str]) -> int:
    experiments = discover()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] == "--list":
        width = max(map(len, experiments))
        for name, exp in sorted(experiments.items()):
            print(f"{name:{width}}  {exp.title}  ({shown(exp.script)})")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in experiments:
        print(f"no experiment {name!r}; `python benchmarks/run.py --list` lists them", file=sys.stderr)
        return 2
    return run_experiment(name, rest, prog=f"python benchmarks/run.py {name}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
