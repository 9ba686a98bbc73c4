"""Paired 95% intervals of the answers each codec costs, from the results `bench_codec_qa.py` wrote.

A codec's drop in held-out accuracy against bf16 banks is a difference of two accuracies on the
same questions, so its uncertainty comes from the questions that change, not from all of them:
the interval is that of the mean per-question difference (wrong with the codec where bf16 was
right: +1, the reverse: -1). Nothing is generated here: each answer stored in the results is
scored again against its question's gold answers, as the harness scores it, and the counts are
checked against the accuracies the run recorded.

    python benchmarks/research/codec_qa_intervals.py RESULTS.json [RESULTS.json ...] [--report BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from memory3.data.qa import answer_contained, load_qa
from memory3.data.sets import GenerateConfig, generate
from memory3.eval.paired import paired_drop_ci
from memory3.eval.qa import resolve_set, select_items
from memory3.eval.report import table, update_section
from memory3.memory.codec import CodecConfig

# benchmarks/ holds bench_codec_qa.py, the benchmark that wrote the results
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_codec_qa import BASELINE


def correct_per_question(results: dict[str, Any]) -> dict[str, list[bool]]:
    """codec -> right or wrong per held-out question, every set of the run in turn (the shipped
    sets, or the full sets generated again as the run generated them)."""
    ok: dict[str, list[bool]] = {}
    sets = list(dict.fromkeys(r["set"] for r in results["rows"]))
    full = tempfile.TemporaryDirectory() if results.get("full_sets") else None
    if full is not None:
        generate(full.name, GenerateConfig(**results["full_sets"]))
    for name in sets:
        path = Path(full.name) / f"{name}.jsonl" if full is not None else resolve_set(name)
        codecs = [r["codec"] for r in results["rows"] if r["set"] == name]
        for codec in codecs:
            d = results["detail"][f"{name}/{codec}"]
            items = select_items(load_qa(path), "heldout", len(d["answers"]))
            got = [answer_contained(a, it.answers) for a, it in zip(d["answers"], items, strict=True)]
            recorded = d["summary"]["modes"]["memory"]["contained"]
            if abs(sum(got) / len(got) - recorded) > 1e-9:
                raise SystemExit(
                    f"{name}/{codec}: scoring the stored answers gives {sum(got)}/{len(got)}, the run "
                    f"recorded {recorded:.4f}: the question set changed since; run the benchmark again"
                )
            ok.setdefault(codec, []).extend(got)
    return ok


def spelled(codec: str, results: dict[str, Any]) -> str:
    """The codec as `--codec` spells it today. Results written before they recorded their codecs'
    configs (`codecs`) are of transform codecs capped at 6 bits a coefficient, now tc<bits>m6."""
    if "codecs" in results and codec in results["codecs"]:
        return CodecConfig.from_dict(results["codecs"][codec]).name
    return f"{codec}m6" if codec.startswith("tc") else codec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="JSON written by bench_codec_qa.py (with its `detail`)")
    ap.add_argument("--report", help="update the section `codec-qa-intervals` of this Markdown file")
    args = ap.parse_args()
    rows = []
    for path in args.results:
        results = json.loads(Path(path).read_text())
        ok = correct_per_question(results)
        base = ok[BASELINE]
        cal = results.get("codec_calibration") or {}
        for codec, got in ok.items():
            if codec == BASELINE:
                continue
            lo, hi = paired_drop_ci(got, base)
            rows.append(
                {
                    "results": Path(path).name,
                    "codec": spelled(codec, results),
                    "sets": "full" if results.get("full_sets") else "shipped",
                    "calibration groups": cal.get("groups", "") if codec.startswith("tc") else "",
                    "questions": len(got),
                    "right (codec / bf16)": f"{sum(got)} / {sum(base)}",
                    "lost": sum(b and not a for a, b in zip(got, base, strict=True)),
                    "gained": sum(a and not b for a, b in zip(got, base, strict=True)),
                    "drop (points)": round(100 * (sum(base) - sum(got)) / len(got), 2),
                    "95% interval": f"{lo:+.1f} to {hi:+.1f}",
                }
            )
    print(json.dumps(rows, indent=1))
    if args.report:
        body = (
            "Points of held-out accuracy each codec loses against bf16 banks of the same references, "
            "with the paired 95% interval of that drop (normal approximation to the mean "
            "per-question difference; questions answered alike narrow it). Each row re-scores the "
            "answers stored in a `bench_codec_qa.py` results file; `lost` and `gained` count the "
            "questions the codec turned wrong and right. With few changed answers the normal "
            "approximation is too narrow (none changed gives 0 to 0): read it with those counts."
            "\n\n" + table(rows)
        )
        cmd = (
            "python benchmarks/research/codec_qa_intervals.py "
            + " ".join(args.results)
            + f" --report {args.report}"
        )
        update_section(
            args.report,
            "codec-qa-intervals",
            "Memory codec: paired intervals of the answers codecs cost",
            cmd,
            body,
            {"rows": rows},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
