"""The benchmark harness: a registry of named experiments with one set of common arguments, a
cached model loader, an interleaved timer and one results writer (JSON + BENCHMARKS.md section).

A benchmark module registers its entry point and its own arguments:

    def arguments(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--cases", default="32x128,8x512")

    @experiment("prefill", "prefill.json", arguments)
    def main(run: Run) -> int:
        loaded = run.load()                      # --model, cached
        t = interleaved({"a": f, "b": g}, 3)     # rounds in turn, the first one dropped
        run.save({"rows": rows})                 # JSON + machine + command line
        run.section("prefill", "Speed: ...", f" --cases {run.args.cases}", body)
        return 0

    if __name__ == "__main__":
        raise SystemExit(run_experiment("prefill"))

`python benchmarks/run.py --list` lists every registered experiment, `python benchmarks/run.py NAME
[args]` runs one (benchmarks/README.md). Paths default to this repository's own BENCHMARKS.md and
benchmarks/results/, wherever the command is run from.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
REPORT = REPO / "BENCHMARKS.md"
RESULTS = BENCHMARKS / "results"
# keys of a results dict too bulky to print (they stay in the JSON file)
BULKY = ("answers", "detail", "requests", "edits")

Results = str | Callable[[argparse.Namespace], str] | None
Arguments = Callable[[argparse.ArgumentParser], None] | None


@dataclass
class Experiment:
    name: str
    title: str  # one line, for --list
    main: Callable[[Run], int | None]
    script: Path  # the module that registered it
    results: Results  # file name in --results-dir, or a function of the arguments that gives it
    arguments: Arguments = None  # adds the experiment's own arguments to its parser
    model: str | None = "default"  # --model's default; None: no --model
    threads: int | None = 1  # --threads' default (0: torch's choice); None: no --threads
    faiss_threads: bool = False  # --threads also sets FAISS's OpenMP threads
    doc: str = ""  # its module's docstring: the --help text


EXPERIMENTS: dict[str, Experiment] = {}


def experiment(
    name: str,
    results: Results = None,
    arguments: Arguments = None,
    *,
    title: str | None = None,
    model: str | None = "default",
    threads: int | None = 1,
    faiss_threads: bool = False,
) -> Callable[[Callable[[Run], int | None]], Callable[[Run], int | None]]:
    """Register `main(run)` as the experiment `name`. `results`: its JSON file's name in
    --results-dir (or a function of the parsed arguments that gives it; default NAME.json);
    `arguments(ap)`: adds its own arguments; `title`: its line in --list (default: the first
    sentence of its module's docstring); `model`: --model's default ("default": the shipped model,
    None: no --model); `threads`: --threads' default (None: no --threads); `faiss_threads`:
    --threads also sets FAISS's."""

    def register(fn: Callable[[Run], int | None]) -> Callable[[Run], int | None]:
        script = Path(inspect.getfile(fn)).resolve()
        old = EXPERIMENTS.get(name)
        if old is not None and old.script != script:
            raise ValueError(f"experiment {name!r} is registered by both {old.script} and {script}")
        doc = sys.modules[fn.__module__].__doc__ or name
        first = " ".join(doc.strip().split("\n\n")[0].split())  # its first paragraph
        line = title or re.split(r"(?<=[.?!])\s+(?=[A-Z(])", first)[0]
        EXPERIMENTS[name] = Experiment(
            name, line, fn, script, results, arguments, model, threads, faiss_threads, doc
        )
        return fn

    return register


def shown(path: str | Path) -> str:
    """A path as a command cites it: relative to the repository where it lies inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


# ---- the shared loader


_MODELS: dict[tuple[str, str], Any] = {}


def load_model(name: str | Path, dtype: Any = None) -> Any:
    """`memory3.checkpoint.load_pretrained(name, dtype=dtype)` (float32 by default), loaded once
    per process and name and dtype."""
    import torch

    from memory3.checkpoint import load_pretrained

    dtype = dtype or torch.float32
    key = (str(name), str(dtype))
    if key not in _MODELS:
        _MODELS[key] = load_pretrained(name, dtype=dtype)
    return _MODELS[key]


# ---- the shared timer


@dataclass
class Timings:
    runs: dict[str, list[float]]  # the kept measurements of each callable, round by round
    median: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.median = {k: statistics.median(v) for k, v in self.runs.items() if v}


def interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, *, drop_first: bool = True, own_clock: bool = False
) -> Timings:
    """Run every callable in turn (a, b, c, a, b, c, …) for `rounds` kept rounds, after one dropped
    warm-up round unless `drop_first` is False, so that a change in machine load hits them alike.
    Each call is timed with `time.perf_counter`, or (`own_clock`) returns its own measurement:
    the seconds of the part it times, or a rate."""
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + drop_first):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            value = fn()
            took = value if own_clock else time.perf_counter() - t0
            if r or not drop_first:
                runs[k].append(took)
    return Timings(runs)


# ---- one run of an experiment, and its results writer


@dataclass
class Run:
    experiment: Experiment
    args: argparse.Namespace
    parser: argparse.ArgumentParser
    saved: dict[str, Any] | None = None

    def error(self, message: str) -> NoReturn:
        self.parser.error(message)

    def load(self, name: str | Path | None = None, dtype: Any = None) -> Any:
        """The model `name` (default --model) through the shared cached loader, reading memory in
        --memory-layers with --kept-tokens per head and --references per chunk where given."""
        from memory3.config import parse_memory_layers

        loaded = load_model(name if name is not None else self.args.model, dtype)
        layers, kept = getattr(self.args, "memory_layers", None), getattr(self.args, "kept_tokens", None)
        k = getattr(self.args, "references", None)
        if layers:
            loaded.model.set_memory_layers(parse_memory_layers(layers, loaded.model.config.n_layer))
        if kept is not None or k is not None:
            cfg = loaded.memory_config.override(kept, None, k)
            loaded = dataclasses.replace(loaded, meta={**loaded.meta, "memory_config": cfg.to_dict()})
        return loaded

    @property
    def results_path(self) -> Path:
        """--json, else --results-dir / the experiment's results file."""
        if self.args.json:
            return Path(self.args.json)
        results = self.experiment.results
        name = results(self.args) if callable(results) else results or f"{self.experiment.name}.json"
        return Path(self.args.results_dir) / name

    def command(self, flags: str = "") -> str:
        """The command that reproduces a section: `python benchmarks/<script>.py` + flags."""
        return f"python {shown(self.experiment.script)}{flags}"

    def save(self, results: dict[str, Any], quiet: Sequence[str] = BULKY) -> Path:
        """Write the results as JSON (with the machine and the command line that made them) and
        print them without their bulky keys (`quiet`)."""
        from memory3.eval.report import machine

        argv = [shown(sys.argv[0]) if sys.argv[0].endswith(".py") else sys.argv[0], *sys.argv[1:]]
        self.saved = {"machine": machine(), **results, "command": "python " + shlex.join(argv)}
        path = self.results_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.saved, indent=1, ensure_ascii=False) + "\n")
        print(json.dumps({k: v for k, v in self.saved.items() if k not in quiet}, indent=1))
        return path

    def section(self, name: str, title: str, flags: str, body: str, *, command: str | None = None) -> None:
        """Replace (or add) the section `name` of --report: its title, the command that reproduces
        it (`command`, else this script with `flags`), the machine and results file of the last
        `save`, and `body`."""
        from memory3.eval.report import update_section

        if self.saved is None:
            raise RuntimeError("save() the results before writing their section")
        update_section(
            self.args.report,
            name,
            title,
            command or self.command(flags),
            body,
            {"machine": self.saved["machine"]},
            results_file=self.results_path,
        )


def parser_of(exp: Experiment, prog: str | None = None) -> argparse.ArgumentParser:
    from memory3.shipped import default_model

    ap = argparse.ArgumentParser(
        prog=prog or f"python {shown(exp.script)}",
        description=exp.doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = ap.add_argument_group("common (every experiment)")
    if exp.model is not None:
        model = default_model() if exp.model == "default" else exp.model
        common.add_argument("--model", default=model, help=f"model to load (default {model})")
        common.add_argument(
            "--memory-layers", default=None, help="layers that read memory (default: the model's own)"
        )
        common.add_argument(
            "--kept-tokens", type=int, default=None, help="tokens kept per memory head (default: the model's)"
        )
        common.add_argument(
            "--references", type=int, default=None, help="memories read per chunk (default: the model's)"
        )
    if exp.threads is not None:
        common.add_argument(
            "--threads",
            type=int,
            default=exp.threads,
            help=f"torch threads{' and FAISS' if exp.faiss_threads else ''} (0: torch's choice; default "
            f"{exp.threads})",
        )
    common.add_argument("--report", default=str(REPORT), help="Markdown file whose section to update")
    common.add_argument("--results-dir", default=str(RESULTS), help="where the results JSON goes")
    common.add_argument("--json", default=None, help="the results file itself (default: in --results-dir)")
    if exp.arguments is not None:
        exp.arguments(ap)
    return ap


def run_experiment(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse `argv` (default: the command line) for the experiment `name`, set threads, run it."""
    exp = EXPERIMENTS[name]
    ap = parser_of(exp, prog)
    args = ap.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
        if exp.faiss_threads:
            import faiss

            faiss.omp_set_num_threads(args.threads)
    return exp.main(Run(exp, args, ap)) or 0


def discover() -> dict[str, Experiment]:
    """Import every benchmarks/bench_*.py (importing one registers its experiments)."""
    import importlib

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    for path in sorted(BENCHMARKS.glob("bench_*.py")):
        importlib.import_module(path.stem)
    return EXPERIMENTS
