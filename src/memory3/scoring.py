"""Scoring a given continuation as generation would read it: the log-likelihood of each of its
tokens in one of the three modes, for `lm-evaluation-harness` (memory3.eval.harness) and for
anyone who ranks answers rather than generating them.

The continuation is teacher-forced through the same steps `Generator` takes:

- the context is the prompt: laid out and prefilled as `Generator` does, each 64-token chunk
  reading the memories retrieved with its own text ("memory"), or the references retrieved with
  it put in front ("rag");
- continuation token i is fed where generation would feed generated token i: the first 63 read
  the memories of the context's last chunk, and after every 64 tokens the memories retrieved with
  those 64 tokens replace them, exactly where decoding retrieves. The tokens between two
  retrievals go through the model in one pass rather than one by one (same result up to rounding).

So a token is never scored with memories retrieved using itself or a later token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memory3.generate import Generator, Mode, _Prompt, rag_prompt
from memory3.retrieval.base import Hit, check_min_score


@dataclass
class Scored:
    """Per continuation token: its log-probability and whether it was the greedy choice; the
    references read (context chunks, then one list per retrieval while scoring)."""

    logprobs: list[float]
    greedy: list[bool]
    references: list[list[Hit]] = field(default_factory=list)

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def is_greedy(self) -> bool:
        return all(self.greedy)


def split_context(tokenizer: object, context: str, continuation: str) -> tuple[str, list[int], list[int]]:
    """The context text and the token ids of context and continuation, tokenized together (as
    lm-evaluation-harness does): spaces ending the context move to the continuation, and the
    continuation's ids are the joint encoding's after the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer(context + continuation).input_ids  # type: ignore[operator]
    ctx = tokenizer(context).input_ids if context else []  # type: ignore[operator]
    return context, whole[: len(ctx)], whole[len(ctx) :]


@torch.inference_mode()
def score(
    gen: Generator,
    context: str | list[int],
    continuation: str | list[int],
    mode: Mode = "memory",
    k: int | None = None,
    leak_threshold: float | None = None,
    min_score: float | None = None,
) -> Scored:
    """Log-likelihood of `continuation` after `context` (texts, or token ids: the context's chunk
    queries are then their decoded text). No chat template: the text is scored as given."""
    k = gen.mem_cfg.memories_per_chunk if k is None else k
    floor = gen.min_score if min_score is None else check_min_score(min_score)
    tok = gen.tokenizer
    refs: list[list[Hit]] = []
    if mode == "rag":
        if not isinstance(context, str):
            raise ValueError("mode 'rag' retrieves with the context's text: give it as a string")
        hits = gen._search([context], k, leak_threshold, floor)[0]
        context, refs = rag_prompt(context, hits), [hits]
    if isinstance(context, str) and isinstance(continuation, str):
        context, ctx_ids, cont_ids = split_context(tok, context, continuation)
    else:
        ctx_ids = list(context) if not isinstance(context, str) else tok(context).input_ids
        cont_ids = list(continuation) if not isinstance(continuation, str) else tok(continuation).input_ids
    if not cont_ids:
        raise ValueError("an empty continuation has no tokens to score")
    if not ctx_ids:  # a text scored from its start: BOS (or EOS) is its context
        ctx_ids = [gen.model.config.bos_token_id]
    n = gen.mem_cfg.chunk_tokens
    queries = [
        tok.decode(ctx_ids[c : c + n], skip_special_tokens=True).strip() for c in range(0, len(ctx_ids), n)
    ]
    if isinstance(context, str) and context.strip() and mode == "memory":
        prompt = gen._encode_prompt(context, chat=False)  # each chunk's query as generation makes it
        if prompt.ids == ctx_ids:
            queries = prompt.queries
    queries[0] = queries[0] or " "
    enc = [_Prompt(ids=ctx_ids, queries=queries, text="")]
    m = len(cont_ids)
    if gen._check_length(enc, mode, m) < m:
        raise ValueError(
            f"context ({len(ctx_ids)} tokens) and continuation ({m}) do not fit the model's context of "
            f"{gen.model.config.context_limit} tokens"
        )
    logits, cache, next_pos, prompt_refs = gen._prefill(enc, mode, k, m, leak_threshold, floor)
    if mode == "memory":
        refs = prompt_refs[0]
    rows = [logits[0]]
    fed = 0
    while fed < m - 1:
        # generation retrieves before feeding generated token i when (i + 1) % n == 0: the
        # blocks between two retrievals are [0, n-1), [n-1, 2n-1), …
        end = min(m - 1, max(fed + 1, n - 1 if fed == 0 else fed + n))
        if mode == "memory" and fed and (fed + 1) % n == 0:
            query = tok.decode(cont_ids[fed + 1 - n : fed + 1], skip_special_tokens=True)
            refs.append(gen.swap_memories({0: query}, 1, cache, k, leak_threshold, floor)[0])
        block = torch.tensor([cont_ids[fed:end]], device=gen.model.device)
        pos = next_pos[:, None] + torch.arange(end - fed, device=gen.model.device)[None]
        valid = torch.ones_like(block, dtype=torch.bool)
        out = gen.model(block, pos, token_valid=valid, cache=cache)
        rows.extend(out[0])
        next_pos += end - fed
        fed = end
    logp = torch.log_softmax(torch.stack(rows).float(), dim=-1)
    target = torch.tensor(cont_ids, device=logp.device)
    chosen = logp.gather(1, target[:, None])[:, 0]
    greedy = logp.argmax(-1) == target
    return Scored(chosen.tolist(), greedy.tolist(), refs)
