"""Write benchmark figures into BENCHMARKS.md: one marked section per benchmark, so that each
script regenerates its own section and leaves the others alone."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """What a result was measured on: CPU model and cores (sessions get different processors),
    torch threads, torch version, platform, date."""
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(terse=True),
        "date": time.strftime("%Y-%m-%d"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def update_section(
    path: str | Path,
    name: str,
    title: str,
    command: str,
    body_md: str,
    figures: dict | None = None,
    results_file: str | Path | None = None,
) -> None:
    """Replace (or append) the section `name` of a Markdown file: the title, the command that
    reproduces it, the machine (from `figures["machine"]`, where the results name it), where the
    full results are, and `body_md`. The results themselves stay in their JSON file."""
    path = Path(path)
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    head = [f"Reproduce: `{command}`"]
    machine = (figures or {}).get("machine")
    if isinstance(machine, dict):
        head.append("Machine: " + machine_line(machine))
    if results_file is not None:  # relative to the report, where it lies below it
        rel = Path(os.path.relpath(Path(results_file).resolve(), path.resolve().parent))
        head.append(f"Results: `{results_file if rel.parts[:1] == ('..',) else rel}`")
    section = f"{start}\n## {title}\n\n" + "\n".join(head) + f"\n\n{body_md.strip()}\n{end}"
    text = (
        path.read_text()
        if path.exists()
        else "# memory3 benchmarks\n\nFigures measured on the machine named in each section; ratios are the headline, absolute times vary with load.\n"
    )
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def machine_line(machine: dict[str, Any]) -> str:
    """One line naming the machine a result was measured on (`machine()`'s fields)."""
    parts = [str(machine.get("cpu") or machine.get("platform") or "CPU")]
    if machine.get("cpu_count"):
        parts.append(f"{machine['cpu_count']} cores")
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    if machine.get("cpu_threads"):
        parts.append(f"{machine['cpu_threads']} thread(s)")
    if machine.get("device") and machine.get("device") != "cpu":
        parts.append(str(machine["device"]))
    if machine.get("date"):
        parts.append(str(machine["date"]))
    return ", ".join(parts)


def publish(
    results: dict[str, Any],
    json_path: str | Path,
    md_path: str | Path,
    name: str,
    title: str,
    command: str,
    body_md: str,
    omit: tuple[str, ...] = ("answers",),
) -> None:
    """A benchmark script's results: all of them as JSON at `json_path`, and the section `name`
    of `md_path` with `body_md`, naming the machine and the JSON file. `omit` is kept for callers
    that name bulky keys; nothing of the JSON is copied into the section."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    compact = {k: v for k, v in results.items() if k not in omit}
    update_section(md_path, name, title, command, body_md, compact, results_file=json_path)


def table(rows: list[dict[str, Any]], cols: list[str] | None = None) -> str:
    if not rows:
        return ""
    cols = cols or list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
