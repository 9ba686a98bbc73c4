"""Generation with explicit memory, without memory, or with RAG, behind one API (docs/design.md, "Reading memories").

Memory mode lays a sequence out as
    [prefix: <s>Reference: at positions 0..p-1] [prompt at positions p+R, p+R+1, …] [pad…]
(R = reference_tokens): every retrieved memory was written at positions p..p+R-1, so all of them
share that interval. Every prompt of a batch starts right after the prefix, so their 64-token
chunks line up; shorter prompts are padded on the right, and the padding is masked. Each chunk
retrieves its own memories with its own text and reads only those. Prefill runs chunk by chunk
through the KV cache (`prefill_chunks`): the prefix first (computed once per Generator and copied
into every row), then each chunk's memories are copied into the cache's memory slots and its
tokens read them beside the context so far, so no query is ever scored against another chunk's
memories. While decoding, the first 64 generated tokens keep the last prompt chunk's memories;
after every 64 generated tokens the memories are replaced by those retrieved with these tokens.
The "none" and "rag" modes pad on the left.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from memory3 import kernels
from memory3.config import GenerationConfig, MemoryConfig
from memory3.decoding import DecodingSequence, StreamEvent, sample
from memory3.memory import layout
from memory3.memory.write import Memories, MemoryFormatError, memory_fingerprint, reference_prefix_ids
from memory3.model import KVCache, Memory3Model, resolve_kv_dtype
from memory3.retrieval.base import Hit, Retriever, above_floor, check_min_score

log = logging.getLogger(__name__)

Mode = Literal["memory", "none", "rag"]
MODES: tuple[str, ...] = ("memory", "none", "rag")

RAG_TEMPLATE = "{references}\n\n{prompt}"
RAG_REFERENCE = "Reference: {text}"


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: Literal["stop", "length"]
    # memory: the hits read by each chunk (prompt chunks, then decoded chunks); rag: one list
    references: list[list[Hit]] = field(default_factory=list)


@dataclass
class Timing:
    """Wall-clock split of the last call, for benchmarks."""

    retrieval_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    first_token_s: float = 0.0
    generated_tokens: int = 0  # tokens kept in the outputs (stop tokens and finished rows excluded)
    decode_steps: int = 0  # forward passes of the batch after the first token


@dataclass
class _Prompt:
    ids: list[int]
    queries: list[str]  # one retrieval query per 64-token chunk ("" = reuse the previous chunk's hits)
    text: str


def rag_prompt(prompt: str, hits: Sequence[Hit]) -> str:
    """The RAG baseline: the same references' text put in front of the prompt."""
    refs = "\n\n".join(RAG_REFERENCE.format(text=h.text.strip()) for h in hits)
    return RAG_TEMPLATE.format(references=refs, prompt=prompt) if hits else prompt


class Generator:
    """Batched generation for a Memory³ model in three modes: "memory", "none" and "rag".

    >>> gen = Generator(model, tokenizer, retriever=retriever)
    >>> gen.generate(["What is the capital of Wakanda?"], mode="memory")[0].text
    """

    def __init__(
        self,
        model: Memory3Model,
        tokenizer: Any,
        retriever: Retriever | None = None,
        memory_config: MemoryConfig | None = None,
        chat: bool | None = None,
        min_score: float | None = None,
        kv_dtype: str | torch.dtype = "auto",
    ) -> None:
        self.model = model
        self.min_score = check_min_score(min_score)
        # the KV cache's dtype, which memories are read in too (model.resolve_kv_dtype)
        self.kv_dtype = resolve_kv_dtype(kv_dtype, model.dtype, model.device)
        if self.kv_dtype == torch.bfloat16 and model.device.type == "cpu":
            kernels.available()  # build the fused decode kernel now (once per CPU), not in a timed step
        self.tokenizer = tokenizer
        self.mem_cfg = memory_config or MemoryConfig()
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        self.prefix_ids = reference_prefix_ids(tokenizer, model.config.bos_token_id, self.mem_cfg)
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.eos_token_id
        )
        self.eos_ids = {model.config.eos_token_id}
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.retriever: Retriever | None = None
        self._prefix_cache: tuple[Any, list[tuple[Tensor, Tensor]], list[Tensor]] | None = None
        self.timing = Timing()
        if retriever is not None:
            self.set_retriever(retriever)

    # -- set-up ------------------------------------------------------------------------------
    def set_retriever(self, retriever: Retriever) -> None:
        ours = memory_fingerprint(self.model, self.mem_cfg)
        theirs = retriever.memory_fingerprint
        if theirs != ours:
            raise MemoryFormatError(
                f"the memories were written by another model or memory config (fingerprint {theirs}) "
                f"than the one generating ({ours}); rebuild the memory bank with this model "
                f"(`memory3 build --model …`) or load the model that built it"
            )
        self.retriever = retriever

    def _prefix_kv(self) -> list[tuple[Tensor, Tensor]]:
        """The reference prefix's keys and values in every layer, (1, K, p, D) each, in the KV
        cache's dtype. Every memory-mode sequence starts with the same p tokens at positions
        0..p-1, which read no memory, so they are computed once rather than in every prefill;
        again when the prefix, the model's config, device or dtype, or its weights change: a
        parameter replaced, or changed in place through autograd-visible ops (an optimizer step,
        load_state_dict, merging LoRA), which bump its version counter. Edits through `.data` or
        a module's plain attributes (a LoRA scale) are not seen: build a new Generator after
        those."""
        params = list(self.model.parameters())
        try:
            versions = tuple((id(t), t._version) for t in params)
            key: Any = (
                versions,
                tuple(self.prefix_ids),
                self.model.config,
                self.model.device,
                self.model.dtype,
                self.kv_dtype,
            )
        except RuntimeError:  # weights made under inference_mode keep no version: never reuse
            key = None
        if key is not None and self._prefix_cache is not None and self._prefix_cache[0] == key:
            return self._prefix_cache[1]
        p = len(self.prefix_ids)
        cache = KVCache(self.model.config, 1, p, 0, self.model.device, self.kv_dtype)
        ids = torch.tensor([self.prefix_ids], dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            self.model(ids, cache=cache, return_hidden=True)
        kv = [(k[:, :, :p].clone(), v[:, :, :p].clone()) for k, v in zip(cache.k, cache.v, strict=True)]
        # the parameters are held with the key, so that no new tensor can take a freed one's id
        self._prefix_cache = None if key is None else (key, kv, params)
        return kv

    # -- public API --------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str],
        mode: Mode = "memory",
        config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> list[GenerationOutput]:
        """Generate for a batch of prompts. kwargs: `k` (memories per chunk), `leak_threshold`,
        `min_score` (this call's relevance floor, instead of the generator's), `chat`, `queries`
        (override the retrieval query of the first chunk of each prompt)."""
        outputs: list[GenerationOutput] = []
        for event in self._run(prompts, mode, config or GenerationConfig(), stream=False, **kwargs):
            if isinstance(event, list):
                outputs = event
        return outputs

    def events(
        self,
        prompts: str | Sequence[str],
        mode: Mode = "memory",
        config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> Iterator[StreamEvent | list[GenerationOutput]]:
        """`stream`'s events, then the list of final outputs (token ids, references) as the last item."""
        return self._run(prompts, mode, config or GenerationConfig(), stream=True, **kwargs)

    def stream(
        self,
        prompts: str | Sequence[str],
        mode: Mode = "memory",
        config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> Iterator[StreamEvent]:
        """Yield text deltas as they are generated; the last event of each prompt has a finish
        reason. Stop strings are never emitted (text that could begin one is held back)."""
        for event in self._run(prompts, mode, config or GenerationConfig(), stream=True, **kwargs):
            if isinstance(event, StreamEvent):
                yield event

    # -- prompt preparation ------------------------------------------------------------------
    def _encode_prompt(self, prompt: str, chat: bool) -> _Prompt:
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("empty prompt: give some text to continue or a question to answer")
        if chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            start = text.rfind(prompt)
            content = (start, start + len(prompt))
        else:
            text, content = prompt, (0, len(prompt))
        enc = self.tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
        ids, offsets = enc.input_ids, enc.offset_mapping
        # A chunk's query is the user's text inside it; template-only chunks reuse the last hits.
        n = self.mem_cfg.chunk_tokens
        queries = []
        for c in range(0, len(ids), n):
            spans = [(a, b) for a, b in offsets[c : c + n] if b > a and a >= content[0] and b <= content[1]]
            queries.append(text[spans[0][0] : spans[-1][1]].strip() if spans else "")
        if not queries[0]:
            queries[0] = prompt
        return _Prompt(ids=list(ids), queries=queries, text=text)

    def _check_length(self, prompts: list[_Prompt], mode: Mode, max_new: int) -> int:
        limit = self.model.config.context_limit
        offset = (
            layout.text_start(len(self.prefix_ids), self.mem_cfg.reference_tokens) if mode == "memory" else 0
        )
        longest = max(len(p.ids) for p in prompts)
        if offset + longest >= limit:
            raise ValueError(
                f"prompt of {longest} tokens does not fit the context of {limit} tokens"
                + (f" ({offset} positions are taken by the reference prefix and memories)" if offset else "")
                + "; shorten the prompt"
            )
        if offset + longest + max_new > limit:
            log.warning(
                "max_new_tokens cut from %d to %d to fit the context", max_new, limit - offset - longest
            )
        return min(max_new, limit - offset - longest)

    # -- retrieval -----------------------------------------------------------------------------
    def _search(
        self, queries: list[str], k: int, leak_threshold: float | None, min_score: float | None
    ) -> list[list[Hit]]:
        """Top-k hits per query, leak-filtered; hits scoring below `min_score` are dropped, so a
        query with nothing relevant reads fewer memories (or none) rather than unrelated ones."""
        if self.retriever is None:
            raise ValueError(
                "mode 'memory' and 'rag' need a retriever: pass one to Generator(…, retriever=…)"
            )
        t0 = time.perf_counter()
        hits = self.retriever.search(
            queries,
            k,
            leak_texts=queries if leak_threshold is not None else None,
            leak_threshold=leak_threshold,
        )
        hits = above_floor(hits, min_score)
        self.timing.retrieval_s += time.perf_counter() - t0
        return hits

    def _fetch(self, hit_lists: list[list[Hit]], k: int) -> tuple[Memories, Tensor]:
        """The memories of every hit, once each, on the model's device, and for each list of
        hits its rows in them: index (G, k), -1 where fewer than k were found."""
        assert self.retriever is not None
        t0 = time.perf_counter()
        unique = sorted({h.ref_id for hits in hit_lists for h in hits})
        index = torch.full((len(hit_lists), k), -1, dtype=torch.long)
        if unique:
            mem = self.retriever.memories(unique)
            self._check_memories(mem, len(unique))
        else:  # nothing retrieved at all: zero memories of the right shape
            cfg = self.model.config
            shape = (0, cfg.n_memory_layers, cfg.n_kv_head, self.mem_cfg.kept_tokens, cfg.head_dim)
            mem = Memories(
                torch.zeros(shape), torch.zeros(shape), torch.zeros(shape[:4], dtype=torch.int32), ""
            )
        row = {rid: i for i, rid in enumerate(unique)}
        for g, hits in enumerate(hit_lists):
            for j, h in enumerate(hits[:k]):
                index[g, j] = row[h.ref_id]
        mem = mem.to(device=self.model.device, dtype=self.kv_dtype)
        self.timing.retrieval_s += time.perf_counter() - t0
        return mem, index

    def _check_memories(self, mem: Memories, n: int) -> None:
        cfg = self.model.config
        want = (n, cfg.n_memory_layers, cfg.n_kv_head, self.mem_cfg.kept_tokens, cfg.head_dim)
        if tuple(mem.k.shape) != want:
            raise MemoryFormatError(
                f"retrieved memories have shape {tuple(mem.k.shape)} but this model and memory "
                f"config read (M, Lm, K, S, D) = {want}; rebuild the memory bank with this model"
            )
        if not mem.k.is_floating_point():
            raise MemoryFormatError(f"memories must be floating point, got {mem.k.dtype}")

    # -- the loop ------------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(
        self,
        prompts: str | Sequence[str],
        mode: Mode,
        gen: GenerationConfig,
        stream: bool,
        k: int | None = None,
        leak_threshold: float | None = None,
        chat: bool | None = None,
        queries: Sequence[str] | None = None,
        min_score: float | None = None,
    ) -> Iterator[StreamEvent | list[GenerationOutput]]:
        """Prefill every prompt in `mode`, then decode the batch step by step: each step samples a
        token per sequence, which `DecodingSequence.take` checks against EOS and the stop strings; every
        `chunk_tokens` generated tokens, memory mode retrieves the memories the next chunk reads."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        k = self.mem_cfg.memories_per_chunk if k is None else k
        if mode != "none" and k < 1:
            raise ValueError(f"k (references per retrieval) must be ≥ 1, got {k}")
        chat = self.chat if chat is None else chat
        floor = self.min_score if min_score is None else check_min_score(min_score)
        self.timing = Timing()
        t_start = time.perf_counter()
        refs: list[list[list[Hit]]] = [[] for _ in prompts]
        if mode == "rag":
            hits = self._search(list(queries or prompts), k, leak_threshold, floor)
            prompts = [rag_prompt(p, h) for p, h in zip(prompts, hits, strict=True)]
            refs = [[h] for h in hits]
        enc = [self._encode_prompt(p, chat) for p in prompts]
        if queries is not None and mode == "memory":
            for e, q in zip(enc, queries, strict=True):
                e.queries[0] = q
        max_new = self._check_length(enc, mode, gen.max_new_tokens)
        logits, cache, next_pos, prompt_refs = self._prefill(enc, mode, k, max_new, leak_threshold, floor)
        if mode == "memory":
            refs = prompt_refs

        g = torch.Generator(device="cpu")
        if gen.seed is not None:
            g.manual_seed(gen.seed)
        else:
            g.seed()  # unseeded sampling differs from call to call
        seqs = [DecodingSequence(len(e.ids)) for e in enc]
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
        hold = max((len(s) for s in gen.stop), default=0)
        step_valid = torch.ones(len(enc), 1, dtype=torch.bool, device=self.model.device)
        t_dec = time.perf_counter()
        for step in range(max_new):
            tok = sample(logits.float(), gen, g).tolist()
            if step == 0:
                self.timing.first_token_s = time.perf_counter() - t_start
            last_step = step == max_new - 1
            for b, seq in enumerate(seqs):
                event = seq.take(tok[b], b, self.eos_ids, gen, stream, last_step, hold, decode)
                if event is not None:
                    yield event
            if all(q.done for q in seqs) or last_step:
                break
            if mode == "memory" and (step + 1) % self.mem_cfg.chunk_tokens == 0:
                self._retrieve_while_decoding(seqs, refs, cache, k, leak_threshold, floor)
            feed = torch.tensor([[t] for t in tok], device=self.model.device)
            logits = self.model(feed, next_pos[:, None], token_valid=step_valid, cache=cache, last_only=True)[
                :, -1
            ]
            next_pos += 1
            self.timing.decode_steps += 1
        self.timing.decode_s = time.perf_counter() - t_dec
        self.timing.generated_tokens = sum(len(q.out) for q in seqs)
        yield [
            GenerationOutput(
                q.text if (gen.stop or stream) else decode(q.out), q.out, q.prompt_tokens, q.finish, r
            )
            for q, r in zip(seqs, refs, strict=True)
        ]

    def _prefill(
        self, enc: list[_Prompt], mode: Mode, k: int, max_new: int, leak: float | None, floor: float | None
    ) -> tuple[Tensor, KVCache, Tensor, list[list[list[Hit]]]]:
        """Lay the prompts out and run them: memory mode puts [prefix][prompt][pad…] at positions
        0..p and p+R.. (chunks line up), reading each chunk's memories; none/rag left-pad. Returns
        the last logits, the cache, each row's next position, and the hits the prompts read."""
        model, device = self.model, self.model.device
        B, lens = len(enc), [len(e.ids) for e in enc]
        n_max = max(lens)
        p = len(self.prefix_ids) if mode == "memory" else 0
        T = p + n_max
        first_pos = layout.text_start(p, self.mem_cfg.reference_tokens) if mode == "memory" else 0
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        for b, e in enumerate(enc):
            start = 0 if mode == "memory" else n_max - lens[b]
            ids[b, start : start + p] = torch.tensor(self.prefix_ids[:p], dtype=torch.long)
            ids[b, start + p : start + p + lens[b]] = torch.tensor(e.ids)
            pos[b, start : start + p] = torch.arange(p)
            pos[b, start + p : start + p + lens[b]] = torch.arange(first_pos, first_pos + lens[b])
            valid[b, start : start + p + lens[b]] = True
        ids, pos, valid = ids.to(device), pos.to(device), valid.to(device)
        slots = k * self.mem_cfg.kept_tokens if mode == "memory" else 0
        cache = KVCache(model.config, B, T + max_new, slots, device, self.kv_dtype)
        refs: list[list[list[Hit]]] = [[] for _ in range(B)]
        t0 = time.perf_counter()
        if mode == "memory":
            mem, index, refs = self._prompt_memories(enc, k, leak, floor)
            t0 = time.perf_counter()
            if p:
                cache.write_prefix(self._prefix_kv())
            last_col = torch.tensor([p + L - 1 for L in lens], device=device)
            logits = prefill_chunks(
                model, ids, pos, valid, mem, index, last_col, p, self.mem_cfg.chunk_tokens, cache
            )
            self.timing.prefill_s = time.perf_counter() - t0
            # the first decoded chunk keeps reading the memories of its prompt's last chunk
            last = index[torch.arange(B), torch.tensor([len(e.queries) - 1 for e in enc])]
            layout.into_cache(mem, last, cache)
        else:
            logits = model(ids, pos, token_valid=valid, cache=cache, last_only=True)[:, -1]
            self.timing.prefill_s = time.perf_counter() - t0
        return logits, cache, torch.tensor([first_pos + n for n in lens], device=device), refs

    def _retrieve_while_decoding(
        self,
        seqs: list[DecodingSequence],
        refs: list[list[list[Hit]]],
        cache: KVCache,
        k: int,
        leak: float | None,
        floor: float | None,
    ) -> None:
        """Drop the memories the last chunk read and put in those retrieved with its 64 generated
        tokens (the paper, §3.1); finished sequences read nothing."""
        n = self.mem_cfg.chunk_tokens
        texts = {
            b: self.tokenizer.decode(q.out[-n:], skip_special_tokens=True)
            for b, q in enumerate(seqs)
            if not q.done
        }
        for b, hits in self.swap_memories(texts, len(seqs), cache, k, leak, floor).items():
            refs[b].append(hits)

    def swap_memories(
        self,
        texts: dict[int, str],
        batch: int,
        cache: KVCache,
        k: int,
        leak: float | None,
        floor: float | None,
    ) -> dict[int, list[Hit]]:
        """Replace the memories the cache's rows read: row b reads those retrieved with texts[b],
        the rows not in `texts` read none. Returns each row's hits."""
        rows = list(texts)
        found = self._search([texts[b] if texts[b].strip() else " " for b in rows], k, leak, floor)
        hits: list[list[Hit]] = [[] for _ in range(batch)]
        for b, h in zip(rows, found, strict=True):
            hits[b] = h
        layout.into_cache(*self._fetch(hits, k), cache)
        return dict(zip(rows, found, strict=True))

    def _prompt_memories(
        self, enc: list[_Prompt], k: int, leak: float | None, min_score: float | None
    ) -> tuple[Memories, Tensor, list[list[list[Hit]]]]:
        """The memories of every prompt chunk, fetched once: `mem`, and index (B, C, k) into it,
        row -1 where a prompt has fewer than C chunks or a chunk fewer than k hits; and the hits
        each prompt's chunks read."""
        B = len(enc)
        C = max(len(e.queries) for e in enc)
        # retrieve for every chunk that has text of its own; the others reuse the previous hits
        flat = [(b, c) for b, e in enumerate(enc) for c, q in enumerate(e.queries) if q]
        found = self._search([enc[b].queries[c] for b, c in flat], k, leak, min_score)
        by_chunk: dict[tuple[int, int], list[Hit]] = dict(zip(flat, found, strict=True))
        for b, e in enumerate(enc):
            for c in range(C):
                if c >= len(e.queries):
                    by_chunk[(b, c)] = []
                elif (b, c) not in by_chunk:
                    by_chunk[(b, c)] = by_chunk[(b, c - 1)]
        refs = [[by_chunk[(b, c)] for c in range(len(e.queries))] for b, e in enumerate(enc)]
        mem, index = self._fetch([by_chunk[(b, c)] for b in range(B) for c in range(C)], k)
        return mem, index.view(B, C, k), refs


def prefill_chunks(
    model: Memory3Model,
    ids: Tensor,
    pos: Tensor,
    valid: Tensor,
    mem: Memories,
    index: Tensor,
    last: Tensor,
    p: int,
    chunk_tokens: int,
    cache: KVCache,
) -> Tensor:
    """Memory-mode prefill (§3.1) of prompts laid out as [prefix (p)][prompt][pad…] (B, T).

    The prefix reads no memory: it goes through the model first, unless the cache already holds
    it (`KVCache.write_prefix`, as `Generator` does with the prefix it computed once). Then chunk
    c of every prompt (columns p + c·n …) reads memories index[:, c] (B, C, J) into `mem`: they
    are copied into the cache's memory slots and the chunk's tokens read them beside the context
    so far. No query is scored against another chunk's memories. Returns the logits (B, V) at
    columns `last` (B,), each prompt's last token."""
    B, T = ids.shape
    if bool((last < p).any()) or bool((last >= T).any()):
        raise ValueError(
            f"every prompt needs at least one token after the {p}-token prefix, within {T} columns"
        )
    if cache.len == 0 and p:
        cache.clear_memory()
        model(ids[:, :p], pos[:, :p], token_valid=valid[:, :p], cache=cache, return_hidden=True)
    elif cache.len != p:
        raise ValueError(
            f"the KV cache holds {cache.len} tokens: prefill_chunks starts from an empty cache "
            f"or from one holding just the {p}-token prefix"
        )
    hidden = torch.empty(B, model.config.hidden_size, device=ids.device, dtype=model.dtype)
    for c, start in enumerate(range(p, T, chunk_tokens)):
        end = min(start + chunk_tokens, T)
        layout.into_cache(mem, index[:, c], cache)
        cols = slice(start, end)
        h = model(ids[:, cols], pos[:, cols], token_valid=valid[:, cols], cache=cache, return_hidden=True)
        rows = ((last >= start) & (last < end)).nonzero().flatten()
        hidden[rows] = h[rows, last[rows] - start]
    return model.lm_head(hidden)
