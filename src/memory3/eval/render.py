"""The published benchmark report: each result of `memory3 eval` and `memory3 bench` as a section
of BENCHMARKS.md (a Markdown table and its JSON) with its figures, and where that report lives.

Imports nothing heavy at module level (plots and tables are imported when drawn), so the command
line can read its defaults here and stay instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Where a repository checkout keeps the published report, relative to its root.
RESULTS_DIR = "benchmarks/results"
FIGURES_DIR = "docs/figures"
REPORT = "BENCHMARKS.md"
SECTIONS = {
    "qa": ("eval-qa", "Question answering: explicit memory vs no memory vs RAG"),
    "ppl": ("eval-ppl", "Perplexity of held-out text with and without memory"),
    "speed": ("bench-speed", "Speed: throughput and time to first token"),
    "storage": ("bench-storage", "Storage per memory"),
}


def repository() -> Path | None:
    """The root of the repository checkout this package runs from (the package is its
    `src/memory3`, as an editable install or PYTHONPATH=src has it), or None for an installed
    package, which has no report of its own to update."""
    package = Path(__file__).resolve().parents[1]  # .../src/memory3
    root = package.parents[1]
    if (
        package.parent.name == "src"
        and (root / "pyproject.toml").is_file()
        and (root / "benchmarks").is_dir()
    ):
        return root
    return None


def render(
    results: dict[str, dict[str, Any]], report: str | Path | None, figures: str | Path | None, command: str
) -> None:
    """Write the figures and the BENCHMARKS.md sections of the given results."""
    from memory3.eval import plots
    from memory3.eval.report import update_section

    figs: dict[str, list[Path]] = {}
    if figures:
        fdir = Path(figures)
        if "qa" in results:
            figs.setdefault("qa", []).append(plots.plot_accuracy(results["qa"], fdir / "qa_accuracy.png"))
        if "speed" in results:
            figs.setdefault("speed", []).append(
                plots.plot_throughput(results["speed"], fdir / "throughput.png")
            )
        if "qa" in results and "speed" in results:
            figs["speed"].append(
                plots.plot_accuracy_vs_speed(results["qa"], results["speed"], fdir / "accuracy_vs_speed.png")
            )
    if not report:
        return
    for name, res in results.items():
        key, title = SECTIONS[name]
        body = {"qa": _md_qa, "ppl": _md_ppl, "speed": _md_speed, "storage": _md_storage}[name](res)
        if figs.get(name):
            body += "\n\n" + plots.figure_links(figs[name], report)
        compact = {k: v for k, v in res.items() if k != "sets"}
        if name == "qa":  # per-item answers stay in the JSON file, not in the report
            compact["sets"] = {
                s: {"summary": v["summary"], "meta": v["meta"], "config": v["config"]}
                for s, v in res["sets"].items()
            }
        update_section(report, key, title, res.get("reproduce", command), body, compact)


def count(n: int, one: str, many: str) -> str:
    """'1 reference', '5 references': a number with its noun."""
    return f"{n} {one if n == 1 else many}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _md_qa(res: dict[str, Any]) -> str:
    from memory3.eval.report import table

    rows = []
    for name, s in res["sets"].items():
        summ = s["summary"]
        for mode, m in summ["modes"].items():
            rows.append(
                {
                    "set": name,
                    "mode": mode,
                    "n": summ["n"],
                    "exact match": _pct(m["exact_match"]),
                    "answer contained": _pct(m["contained"]),
                    "contained, gold retrieved": _pct(m["contained_when_hit"]),
                    "contained, gold missed": _pct(m["contained_when_missed"]),
                    f"hit@{summ['k']}": _pct(summ["hit_rate"]),
                    "keeps what none knew": _pct(m.get("keeps_known")),
                }
            )
    from memory3.eval.breakdown import breakdown_md

    parts = [
        f"**{name}** by answer type and by family (answer contained):\n\n{md}"
        for name, s in res["sets"].items()
        if (md := breakdown_md(s["summary"]))
    ]
    if res.get("compare"):
        parts.append(_md_compare(res["compare"]))
    any_set = next(iter(res["sets"].values()))
    cfg, meta = any_set["config"], any_set["meta"]
    leak = "off" if cfg["leak_threshold"] is None else f"{cfg['leak_threshold']:.3g}"
    return (
        f"Model `{res['model']}` ({res['dtype']}, KV cache {res.get('kv_dtype', res['dtype'])}), split `{meta['split']}`, {count(cfg['k'], 'reference', 'references')} per retrieval, "
        f"greedy, ≤ {cfg['max_new_tokens']} new tokens, batch {cfg['batch_size']}, leak filter "
        f"{leak}"
        + ("" if cfg.get("min_score") is None else f", hits scoring below {cfg['min_score']:.3g} dropped")
        + f". Knowledge base: {meta['kb']}; "
        f"retriever `{meta['embedder']}`. hit@k: a reference of the gold document is among the k hits of the question "
        "(the query RAG and memory's first chunk use). Keeps what none knew: of the questions answered "
        "right without memory, the share this mode answers right too.\n\n"
        + table(rows)
        + "".join(f"\n\n{p}" for p in parts)
    )


def _md_compare(compare: dict[str, Any]) -> str:
    from memory3.eval.report import table

    rows = [
        {
            "mode": mode,
            "set": name,
            "n": p["n"],
            "right (this / other)": f"{p['a_right']} / {p['b_right']}",
            "this only / other only": f"{p['a_only']} / {p['b_only']}",
            "this − other (points)": f"{p['diff_points']:+.1f}",
            "95% interval": f"{p['ci95'][0]:+.1f} to {p['ci95'][1]:+.1f}",
        }
        for mode, sets in compare["modes"].items()
        for name, p in sets.items()
    ]
    return (
        f"Against `{compare['other']}` (model `{compare.get('other_model')}`), paired on the same "
        "questions (answer contained):\n\n" + table(rows)
    )


def _md_ppl(res: dict[str, Any]) -> str:
    from memory3.eval.report import table

    none = res["modes"].get("none", {}).get("perplexity")
    rows = [
        {
            "mode": m,
            "perplexity": f"{v['perplexity']:.3f}",
            "vs none": f"{v['perplexity'] / none:.3f}×" if none else "–",
            "scored tokens": v["tokens"],
            "texts": v["texts"],
            "chunks reading memory": v["retrievals"],
        }
        for m, v in res["modes"].items()
    ]
    c = res["config"]
    leak = "off" if c["leak_threshold"] is None else f"{c['leak_threshold']:.3g}"
    return (
        f"Model `{res['model']}` ({res['dtype']}); texts: `{res['texts']}` (held-out split), first "
        f"{c['max_tokens']} tokens of each text with ≥ {c['min_tokens']}. Memory: chunk c reads "
        f"{count(c['k'], 'memory', 'memories')} retrieved with chunk c-1's text (chunk 0: {c['first_query']}), so no chunk sees references chosen by its "
        f"own future; leak filter {leak} against the whole scored text; `prefix` is the memory layout (reference "
        f"prefix, text at position p+128) without memories, the control for `memory`. Knowledge base: {res['kb']}.\n\n"
        + table(rows)
    )


def _md_speed(res: dict[str, Any]) -> str:
    from memory3.eval.report import table

    def rng(s: dict[str, float], fmt: str) -> str:
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"

    rows = [
        {
            "batch": r["batch"],
            "mode": r["mode"],
            "cache": r["cache"],
            "throughput tok/s": rng(r["throughput"], ".1f"),
            "TTFT s": rng(r["ttft_s"], ".3f"),
            "decode tok/s": rng(r["decode_tokens_per_s"], ".1f"),
            "retrievals/seq": f"{r['retrievals_per_sequence']:.0f}",
            "prompt tokens": f"{r['prompt_tokens']:.0f}",
        }
        for r in res["rows"]
    ]
    names = {
        "throughput_memory_over_rag": "throughput memory/RAG",
        "throughput_memory_over_none": "throughput memory/none",
        "throughput_memory_over_none_paired": "memory/none paired by round",
        "decode_memory_over_none": "decode memory/none",
        "ttft_memory_over_rag": "TTFT memory/RAG",
    }
    ratio_rows = [
        {names.get(k, k): (f"{v:.2f}×" if isinstance(v, float) else v) for k, v in r.items()}
        for r in res["ratios"]
    ]
    c = res["config"]
    warm = (
        "a dropped warm-up round at each batch size"
        if c.get("warmup", "each") == "each"
        else "one dropped warm-up round"
    )
    skipped = "".join(f"\n- skipped `{k}` cache: {v}" for k, v in res.get("skipped", {}).items())
    m = res.get("memory")
    reads = (
        f" It reads memory in {m['layers']} layers, {m['kept_tokens']} tokens per head per reference: "
        f"{c['k'] * m['kept_tokens']} memory keys per layer beside the context."
        if m
        else ""
    )
    return (
        f"Model `{res['model']}` ({res['dtype']}, KV cache {res.get('kv_dtype', res['dtype'])}, torch threads: {res.get('threads', '?')}).{reads} {c['prompt_tokens']} prompt tokens "
        f"+ {c['new_tokens']} generated (EOS ignored), {count(c['k'], 'reference', 'references')} per retrieval, {c['runs']} measured runs "
        f"after {warm}, median (min–max). Memory retrieves once per 64-token prompt chunk and again after every 64 generated tokens that more tokens follow (3 times per sequence for 128 + 128). Throughput = batch × generated / total wall time (Table 21: prefill "
        f"and every retrieval included); TTFT includes retrieval, memory loading and prefill. Knowledge base: "
        f"{res['kb']}.{skipped}\n\n"
        + table(rows)
        + "\n\nRatios (of the medians, and for memory/none also the median of the ratios within "
        "each round, which runs every setting in turn; targets: memory/RAG throughput ≥ 2 at "
        "batch 32, memory/none throughput ≥ 0.95, memory/RAG TTFT ≤ 0.33):\n\n" + table(ratio_rows)
    )


def _md_storage(res: dict[str, Any]) -> str:
    from memory3.eval.report import table

    rows = [
        {
            "model": r["model"],
            "memory layers × kept tokens": f"{r['memory_layers']} × {r['kept_tokens']}"
            if "kept_tokens" in r
            else "–",
            "codec": f"`{r['codec']}`",
            "bytes/vector": f"{r['bytes_per_vector']:.0f}",
            "KiB/memory": f"{r['kib_per_memory']:.1f}",
            "bytes/ref. token": f"{r['bytes_per_reference_token']:.0f}",
            "full KV / memory": f"{r['full_kv_over_memory']:.0f}×",
            "full KV (MHA) / memory": f"{r['full_kv_query_heads_over_memory']:.0f}×",
            "memory / text": f"{r.get('memory_over_text', float('nan')):.0f}×",
        }
        for r in res["rows"]
    ]
    s = res["text_sample"]
    mc = res["memory_config"]
    skipped = "".join(f"\n- skipped {x}" for x in res.get("skipped", []))
    return (
        "One memory = memory layers × 2 (K, V) × kv heads × kept tokens × head dim (the first model as "
        f"loaded, {mc['kept_tokens']} kept tokens; presets as the paper sets them, 8). Full KV: "
        f"every layer and kv head for all {mc['reference_tokens']} tokens of a reference, bf16 (MHA: counting the "
        "query heads, as the paper's 160× does). Text: UTF-8 of a full reference, from "
        f"{s['references']} held-out Wikipedia references ({s['utf8_bytes_per_token']:.2f} bytes/token, SmolLM2 "
        f"tokenizer). Positions add {res['rows'][0]['position_bytes'] if res['rows'] else 0} bytes per memory "
        f"(one byte each) for the first model.{skipped}\n\n" + table(rows)
    )
