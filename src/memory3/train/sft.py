"""SFT with explicit memory (docs/design.md, "Training a model to read memory"): chat samples whose prompt reads memories of 5 references
(the gold one among them), loss on the answer only.

One step, read top to bottom in `run_sft`:
  1. draw a group: 5 entities of one kind (hard distractors, as retrieval gives) and up to 24 of
     their questions (invented entities, Factbook countries, or fill-in-the-blank questions on
     Wikipedia articles of one topic); encode the 5 references with the model being trained
     (writer up to the last memory layer, top-8 tokens per head chosen without gradient,
     gradients through the kept K/V);
  2. every question reads the same 5 memories, laid out as at inference (prefix at 0..p-1, prompt
     from p+128), answer-only loss;
  3. a RAG sample (the same references as text in the prompt) and a general-text sequence without
     memory, so the model keeps using its context and keeps its language (the issue's probe lost
     half its RAG accuracy without them);
     optionally (`irrelevant_questions`) questions reading only memories that lack their answer,
     trained towards the model's own answer without memory (KL);
  4. AdamW step with warmup-stable-decay, clipping, accumulation; checkpoint; resume exactly.

Memory layers and kept tokens can follow a curriculum of stages (`stages`), e.g. from full
memory at all layers, which the untrained model already reads, to the paper's setting. With a
`codec`, the memories of step 1 pass through the memory bank's quantizer (straight-through
gradients), so that the model learns to read memories compressed as a bank stores them.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memory3.config import MemoryConfig, parse_memory_layers
from memory3.generate import rag_prompt
from memory3.memory.codec import CodecConfig, MemoryCodec, straight_through, train_codec
from memory3.memory.write import MemoryWriter, reference_prefix_ids
from memory3.train.adapters import init_from_adapter
from memory3.train.config import LoopConfig, LoRAConfig, OptimConfig, load_config, save_config
from memory3.train.data import (
    Entity,
    Group,
    corpus_texts,
    factbook_training_entities,
    fictional_training_entities,
    make_group,
    reading_training_entities,
    rng_for,
    sequence_at,
    tokenize_corpus,
    wikipedia_training_entities,
)
from memory3.train.fisher import fisher_from_data
from memory3.train.layout import shared_memory, text_batch
from memory3.train.loop import (
    CKPT_DIR,
    Run,
    TrainState,
    all_mean,
    answer_logits,
    autocast,
    batch_loss,
    export,
    set_memory_layers,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """Until `until` (fraction of the steps), memories keep `kept_tokens` per head (0 = all) and
    are read by `memory_layers`: "half" (the paper: first half), "all", or "first:<n>"."""

    until: float = 1.0
    kept_tokens: int = 8
    memory_layers: str = "half"


@dataclass(frozen=True)
class SFTConfig:
    model: str = "smollm2-135m-instruct"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(rank=16, alpha=32.0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20))
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(steps=600, checkpoint_every=25, eval_every=100)
    )
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    stages: tuple[Stage, ...] = (Stage(),)
    fictional_entities: int = 4000  # generated with fictional_seed; train split only
    fictional_seed: int = 1
    factbook_fraction: float = 0.25  # share of groups drawn from Factbook train countries
    wikipedia_fraction: float = 0.0  # share of groups of fill-in-the-blank questions on train articles
    # share of groups of self-supervised reading questions on train articles: blanks of every kind
    # (numbers, names, ordinary words, phrases) in any sentence of the reference, and whole
    # sentences quoted (`memory3.train.data.reading_training_entities`)
    reading_fraction: float = 0.0
    questions_per_group: int = 24
    rag_per_step: int = 1
    rag_weight: float = 0.5
    text_per_step: int = 1
    text_seq_len: int = 256
    text_weight: float = 0.3
    text_corpus: str = "wikipedia"
    aux_every: int = 1  # 2: RAG samples on even steps, general text on odd steps (half the cost)
    # Questions per step that read memories without their answer (the group's other passages and
    # one of another group), trained to answer as the model does without memory (KL to its own
    # no-memory prediction): irrelevant memories must not change an answer. 0 = off.
    irrelevant_questions: int = 0
    irrelevant_weight: float = 1.0
    init_adapter: str = ""  # start the LoRA from this adapter (a shipped name or a directory)
    val_groups: int = 4  # loss gap gold vs irrelevant memories on train-split entities kept aside
    probe_questions: int = 40  # held-out probe at the end (0 = skip)
    # The memory codec in the loop: memories are read as a bank with this codec would return them
    # (straight-through gradients), so that the model learns to read quantized memories. The codec
    # is trained on `codec_references` references written by the model being trained, again every
    # `codec_refresh_every` steps (its memories drift as it trains) and whenever a stage changes.
    # A transform codec (kind "transform") is fitted with the model's Fisher calibration, measured
    # on `codec_calibration_groups` training groups each time the codec is refitted.
    codec: CodecConfig | None = None
    codec_references: int = 200
    codec_refresh_every: int = 50
    codec_calibration_groups: int = 32

    def __post_init__(self) -> None:
        if not self.stages or abs(self.stages[-1].until - 1.0) > 1e-9:
            raise ValueError(f"the last stage must end at until=1.0, got stages {self.stages}")
        shares = (self.factbook_fraction, self.wikipedia_fraction, self.reading_fraction)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError(
                "factbook_fraction, wikipedia_fraction and reading_fraction are shares of the "
                f"groups: each ≥ 0 and together ≤ 1, got {shares}"
            )
        if self.irrelevant_questions < 0 or self.irrelevant_weight < 0:
            raise ValueError(
                f"irrelevant_questions ({self.irrelevant_questions}) and irrelevant_weight "
                f"({self.irrelevant_weight}) must be ≥ 0 (0 turns the irrelevant-memory samples off)"
            )
        if self.questions_per_group < 1:
            raise ValueError(f"questions_per_group must be ≥ 1, got {self.questions_per_group}")
        if self.codec is not None and (self.codec_references < 1 or self.codec_refresh_every < 1):
            raise ValueError(
                "codec_references and codec_refresh_every must be ≥ 1 with a codec in the loop, got "
                f"{self.codec_references} and {self.codec_refresh_every}"
            )


def stage_at(config: SFTConfig, step: int) -> Stage:
    frac = step / config.loop.steps
    for s in config.stages:
        if frac < s.until:
            return s
    return config.stages[-1]


def memory_config_for(config: SFTConfig, stage: Stage) -> MemoryConfig:
    import dataclasses

    if stage.kept_tokens == 0:
        return dataclasses.replace(config.memory, selection="all")
    return dataclasses.replace(config.memory, kept_tokens=stage.kept_tokens)


class SFTData:
    """Everything a step draws from; a step's samples depend only on (seed, step, micro, rank)."""

    def __init__(self, config: SFTConfig, tokenizer: Any, cache_dir: Path) -> None:
        self.config, self.tok = config, tokenizer
        fict = fictional_training_entities(config.fictional_entities, config.fictional_seed)
        n_val = min(len(fict) // 10, 200)
        self.val_pool = fict[:n_val]  # never trained on: the gold/irrelevant loss gap is measured on them
        self.fictional = fict[n_val:]
        self.factbook: list[Entity] = factbook_training_entities() if config.factbook_fraction > 0 else []
        self.wikipedia: list[Entity] = []
        if config.wikipedia_fraction > 0:  # only questions whose prompt fits one chunk, as SFT reads one
            n = config.memory.chunk_tokens
            self.wikipedia = [
                e
                for e in wikipedia_training_entities()
                if all(len(self.prompt_ids(f.question)) <= n for f in e.facts)
            ]
        self.reading: list[Entity] = []
        if config.reading_fraction > 0:
            self.reading = self._fitting(reading_training_entities(config.memory.reference_tokens))
        self.text = None
        if config.text_per_step:
            texts = corpus_texts(config.text_corpus, "train")
            name = "wikipedia" if config.text_corpus == "wikipedia" else Path(config.text_corpus).stem
            self.text = tokenize_corpus(
                texts, tokenizer, tokenizer.eos_token_id, cache_dir / f"tokens-{name}.npy"
            )
        log.info(
            "SFT data: %d fictional, %d factbook, %d wikipedia, %d reading entities; %d kept aside "
            "for validation",
            len(self.fictional),
            len(self.factbook),
            len(self.wikipedia),
            len(self.reading),
            len(self.val_pool),
        )

    def _fitting(self, entities: list[Entity]) -> list[Entity]:
        """Entities whose questions fit one chunk and whose answers lie in the tokens a memory
        holds (the first `reference_tokens` of the reference); questions that do not are dropped."""
        out = []
        for e in entities:
            held = self.tok.decode(self.reference_ids(e.reference))
            facts = tuple(
                f
                for f in e.facts
                if f.answer in held and len(self.prompt_ids(f.question)) <= self.config.memory.chunk_tokens
            )
            if facts:
                out.append(Entity(e.name, e.kind, e.reference, facts))
        return out

    def group(self, rng: Any) -> Group:
        c = self.config
        r = rng.random() if (self.factbook or self.wikipedia or self.reading) else 1.0  # as before without
        if self.factbook and r < c.factbook_fraction:
            pool = self.factbook
        elif self.wikipedia and r < c.factbook_fraction + c.wikipedia_fraction:
            pool = self.wikipedia
        elif self.reading and r < c.factbook_fraction + c.wikipedia_fraction + c.reading_fraction:
            pool = self.reading
        else:
            pool = self.fictional
        return make_group(pool, rng, c.memory.memories_per_chunk, c.questions_per_group)

    def prompt_ids(self, question: str) -> list[int]:
        """Exactly what `Generator._encode_prompt` feeds in chat mode."""
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def answer_ids(self, answer: str) -> list[int]:
        return [*list(self.tok(answer, add_special_tokens=False).input_ids), self.tok.eos_token_id]

    def reference_ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)[: self.config.memory.reference_tokens]

    def qa_seqs(
        self, questions: Any, rag_refs: tuple[str, ...] | None = None
    ) -> tuple[list[list[int]], list[int]]:
        seqs, starts = [], []
        for f in questions:
            q = rag_prompt(f.question, [_HitText(r) for r in rag_refs]) if rag_refs else f.question
            p = self.prompt_ids(q)
            seqs.append(p + self.answer_ids(f.answer))
            starts.append(len(p))
        return seqs, starts


@dataclass(frozen=True)
class _HitText:
    text: str


def sft_losses(
    model: Any,
    data: SFTData,
    group: Group,
    writer: MemoryWriter,
    prefix: list[int],
    memory: bool = True,
    swap_refs: tuple[str, ...] | None = None,
    codec: MemoryCodec | None = None,
) -> tuple[torch.Tensor, int]:
    """Answer loss of the group's questions reading the group's memories (or `swap_refs`' memories,
    or none), quantized by `codec` when given. Returns (mean loss, answer tokens)."""
    cfg = data.config
    seqs, starts = data.qa_seqs(group.questions)
    pad = data.tok.pad_token_id if data.tok.pad_token_id is not None else 0
    if not memory:
        b = text_batch(seqs, starts, prefix, cfg.memory.reference_tokens, pad)
        return batch_loss(model, b)
    refs = swap_refs or group.references
    mem = writer.write([data.reference_ids(r) for r in refs])
    if codec is not None:
        mem = straight_through(mem, codec)
    b = text_batch(seqs, starts, prefix, cfg.memory.reference_tokens, pad)
    longest = max(starts)
    if longest > cfg.memory.chunk_tokens:
        raise ValueError(f"a prompt of {longest} tokens spans two chunks; SFT prompts must fit one chunk")
    return batch_loss(model, b, shared_memory(mem, b))


def irrelevant_loss(
    model: Any,
    data: SFTData,
    group: Group,
    other: Group,
    writer: MemoryWriter,
    prefix: list[int],
    rng: Any,
    codec: MemoryCodec | None = None,
) -> tuple[torch.Tensor, int] | None:
    """Questions of one passage of `group` read the memories of the group's other passages (hard
    distractors: same kind, no answer) and one passage of `other`; the loss is the KL divergence
    from the model's own prediction of the answer without memory, in the plain layout (no
    gradient through that side). Answers must not change when memories hold nothing about them.
    None when the group has no question to ask (or no irrelevant passage)."""
    cfg = data.config
    if not group.owners or cfg.irrelevant_questions < 1:
        return None
    gold = group.owners[rng.randrange(len(group.owners))]
    questions = [f for f, o in zip(group.questions, group.owners, strict=True) if o == gold]
    questions = questions[: cfg.irrelevant_questions]
    refs = [r for i, r in enumerate(group.references) if i != gold]
    refs += [r for r in other.references if r not in group.references][:1]
    if not refs:
        return None
    seqs, starts = data.qa_seqs(questions)
    pad = data.tok.pad_token_id if data.tok.pad_token_id is not None else 0
    with torch.no_grad():
        teacher, _ = answer_logits(model, text_batch(seqs, starts, None, 0, pad))
    mem = writer.write([data.reference_ids(r) for r in refs])
    if codec is not None:
        mem = straight_through(mem, codec)
    b = text_batch(seqs, starts, prefix, cfg.memory.reference_tokens, pad)
    student, _ = answer_logits(model, b, shared_memory(mem, b))
    kl = torch.nn.functional.kl_div(
        student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    return kl, sum(len(s) for s in seqs) * 2


def run_sft(
    config: SFTConfig,
    out: str | Path,
    resume: bool = True,
    stop_after: int | None = None,
    command: str = "",
) -> Path:
    """Train; returns the run directory (checkpoint/, adapter/ or model/, metrics.jsonl)."""
    init = (lambda model: init_from_adapter(model, config.init_adapter)) if config.init_adapter else None
    # init: continue an earlier run
    run = Run(config, out, resume, init=init, fingerprint=False, command=command)
    model, tok, d = run.model, run.tok, run.d
    data = SFTData(config, tok, run.out.parent / ".cache")
    prefix = reference_prefix_ids(tok, model.config.bos_token_id, config.memory)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    steps = run.steps(stop_after)
    n_layer = model.config.n_layer
    codec = _load_codec(run.out) if config.codec is not None and run.state.step else None
    run.save_extra = _codec_saver(codec)
    for step in steps:
        stage = stage_at(config, step)
        layers = parse_memory_layers(stage.memory_layers, n_layer)
        if layers != model.memory_layers:
            set_memory_layers(model, layers)
        writer = MemoryWriter(model, prefix, memory_config_for(config, stage))
        if config.codec is not None and _codec_due(codec, step, config, writer):
            codec = fit_codec(model, data, writer, config, step)
            run.save_extra = _codec_saver(codec)
        lr = run.lr(step)
        step_tokens, parts = 0, {"mem": 0.0, "rag": 0.0, "text": 0.0, "irrelevant": 0.0}
        do_rag = config.aux_every == 1 or step % config.aux_every == 0
        do_text = config.aux_every == 1 or step % config.aux_every == 1
        for micro in range(config.optim.grad_accum):
            rng = rng_for(config.loop.seed, step, micro, d.rank)
            with autocast(config.loop.bf16, model.device):
                total, ntok, got = _micro_losses(
                    model, data, writer, prefix, pad, codec, config, rng, do_rag, do_text
                )
            for k, v in got.items():
                parts[k] += v / config.optim.grad_accum
            (total / config.optim.grad_accum).backward()
            step_tokens += ntok
        run.optimizer_step()
        ran = {"mem", *(["rag"] if do_rag and config.rag_per_step > 0 else [])}
        ran |= {*(["text"] if do_text and data.text is not None else [])}
        ran |= {*(["irrelevant"] if config.irrelevant_questions > 0 else [])}
        extra = {k: round(all_mean(v, d), 4) for k, v in parts.items() if k in ran}
        extra["kept"], extra["layers"] = stage.kept_tokens, len(layers)
        if config.loop.eval_every and (step + 1) % config.loop.eval_every == 0 and d.main:
            extra.update(loss_gap(model, data, writer, prefix, config, codec))
        run.step_done(step, parts["mem"], int(all_mean(step_tokens, d) * d.world), lr, extra)
    return run.finish(lambda: _finish(model, tok, config, run.out, run.state, data, command))


@torch.no_grad()
def loss_gap(
    model: Any,
    data: SFTData,
    writer: MemoryWriter,
    prefix: list[int],
    config: SFTConfig,
    codec: MemoryCodec | None = None,
) -> dict[str, float]:
    """Answer loss on validation entities with the gold memories, with 5 irrelevant memories,
    and with none: reading works when gold < irrelevant ≈ none."""
    was = model.training
    model.eval()
    sums = {"val_gold": 0.0, "val_irrelevant": 0.0, "val_none": 0.0}
    with autocast(config.loop.bf16, model.device):
        for g in range(config.val_groups):
            rng = rng_for("val", g)
            group = make_group(
                data.val_pool, rng, config.memory.memories_per_chunk, config.questions_per_group
            )
            other = make_group(data.val_pool, rng_for("val-other", g), config.memory.memories_per_chunk, 1)
            irrelevant = tuple(r for r in other.references if r not in group.references) or other.references
            sums["val_gold"] += sft_losses(model, data, group, writer, prefix, codec=codec)[0].item()
            sums["val_irrelevant"] += sft_losses(
                model, data, group, writer, prefix, swap_refs=irrelevant, codec=codec
            )[0].item()
            sums["val_none"] += sft_losses(model, data, group, writer, prefix, memory=False)[0].item()
    model.train(was)
    return {k: round(v / config.val_groups, 4) for k, v in sums.items()}


# --- the codec in the loop ------------------------------------------------------------------------

CODEC_DIR = "codec"


def _codec_due(codec: MemoryCodec | None, step: int, config: SFTConfig, writer: MemoryWriter) -> bool:
    """Train the codec at the first step, every `codec_refresh_every` steps, and when a stage
    changes the shape of the memories."""
    if codec is None or step % config.codec_refresh_every == 0:
        return True
    m = writer.model.config
    want = (len(writer.model.memory_layers), m.n_kv_head, writer.config.kept_tokens, m.head_dim)
    return codec.shape.dims != want


@torch.no_grad()
def fit_codec(model: Any, data: SFTData, writer: MemoryWriter, config: SFTConfig, step: int) -> MemoryCodec:
    """A codec trained on the memories of `codec_references` training references, written by the
    model as it is at `step` (in eval mode, as a bank build writes them)."""
    assert config.codec is not None
    rng = rng_for(config.loop.seed, "codec", step)  # its own draws: the training batches are unchanged
    refs: list[str] = []
    while len(refs) < config.codec_references:
        refs.extend(data.group(rng).references)
    was = model.training
    model.eval()
    with autocast(config.loop.bf16, model.device):
        mem = writer.write([data.reference_ids(r) for r in refs[: config.codec_references]])
    calibration = None
    if config.codec.kind == "transform":
        calibration = fisher_from_data(
            model, data.tok, writer.config, data, config.codec_calibration_groups, seed=step, progress=False
        )
    model.train(was)
    codec = train_codec(mem, config.codec, rope_theta=model.config.rope, calibration=calibration)
    log.info("step %d: codec %s trained on %d references", step, codec, config.codec_references)
    return codec


def _codec_saver(codec: MemoryCodec | None) -> Any:
    return None if codec is None else (lambda ckpt: codec.save(ckpt / CODEC_DIR))


def _load_codec(out: Path) -> MemoryCodec | None:
    """The codec saved with the checkpoint being resumed (None: train a new one)."""
    path = out / CKPT_DIR / CODEC_DIR
    return MemoryCodec.load(path) if path.exists() else None


def main_from_file(
    path: str | Path, out: str | Path, resume: bool = True, stop_after: int | None = None, command: str = ""
) -> Path:
    return run_sft(load_config(SFTConfig, path), out, resume, stop_after, command=command)


__all__ = ["SFTConfig", "Stage", "run_sft", "save_config"]


def _micro_losses(
    model: Any,
    data: SFTData,
    writer: MemoryWriter,
    prefix: list[int],
    pad: int,
    codec: MemoryCodec | None,
    config: SFTConfig,
    rng: random.Random,
    do_rag: bool,
    do_text: bool,
) -> tuple[torch.Tensor, int, dict[str, float]]:
    """One micro-batch's weighted loss, tokens and parts: a group's questions reading its memories,
    then as configured RAG, general text, and memories without the answer."""
    group = data.group(rng)
    loss, _ = sft_losses(model, data, group, writer, prefix, codec=codec)
    parts = {"mem": loss.item()}
    total, ntok = loss, sum(len(s) for s in data.qa_seqs(group.questions)[0])
    for _ in range(config.rag_per_step if do_rag else 0):
        f = group.questions[rng.randrange(len(group.questions))]
        seqs, starts = data.qa_seqs([f], tuple(rng.sample(group.references, len(group.references))))
        b = text_batch(seqs, starts, None, 0, pad)
        rag_loss, _ = batch_loss(model, b)
        total = total + config.rag_weight * rag_loss / config.rag_per_step
        parts["rag"] = parts.get("rag", 0.0) + rag_loss.item() / config.rag_per_step
        ntok += b.n_tokens
    if data.text is not None and do_text:
        seqs = [
            sequence_at(data.text, config.text_seq_len, rng.randrange(1 << 30)).tolist()
            for _ in range(config.text_per_step)
        ]
        b = text_batch(seqs, None, None, 0, pad)
        text_loss, _ = batch_loss(model, b)
        total = total + config.text_weight * text_loss
        parts["text"] = text_loss.item()
        ntok += b.n_tokens
    if config.irrelevant_questions:
        irr = irrelevant_loss(model, data, group, data.group(rng), writer, prefix, rng, codec)
        if irr is not None:
            total = total + config.irrelevant_weight * irr[0]
            parts["irrelevant"] = irr[0].item()
            ntok += irr[1]
    return total, ntok, parts


def _finish(
    model: Any, tok: Any, config: SFTConfig, out: Path, state: TrainState, data: SFTData, command: str
) -> None:
    """A finished run: export the adapter (with the codec calibration when trained through a
    transform codec) and, as configured, probe held-out accuracy."""
    shipped = export(model, tok, config, out, state, memory=final_memory_config(config), command=command)
    if config.codec is not None and config.codec.kind == "transform":
        # a model trained through a transform codec is built with one: leave its calibration
        # beside it, where `memory3 build --codec tc<bits>` finds it
        from memory3.memory.transform import CALIBRATION_FILE, weights_digest_of

        mc = memory_config_for(config, config.stages[-1])
        cal = fisher_from_data(
            model, tok, mc, data, config.codec_calibration_groups, seed=state.step, progress=False
        )
        cal.meta["weights"] = weights_digest_of(shipped)
        cal.save(shipped / CALIBRATION_FILE)
    if config.probe_questions:
        from memory3.train.probe import probe

        with torch.no_grad():
            res = probe(
                model,
                tok,
                config.probe_questions,
                memory_config=memory_config_for(config, config.stages[-1]),
            )
        (out / "probe.json").write_text(json.dumps({"step": state.step, **res.__dict__}, indent=2) + "\n")
        log.info("probe: %s", res.accuracy)


def final_memory_config(config: Any) -> MemoryConfig:
    """How the trained model reads: the memory config of a curriculum's last stage, else the run's."""
    if getattr(config, "stages", None):
        return memory_config_for(config, config.stages[-1])
    return getattr(config, "memory", MemoryConfig())
