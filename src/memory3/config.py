"""Configuration dataclasses: one per concern, each validating itself, saved with every artifact.

`fingerprint()` hashes the fields that change results, so that a memory written by one model or
configuration is never read by another (docs/design.md, "Writing a memory").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

KV_DTYPES = ("auto", "float32", "bfloat16", "float16")  # model.resolve_kv_dtype

T = TypeVar("T")


def _to_json(obj: Any) -> str:
    d = dataclasses.asdict(obj)
    for f in dataclasses.fields(obj):
        # fields added after a config's first release leave the fingerprint of every config that
        # keeps their default unchanged, so that banks written before them still open
        if f.metadata.get("fingerprint") == "unless-default" and d[f.name] == f.default:
            del d[f.name]
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


# the metadata of a field added after the first release (see `_to_json`)
ADDED = {"fingerprint": "unless-default"}


def fingerprint(*objs: Any) -> str:
    """Short stable hash of one or more dataclass configs (or strings)."""
    h = hashlib.sha256()
    for o in objs:
        h.update((o if isinstance(o, str) else _to_json(o)).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _from_dict(cls: type[T], d: dict[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - names
    if unknown:
        raise ValueError(
            f"{cls.__name__}: unknown field(s) {sorted(unknown)}; known fields are {sorted(names)}"
        )
    kwargs = dict(d)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in kwargs and isinstance(kwargs[f.name], list):
            kwargs[f.name] = tuple(kwargs[f.name])
    return cls(**kwargs)


def save_json(obj: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(obj), indent=2, sort_keys=True) + "\n")


def load_json(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: config file not found")
    return _from_dict(cls, json.loads(path.read_text()))


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def parse_memory_layers(spec: str, n_layer: int) -> tuple[int, ...]:
    """The layers that read memory, from a spec: "all", "half" (the paper: the first half),
    "first:<n>", or indices and ranges such as "0-19" or "0-9,20-29"."""
    spec = spec.strip()
    if spec == "half":
        return tuple(range(n_layer // 2))
    if spec == "all":
        return tuple(range(n_layer))
    if spec.startswith("first:") and spec[6:].isdigit():
        return tuple(range(int(spec[6:])))
    layers: set[int] = set()
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(
                f"memory_layers must be 'all', 'half', 'first:<n>' or indices and ranges such as "
                f"'0-19', got {spec!r}"
            )
        layers.update(range(int(lo), (int(hi) if dash else int(lo)) + 1))
    if not layers or max(layers) >= n_layer:
        raise ValueError(f"memory_layers {spec!r}: this model has layers 0-{n_layer - 1}")
    return tuple(sorted(layers))


def layer_span(layers: tuple[int, ...]) -> str:
    """Layer indices as `--memory-layers` takes them: "0-19", "0-9,20-29" ("" for none)."""
    if not layers:
        return ""
    parts: list[str] = []
    start = prev = layers[0]
    for i in (*layers[1:], None):
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder (docs/design.md, "The model"). Field names follow nanoGPT/litgpt;
    weights follow Hugging Face. The families differ in a few switches: Qwen2 has q/k/v biases,
    Qwen3 normalises q and k per head, Llama 3.x scales RoPE, Mistral v0.1 has a sliding window."""

    name: str = "custom"
    vocab_size: int = 32000
    n_layer: int = 4
    n_head: int = 4  # query heads (H)
    n_kv_head: int = 2  # key/value heads (K)
    head_dim: int = 16  # (D)
    hidden_size: int = 64
    intermediate_size: int = 128
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    # §3.2 memory layers: the first half of the layers unless given.
    memory_layers: tuple[int, ...] | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    # fields added with the model families (memory3.families); ADDED keeps old fingerprints
    family: str = field(default="llama", metadata=ADDED)  # the HF model type it converts to and from
    qkv_bias: bool = field(default=False, metadata=ADDED)  # q/k/v biases (Qwen2, Llama attention_bias)
    o_bias: bool = field(default=False, metadata=ADDED)  # output projection bias (Llama attention_bias)
    mlp_bias: bool = field(default=False, metadata=ADDED)
    qk_norm: bool = field(default=False, metadata=ADDED)  # RMSNorm of each head's q and k before RoPE (Qwen3)
    rope_scaling: dict[str, Any] | None = field(default=None, metadata=ADDED)  # memory3.rope.standard_scaling
    # Mistral v0.1 attends to the last `sliding_window` keys; memory3 runs such models up to that
    # many tokens, where the window hides nothing (`context_limit`).
    sliding_window: int | None = field(default=None, metadata=ADDED)

    def __hash__(self) -> int:
        return hash(_to_json(self))

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {FAMILIES}")
        if self.rope_scaling is not None:
            from memory3.rope import standard_scaling

            object.__setattr__(self, "rope_scaling", standard_scaling({"rope_scaling": self.rope_scaling}))
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "head_dim", "hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.memory_layers is None:
            object.__setattr__(self, "memory_layers", tuple(range(self.n_layer // 2)))
        layers = tuple(self.memory_layers)  # type: ignore[arg-type]
        object.__setattr__(self, "memory_layers", layers)
        if not layers:
            raise ValueError("memory_layers is empty: give at least one layer index")
        if list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= self.n_layer:
            raise ValueError(
                f"memory_layers {layers} must be sorted, unique and within 0..{self.n_layer - 1}"
            )

    @property
    def rope(self) -> Any:
        """This model's rotary embedding (`memory3.rope.RoPE`)."""
        from memory3.rope import RoPE

        return RoPE(self.rope_theta, self.rope_scaling, self.max_seq_len)

    @property
    def context_limit(self) -> int:
        """The most tokens (prompt, memories' positions aside, and output) one sequence may hold:
        `max_seq_len`, or less where a sliding window or dynamic RoPE would change results."""
        limits = [self.max_seq_len, self.sliding_window, self.rope.context_limit]
        return min(x for x in limits if x is not None)

    @property
    def last_memory_layer(self) -> int:
        return self.memory_layers[-1]  # type: ignore[index]

    @property
    def n_memory_layers(self) -> int:
        return len(self.memory_layers)  # type: ignore[arg-type]

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, d)

    def n_params(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.n_head + 2 * self.n_kv_head)
        attn += self.qkv_bias * self.head_dim * (self.n_head + 2 * self.n_kv_head)
        attn += self.o_bias * self.hidden_size + self.qk_norm * 2 * self.head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size
        mlp += self.mlp_bias * (2 * self.intermediate_size + self.hidden_size)
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return self.n_layer * (attn + mlp + 2 * self.hidden_size) + emb + self.hidden_size


PRESETS: dict[str, ModelConfig] = {
    # §3.4 / Table 1 of the paper.
    "memory3-2b": ModelConfig(
        name="memory3-2b",
        vocab_size=60416,
        n_layer=44,
        n_head=40,
        n_kv_head=8,
        head_dim=80,
        hidden_size=3200,
        intermediate_size=3200,
        max_seq_len=2048,
        rope_theta=10000.0,
        rms_eps=1e-5,
        tie_embeddings=False,
    ),
    # Matches HuggingFaceTB/SmolLM2-135M(-Instruct).
    "smollm2-135m": ModelConfig(
        name="smollm2-135m",
        vocab_size=49152,
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        head_dim=64,
        hidden_size=576,
        intermediate_size=1536,
        max_seq_len=8192,
        rope_theta=100000.0,
        rms_eps=1e-5,
        tie_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "tiny": ModelConfig(
        name="tiny",
        vocab_size=256,
        n_layer=4,
        n_head=4,
        n_kv_head=2,
        head_dim=16,
        hidden_size=64,
        intermediate_size=128,
        max_seq_len=1024,
    ),
    "tiny-tied": ModelConfig(
        name="tiny-tied",
        vocab_size=256,
        n_layer=4,
        n_head=6,
        n_kv_head=2,
        head_dim=8,
        hidden_size=48,
        intermediate_size=96,
        max_seq_len=1024,
        tie_embeddings=True,
    ),
}


Selection = Literal["attention", "attention-mean", "value-attention", "key-norm", "random", "all"]
SELECTIONS: tuple[str, ...] = typing.get_args(Selection)


@dataclass(frozen=True)
class MemoryConfig:
    """How memories are written and read (docs/design.md, "Writing a memory" / "Reading memories")."""

    prefix: str = "Reference:"  # §3.1 the reference prefix, after the BOS token
    reference_tokens: int = 128  # a reference is at most this many tokens
    kept_tokens: int = 8  # §3.3 token sparsification: tokens kept per memory layer and kv head
    # "attention" is the paper's rule; the other scores are measured alternatives (memory.write);
    # "random" and "all" exist for measurement and controls.
    selection: Selection = "attention"
    chunk_tokens: int = 64  # §3.1 each chunk of this many tokens retrieves its own memories
    memories_per_chunk: int = 5
    seed: int = 0  # only used by selection="random"

    def __post_init__(self) -> None:
        if self.reference_tokens <= 0 or self.chunk_tokens <= 0 or self.memories_per_chunk <= 0:
            raise ValueError(
                "reference_tokens, chunk_tokens and memories_per_chunk must be positive, got "
                f"{self.reference_tokens}, {self.chunk_tokens}, {self.memories_per_chunk}"
            )
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.selection == "all":
            object.__setattr__(self, "kept_tokens", self.reference_tokens)
        if not 0 < self.kept_tokens <= self.reference_tokens:
            raise ValueError(
                f"kept_tokens ({self.kept_tokens}) must be in 1..reference_tokens ({self.reference_tokens})"
            )

    @property
    def slots(self) -> int:
        """Memory key slots one chunk attends to: memories_per_chunk × kept_tokens."""
        return self.memories_per_chunk * self.kept_tokens

    def override(
        self,
        kept_tokens: int | None = None,
        selection: Selection | None = None,
        memories_per_chunk: int | None = None,
    ) -> MemoryConfig:
        """This config with the given kept tokens, selection and memories per chunk (None keeps
        its own): `--kept-tokens` / `--selection` / `--references` on top of a model's own."""
        changes = {
            "kept_tokens": kept_tokens,
            "selection": selection,
            "memories_per_chunk": memories_per_chunk,
        }
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryConfig:
        return _from_dict(cls, d)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False  # keep going after EOS (benchmarks)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0, got {self.top_k}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
