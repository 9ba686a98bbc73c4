"""Decoding one token at a time: sampling, stop strings, and what a streaming sequence may send
so far. Shared by `memory3.generate.Generator` and the server's scheduler."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from memory3.config import GenerationConfig


@dataclass
class StreamEvent:
    index: int  # which prompt of the batch
    delta: str  # new text since the previous event of this prompt
    finish_reason: Literal["stop", "length"] | None = None  # set on the last event of a prompt


@dataclass
class DecodingSequence:
    """One sequence of a batch while it decodes: its tokens, text so far (kept when stop strings
    or streaming need it), how much of it was streamed, and how it finished."""

    prompt_tokens: int
    out: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    done: bool = False
    finish: Literal["stop", "length"] = "length"

    def take(
        self,
        token: int,
        row: int,
        eos_ids: Sequence[int],
        gen: GenerationConfig,
        stream: bool,
        last_step: bool,
        hold: int,
        decode: Callable[[list[int]], str],
    ) -> StreamEvent | None:
        """Add a sampled token: EOS or a stop string ends the sequence; in streaming, returns
        the text now safe to send (a possible stop string's start and an incomplete UTF-8
        character are held back)."""
        if self.done:
            return None
        if token in eos_ids and not gen.ignore_eos:
            self.done, self.finish = True, "stop"
        else:
            self.out.append(token)
        if gen.stop or stream:
            self.text = decode(self.out)
            cut = find_stop(self.text, gen.stop, self.emitted)
            if cut is not None:
                self.text, self.done, self.finish = self.text[:cut], True, "stop"
        if not stream:
            return None
        ending = self.done or last_step
        upto = len(self.text)
        if not ending:
            upto -= max(hold - 1, 0)
            while upto > self.emitted and self.text[upto - 1] == "\ufffd":
                upto -= 1  # an incomplete UTF-8 character: wait for its next byte
        if upto <= self.emitted and not ending:
            return None
        event = StreamEvent(row, self.text[self.emitted : upto], self.finish if ending else None)
        self.emitted = max(self.emitted, upto)
        return event


def find_stop(text: str, stops: Sequence[str], emitted: int = 0) -> int | None:
    """Index where the first stop string starts, searching only text not yet emitted (and the
    overlap a stop string could straddle)."""
    best = None
    for s in stops:
        i = text.find(s, max(0, emitted - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best


def sample(logits: Tensor, cfg: GenerationConfig, generator: torch.Generator | None = None) -> Tensor:
    """Greedy when temperature is 0, else temperature / top-k / top-p (nucleus) sampling.
    logits (B, V) -> token ids (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
