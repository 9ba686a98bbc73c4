"""memory3 as an lm-evaluation-harness model: standard tasks with explicit memory, without, or
with RAG (the paper's §7 reports its general benchmarks with and without memory).

    memory3 lm-eval --model memory3 --model_args pretrained=smollm2-135m-instruct-memory3,store=bank,mode=memory \\
        --tasks arc_easy,hellaswag

`memory3 lm-eval` is lm-eval's own command line with this model registered as `memory3` and the
tasks memory3 ships (`memory3_qa`) on its task path; from Python, import this module and pass
`model="memory3"` (or a `Memory3LM`) to `lm_eval.simple_evaluate`.

Model arguments: `pretrained` (a model name, checkpoint or adapter directory), `store` (a bank)
or `kb` (a text/JSONL file written to memory on the fly), `mode` (memory, none, rag), `k`,
`min_score`, `leak_threshold` (default: the evaluation's 2/3 overlap filter, as `memory3 eval
qa`), `batch_size`, `max_gen_toks`, `chat` (apply the model's chat template in generate_until;
default: when the tokenizer has one, as `memory3 eval qa`), `device`, `dtype`, `embedder`.

- generate_until: `Generator.generate`, in the order given, `batch_size` prompts at a time; the
  same answers as `memory3 eval qa` for the same questions and settings.
- loglikelihood: `memory3.scoring.score` (no chat template), memories retrieved as generation
  retrieves them.
- loglikelihood_rolling: windows of the model's context; in memory mode every 64 tokens read the
  memories retrieved with the 64 before them. RAG has no prompt to retrieve with there and is
  refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from memory3.config import GenerationConfig
from memory3.errors import InputError
from memory3.generate import MODES, Generator
from memory3.retrieval.leak import EVAL_THRESHOLD
from memory3.scoring import score

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent.parent / "assets" / "lm_eval"


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("memory3")
class Memory3LM(LM):
    """An lm-evaluation-harness model over a memory3 `Generator` (built from the arguments, or
    given as `generator=` from Python)."""

    def __init__(
        self,
        pretrained: str | None = None,
        store: str | None = None,
        kb: str | None = None,
        mode: str = "memory",
        k: int | None = None,
        min_score: float | None = None,
        leak_threshold: float | str | None = EVAL_THRESHOLD,
        batch_size: int | str = 8,
        max_gen_toks: int = 48,
        chat: bool | str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        embedder: str = "minilm",
        generator: Generator | None = None,
        max_batch_size: int | None = None,  # lm-eval passes it; batches are `batch_size` prompts
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            log.warning("memory3 model: arguments %s are not used", sorted(unused))
        if mode not in MODES:
            raise InputError(f"mode={mode!r}: give one of {', '.join(MODES)}")
        self.mode = mode
        self.k = int(k) if k is not None else None
        self.min_score = float(min_score) if min_score is not None else None
        none = leak_threshold is None or str(leak_threshold).lower() == "none"
        self.leak = None if none else float(leak_threshold)  # type: ignore[arg-type]
        self.batch = 8 if str(batch_size).startswith("auto") else int(batch_size)  # "auto[:N]": 8
        self.max_gen_toks = int(max_gen_toks)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval passes its own default, "cuda", whatever the machine has
            log.warning("device %s asked for but CUDA is not available: running on the CPU", device)
            device = "cpu"
        self.gen = (
            generator
            if generator is not None
            else _generator(pretrained, store, kb, mode, device, dtype, embedder)
        )
        self.chat = self.gen.chat if chat is None else _flag(chat)
        if mode != "none" and self.gen.retriever is None:
            raise InputError(f"mode={mode} needs memories: give store=BANK or kb=FILE in --model_args")

    # -- lm-eval's interface ------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.gen.tokenizer, "name_or_path", "memory3"))

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        raise InputError(
            "memory3 applies the model's chat template itself in generate_until (model_args chat=true, "
            "the default where the tokenizer has one): run without --apply_chat_template"
        )

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            context, continuation = req.args
            s = score(self.gen, context, continuation, self.mode, self.k, self.leak, self.min_score)  # type: ignore[arg-type]
            out.append((s.total, s.is_greedy))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        if self.mode == "rag":
            raise InputError(
                "mode=rag has no prompt to retrieve with in a rolling log-likelihood; use mode=memory "
                "(every 64 tokens read the memories retrieved with the 64 before) or mode=none"
            )
        offset = self._memory_offset()
        limit = self.gen.model.config.context_limit - offset - 1
        prefix = self.gen.model.config.bos_token_id
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            ids = self.gen.tokenizer(text, add_special_tokens=False).input_ids
            windows = map(
                make_disjoint_window,
                get_rolling_token_windows(ids, prefix_token=prefix, max_seq_len=limit, context_len=1),
            )
            total = 0.0
            for ctx, cont in windows:
                total += score(
                    self.gen, list(ctx), list(cont), self.mode, self.k, self.leak, self.min_score
                ).total  # type: ignore[arg-type]
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out: list[str] = []
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for start in range(0, len(requests), self.batch):
            group = requests[start : start + self.batch]
            # one batch shares its generation settings: split where they change
            by_settings: dict[tuple, list[int]] = {}
            for i, req in enumerate(group):
                by_settings.setdefault(self._settings(req.args[1]), []).append(i)
            texts: list[str] = [""] * len(group)
            for (until, max_new), idx in by_settings.items():
                config = GenerationConfig(max_new_tokens=max_new, stop=until)
                outs = self.gen.generate(
                    [group[i].args[0] for i in idx],
                    self.mode,  # type: ignore[arg-type]
                    config,
                    k=self.k,
                    leak_threshold=self.leak,
                    min_score=self.min_score,
                    chat=self.chat,
                )
                for i, o in zip(idx, outs, strict=True):
                    texts[i] = o.text
            out.extend(texts)
            bar.update(len(group))
        bar.close()
        return out

    # -- helpers ------------------------------------------------------------------------------
    def _settings(self, kwargs: dict[str, Any]) -> tuple[tuple[str, ...], int]:
        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None) or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
            raise InputError(
                "memory3's lm-eval model decodes greedily; remove do_sample/temperature from the task"
            )
        return until, max_new

    def _memory_offset(self) -> int:
        from memory3.memory import layout

        if self.mode != "memory":
            return 0
        return layout.text_start(len(self.gen.prefix_ids), self.gen.mem_cfg.reference_tokens)


def _generator(
    pretrained: str | None,
    store: str | None,
    kb: str | None,
    mode: str,
    device: str,
    dtype: str,
    embedder: str,
) -> Generator:
    from memory3.checkpoint import load_pretrained
    from memory3.retrieval.open import open_retriever
    from memory3.shipped import default_model

    loaded = load_pretrained(pretrained or default_model(), device=device, dtype=getattr(torch, dtype))
    retriever, mem_cfg = (None, loaded.memory_config)
    if store or kb:
        retriever, mem_cfg = open_retriever(loaded, store, kb, embedder)
    return Generator(loaded.model, loaded.tokenizer, retriever, mem_cfg)
