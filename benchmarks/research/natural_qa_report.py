"""Write the BENCHMARKS.md section "natural-qa" from `memory3 eval qa --sets natural` results: the
test split (the reported figure) and the dev split (for choosing settings), each with memory/RAG,
the breakdown by answer type and by family, memory against RAG paired with a 95% interval, and,
given another reader's results on the same split, that reader against this one.

    memory3 eval qa --sets natural --split test --threads 1 --out benchmarks/results/natural-qa-test.json
    memory3 eval qa --sets natural --split dev --threads 1 --out benchmarks/results/natural-qa-dev.json
    python benchmarks/research/natural_qa_report.py benchmarks/results/natural-qa-test.json \
        benchmarks/results/natural-qa-dev.json [--compare OTHER-test.json] --report BENCHMARKS.md

Nothing is generated here: the figures are those the results files hold.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from memory3.eval.breakdown import breakdown_md
from memory3.eval.paired import compare_runs
from memory3.eval.render import count
from memory3.eval.report import table, update_section


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


# a unit of 1 to 8 characters repeated 6 more times: an answer that degenerated into repetition
REPEATED = re.compile(r"(.{1,8}?)\1{5,}", re.S)


def repeated(s: dict[str, Any], mode: str) -> int:
    """Answers of `mode` that degenerated into one piece repeated (issue: "Vivoshashashasha…")."""
    return sum(bool(REPEATED.search(it["texts"][mode])) for it in s["items"] if mode in it["texts"])


def headline(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, s in results["sets"].items():
        summ, modes = s["summary"], s["summary"]["modes"]
        mem, rag = modes.get("memory", {}).get("contained"), modes.get("rag", {}).get("contained")
        p = summ.get("memory_vs_rag")
        rows.append(
            {
                "split": name.removeprefix("natural_"),
                "questions": summ["n"],
                **{m: _pct(v["contained"]) for m, v in modes.items()},
                "memory/RAG": f"{mem / rag:.2f}" if mem is not None and rag else "–",
                "memory − RAG (points, 95% interval)": (
                    f"{p['diff_points']:+.1f} ({p['ci95'][0]:+.1f} to {p['ci95'][1]:+.1f})" if p else "–"
                ),
                f"hit@{summ['k']}": _pct(summ["hit_rate"]),
                "repeating answers (none / memory / RAG)": " / ".join(
                    str(repeated(s, m)) for m in ("none", "memory", "rag")
                ),
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="JSON of `memory3 eval qa --sets natural --out` (test first)")
    ap.add_argument("--compare", default=None, help="another reader's results on the same split")
    ap.add_argument("--report", default=None, help="update the section `natural-qa` of this Markdown file")
    args = ap.parse_args()
    runs = [json.loads(Path(p).read_text()) for p in args.results]
    first = runs[0]
    rows = [r for res in runs for r in headline(res)]
    parts = [table(rows)]
    for res in runs:
        for name, s in res["sets"].items():
            parts.append(f"**{name}**, answer contained:\n\n" + breakdown_md(s["summary"]))
    if args.compare:
        other = json.loads(Path(args.compare).read_text())
        for mode in ("memory", "rag", "none"):
            for name, p in compare_runs(first, other, mode).items():
                parts.append(
                    f"{mode}, {name}: this reader − `{other.get('model')}` = {p.diff_points:+.1f} points "
                    f"(95% interval {p.ci95[0]:+.1f} to {p.ci95[1]:+.1f}; {p.a_only} right only here, "
                    f"{p.b_only} only there)."
                )
    cfg = next(iter(first["sets"].values()))["config"]
    meta = next(iter(first["sets"].values()))["meta"]
    m = first["machine"]
    intro = (
        f"Hand-written questions over held-out Wikipedia summaries (`src/memory3/assets/qa/README.md`): "
        f"the test split is the reported figure; the dev split is for choosing settings. Model "
        f"`{first['model']}` ({first['dtype']}), memory in {first['memory']['layers']} layers, "
        f"{first['memory']['kept_tokens']} kept tokens per head; {count(cfg['k'], 'reference', 'references')} per retrieval, greedy, "
        f"≤ {cfg['max_new_tokens']} new tokens, leak filter {cfg['leak_threshold']:.3g}. Knowledge base: "
        f"{meta['kb']} (every summary a question names, both splits, and held-out distractors); retriever "
        f"`{meta['embedder']}`. Score: a gold answer contained in the answer (normalised). Repeating answers: "
        "a piece of 1 to 8 characters repeated 6 times or more in a row. Paired intervals: "
        "normal approximation to the mean per-question difference. Machine: "
        f"{m['platform']}, torch {m['torch']}, {first['threads']} thread, {m['date']}. Commands:\n\n"
        + "\n".join(f"- `{res.get('reproduce', '?')}`" for res in runs)
    )
    body = intro + "\n\n" + "\n\n".join(parts)
    print(body)
    if args.report:
        cmd = "python benchmarks/research/natural_qa_report.py " + " ".join(args.results)
        cmd += f" --compare {args.compare}" if args.compare else ""
        compact = {  # the headline figures; every row of the tables is in the results files
            name: {
                "n": v["summary"]["n"],
                "hit_rate": v["summary"]["hit_rate"],
                "contained": {m: x["contained"] for m, x in v["summary"]["modes"].items()},
                "memory_vs_rag": v["summary"].get("memory_vs_rag"),
            }
            for res in runs
            for name, v in res["sets"].items()
        }
        update_section(
            args.report,
            "natural-qa",
            "Question answering on hand-written natural questions (held-out Wikipedia)",
            cmd + f" --report {args.report}",
            body,
            compact,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
