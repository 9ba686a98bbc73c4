"""Write benchmark figures into BENCHMARKS.md: one marked section per benchmark, so that each
script regenerates its own section and leaves the others alone."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    return {
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(terse=True),
        "date": time.strftime("%Y-%m-%d"),
    }


def update_section(
    path: str | Path, name: str, title: str, command: str, body_md: str, figures: dict
) -> None:
    """Replace (or append) the section `name` of a Markdown file with a table and the JSON."""
    path = Path(path)
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = (
        f"{start}\n## {title}\n\nReproduce: `{command}`\n\n{body_md.strip()}\n\n"
        f"<details><summary>JSON</summary>\n\n```json\n{json.dumps(figures, indent=2)}\n```\n</details>\n{end}"
    )
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
    of `md_path` with `body_md` and the JSON without the bulky keys in `omit`."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    compact = {k: v for k, v in results.items() if k not in omit}
    update_section(md_path, name, title, command, body_md, compact)


def table(rows: list[dict[str, Any]], cols: list[str] | None = None) -> str:
    if not rows:
        return ""
    cols = cols or list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
