"""`memory3 bench speed`: throughput and time to first token with explicit memory, RAG, and no
retrieval at all (§7, the paper's Table 21).

Throughput is the paper's: batch × generated tokens / total wall time of the call, prefill and
every retrieval included. With 128 prompt tokens and 128 generated, memory mode retrieves 3 times
per sequence (2 prompt chunks, then once after 64 generated tokens) and reads 5 memories per
chunk; RAG retrieves once and prefills the 5 references' text in front of the prompt; "none" is the
plain model (no prefix, no retrieval). Pure decode tokens/s (after the first token) and time to
first token (retrieval + memory loading + prefill) are reported too.

The cache setting names the retriever a run uses: "warm" (memories already in RAM) and "cold"
(every memory read from disk, the paper's worst case). A retriever factory maps the name to a
retriever, so any memory bank can be plugged in; names it cannot serve are skipped and noted.

Settings are interleaved round by round (none, rag, memory, none, …) so that a change in the
machine's load hits every setting alike; the first round is dropped; medians and min/max are kept.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from memory3.config import GenerationConfig
from memory3.generate import MODES, Generator
from memory3.memory.write import Memories
from memory3.retrieval.base import Hit, Retriever

log = logging.getLogger(__name__)

CACHES = ("warm", "cold")
RetrieverFactory = Callable[[str], "Retriever | None"]


@dataclass(frozen=True)
class SpeedConfig:
    """The issue's specification by default; every field is a CLI flag for quicker runs."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)
    prompt_tokens: int = 128
    new_tokens: int = 128
    k: int = 5  # references per retrieval
    runs: int = 3  # measured rounds; one more warm-up round runs first and is dropped
    # "each": a dropped warm-up round at every batch size (the specification); "first": only before
    # the first batch size (kernels, embedder and caches warm up once; quick runs)
    warmup: str = "each"
    modes: tuple[str, ...] = ("none", "rag", "memory")
    caches: tuple[str, ...] = CACHES

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive, got {self.batch_sizes}")
        if self.prompt_tokens < 1 or self.new_tokens < 2 or self.k < 1 or self.runs < 1:
            raise ValueError(
                "need prompt_tokens ≥ 1, new_tokens ≥ 2, k ≥ 1 and runs ≥ 1, got "
                f"{self.prompt_tokens}, {self.new_tokens}, {self.k}, {self.runs}"
            )
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; choose from {MODES}")
        if self.warmup not in ("each", "first"):
            raise ValueError(f"warmup must be 'each' or 'first', got {self.warmup!r}")
        bad = [c for c in self.caches if c not in CACHES]
        if bad:
            raise ValueError(f"unknown cache setting(s) {bad}; choose from {CACHES}")


def throughput(batch: int, new_tokens: int, wall_s: float) -> float:
    """The paper's throughput (Table 21): batch × generated tokens / total wall time."""
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive, got {wall_s}")
    return batch * new_tokens / wall_s


@dataclass
class Spread:
    """Median and range of the measured runs (warm-up dropped)."""

    median: float
    min: float
    max: float
    runs: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no measured runs")
        return cls(statistics.median(values), min(values), max(values), list(values))


class CountingRetriever:
    """A retriever that counts queries and memories loaded, passing everything through."""

    def __init__(self, inner: Retriever) -> None:
        self.inner = inner
        self.queries = 0
        self.memories_loaded = 0

    @property
    def memory_fingerprint(self) -> str:
        return self.inner.memory_fingerprint

    def search(
        self,
        queries: Sequence[str],
        k: int,
        leak_texts: Sequence[str] | None = None,
        leak_threshold: float | None = None,
    ) -> list[list[Hit]]:
        self.queries += len(queries)
        return self.inner.search(queries, k, leak_texts=leak_texts, leak_threshold=leak_threshold)

    def memories(self, ref_ids: Sequence[int]) -> Memories:
        self.memories_loaded += len(ref_ids)
        return self.inner.memories(ref_ids)


def make_prompts(tokenizer: Any, texts: Sequence[str], count: int, tokens: int) -> list[str]:
    """`count` distinct prompts of `tokens` tokens each (as the tokenizer reads them back), cut
    from consecutive windows of the texts joined end to end."""
    ids: list[int] = []
    sep = tokenizer("\n\n", add_special_tokens=False).input_ids
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False).input_ids + sep
        if len(ids) >= count * (tokens + 8):
            break
    prompts = []
    start = 0
    while len(prompts) < count and start + tokens <= len(ids):
        window = ids[start : start + tokens]
        text = tokenizer.decode(window, skip_special_tokens=True)
        # decoding and re-encoding may merge tokens differently: trim until the length fits
        while len(tokenizer(text, add_special_tokens=True).input_ids) > tokens and window:
            window = window[:-1]
            text = tokenizer.decode(window, skip_special_tokens=True)
        if text.strip():
            prompts.append(text)
        start += tokens
    if len(prompts) < count:
        raise ValueError(
            f"the texts give only {len(prompts)} prompts of {tokens} tokens, {count} needed: give more text"
        )
    return prompts


def _settings(config: SpeedConfig, caches: Sequence[str]) -> list[tuple[str, str | None]]:
    """(mode, cache) pairs to run: "none" needs no retriever, RAG reads no memories (it runs
    with the first cache's retriever), memory runs once per cache."""
    out: list[tuple[str, str | None]] = []
    for mode in config.modes:
        if mode == "none":
            out.append(("none", None))
        elif mode == "rag" and caches:
            out.append(("rag", caches[0]))
        elif mode == "memory":
            out += [("memory", c) for c in caches]
    return out


def _counting_retrievers(
    retrievers: RetrieverFactory, config: SpeedConfig
) -> tuple[dict[str, CountingRetriever], dict[str, str]]:
    """The retriever of each cache setting, counting what it serves, and the settings that cannot
    be served here, with why."""
    found: dict[str, CountingRetriever] = {}
    skipped: dict[str, str] = {}
    if any(m != "none" for m in config.modes):
        for c in config.caches:
            r = retrievers(c)
            if r is None:
                skipped[c] = (
                    "no retriever for this cache setting (the cold cache needs a memory bank: --store)"
                )
            else:
                found[c] = CountingRetriever(r)
    return found, skipped


def _timed_generate(
    generator: Generator,
    batch: list[str],
    mode: str,
    r: CountingRetriever | None,
    gen_cfg: GenerationConfig,
    k: int,
) -> tuple[list[Any], float]:
    """One batch generated in one setting, its retriever's counters reset: outputs, wall seconds."""
    if r is not None:
        generator.set_retriever(r)  # type: ignore[arg-type]
        r.queries = r.memories_loaded = 0
    t0 = time.perf_counter()
    outs = generator.generate(batch, mode, gen_cfg, k=k, chat=False)  # type: ignore[arg-type]
    return outs, time.perf_counter() - t0


def _run_figures(
    generator: Generator, outs: list[Any], wall: float, B: int, r: CountingRetriever | None
) -> dict[str, float]:
    """What one measured run of a batch of B gives, from its outputs and the generator's timing."""
    tm = generator.timing
    n_new = min(len(o.token_ids) for o in outs)
    return {
        "wall_s": wall,
        "throughput": throughput(B, n_new, wall),
        "ttft_s": tm.first_token_s,
        "decode_tokens_per_s": B * (n_new - 1) / tm.decode_s if tm.decode_s else float("nan"),
        "retrieval_s": tm.retrieval_s,
        "prefill_s": tm.prefill_s,
        "prompt_tokens": sum(o.prompt_tokens for o in outs) / B,
        "retrievals_per_sequence": (r.queries / B) if r is not None else 0.0,
        "memories_loaded": float(r.memories_loaded) if r is not None else 0.0,
        "new_tokens": float(n_new),
    }


def _setting_row(mode: str, cache: str | None, B: int, rs: list[dict[str, float]]) -> dict[str, Any]:
    """One setting at one batch size over its measured runs: spreads of the timings, medians of
    the rest."""
    row: dict[str, Any] = {"mode": mode, "cache": cache or "-", "batch": B}
    for key in ("throughput", "ttft_s", "decode_tokens_per_s", "wall_s"):
        row[key] = asdict(Spread.of([x[key] for x in rs]))
    for key in (
        "retrieval_s",
        "prefill_s",
        "prompt_tokens",
        "retrievals_per_sequence",
        "memories_loaded",
        "new_tokens",
    ):
        row[key] = statistics.median(x[key] for x in rs)
    log.info(
        "B=%d %s/%s: %.1f tok/s, TTFT %.3fs",
        B,
        mode,
        cache or "-",
        row["throughput"]["median"],
        row["ttft_s"]["median"],
    )
    return row


def bench_speed(
    generator: Generator,
    prompts: Sequence[str],
    retrievers: RetrieverFactory,
    config: SpeedConfig = SpeedConfig(),
    progress: bool = False,
) -> dict[str, Any]:
    """Measure every (mode, cache) setting at every batch size; returns rows and ratios (JSON).

    prompts: at least max(batch_sizes) prompts of `config.prompt_tokens` tokens (`make_prompts`);
    retrievers: cache name -> retriever, or None when that setting cannot be served here.
    """
    need = max(config.batch_sizes)
    if len(prompts) < need:
        raise ValueError(f"{len(prompts)} prompts given, batch size {need} needs {need}")
    found, skipped = _counting_retrievers(retrievers, config)
    settings = _settings(config, list(found))
    gen_cfg = GenerationConfig(max_new_tokens=config.new_tokens, ignore_eos=True)
    lens = [len(generator.tokenizer(p, add_special_tokens=True).input_ids) for p in prompts[:need]]

    from tqdm.auto import tqdm

    rows: list[dict[str, Any]] = []
    warmups = len(config.batch_sizes) if config.warmup == "each" else 1
    bar = tqdm(
        total=(len(config.batch_sizes) * config.runs + warmups) * len(settings),
        desc="bench speed",
        unit="run",
        disable=not progress,
    )
    for bi, B in enumerate(config.batch_sizes):
        batch = list(prompts[:B])
        runs: dict[tuple[str, str | None], list[dict[str, float]]] = {s: [] for s in settings}
        first = 0 if (config.warmup == "each" or bi == 0) else 1
        for rnd in range(first, config.runs + 1):
            for mode, cache in settings:
                r = found[cache] if cache is not None else None
                outs, wall = _timed_generate(generator, batch, mode, r, gen_cfg, config.k)
                bar.update(1)
                if rnd == 0:
                    continue  # warm-up: first use of kernels, caches and the embedder
                runs[(mode, cache)].append(_run_figures(generator, outs, wall, B, r))
        rows += [_setting_row(mode, cache, B, rs) for (mode, cache), rs in runs.items()]
    bar.close()
    return {
        "config": asdict(config),
        "prompt_tokens_mean": sum(lens) / len(lens),
        "skipped": skipped,
        "rows": rows,
        "ratios": ratios(rows),
    }


def round_ratios(a: dict[str, Any], b: dict[str, Any]) -> list[float]:
    """a/b within each round, from two settings' per-round figures (`{"runs": [...]}`)."""
    if len(a["runs"]) != len(b["runs"]):
        raise ValueError(f"{len(a['runs'])} rounds against {len(b['runs'])}: not one run's rounds")
    return [x / y for x, y in zip(a["runs"], b["runs"], strict=True)]


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The median over rounds of a/b within each round. Every round runs every setting one after
    the other, so on a shared machine whose speed drifts this compares runs made under the same
    load, where the ratio of the two medians can pair a fast run of one with a slow run of the
    other."""
    return statistics.median(round_ratios(a, b))


def ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The headline: memory vs RAG and memory vs no retrieval, per batch size and cache (medians)."""
    by = {(r["mode"], r["cache"], r["batch"]): r for r in rows}
    out = []
    for (mode, cache, B), r in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        if mode != "memory":
            continue
        row: dict[str, Any] = {"batch": B, "cache": cache}
        rag = next((v for (m, _, b), v in by.items() if m == "rag" and b == B), None)
        none = by.get(("none", "-", B))
        if rag is not None:
            row["throughput_memory_over_rag"] = r["throughput"]["median"] / rag["throughput"]["median"]
            row["ttft_memory_over_rag"] = r["ttft_s"]["median"] / rag["ttft_s"]["median"]
        if none is not None:
            row["throughput_memory_over_none"] = r["throughput"]["median"] / none["throughput"]["median"]
            row["throughput_memory_over_none_paired"] = paired_ratio(r["throughput"], none["throughput"])
            row["decode_memory_over_none"] = (
                r["decode_tokens_per_s"]["median"] / none["decode_tokens_per_s"]["median"]
            )
        out.append(row)
    return out
