"""The Memory³ decoder: a Llama-family transformer whose memory layers can read explicit memories.

Tensors in, tensors out: no files, no tokenizer, no retrieval here. Module and parameter names
follow Hugging Face's `LlamaForCausalLM`, so checkpoints convert by name.

Shape letters: B batch, T new tokens, S context keys, H query heads, K kv heads, D head dim,
N memory key slots, Lm memory layers.

Reading memory (§3.1–3.2): in a memory layer a query attends with one softmax over
[memory keys visible to it, causal context keys]. Memory keys are stored after RoPE at the
positions they had when written, so they are concatenated as they are. Which query sees which
memory key is a boolean mask, so every 64-token chunk of a prompt, each with its own memories,
is handled in the same single attention call.

The KV cache may be kept in a lower precision than the model (`resolve_kv_dtype`): on a CPU with
native bfloat16 a float32 model generates with a bfloat16 cache, and a decoding step attends
with two bfloat16 matmuls (`matmul_attention`), faster than float32 SDPA over the same keys
(BENCHMARKS.md, decode attention). Such a step reads the whole preallocated cache, unwritten
slots masked, because the CPU matmul copies a strided slice before using it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memory3.config import KV_DTYPES, ModelConfig, fingerprint
from memory3.device import cpu_has_native_bf16
from memory3.kernels import fused_decode
from memory3.rope import RoPE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and cast back before the gain, as HF Llama does (bit parity).
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(
    position_ids: Tensor, rope: RoPE | float, head_dim: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos/sin tables for integer positions (B, T) -> two (B, 1, T, D) tensors. `rope`: the
    model's `RoPE` (memory3.rope), or a bare θ for plain RoPE."""
    inv_freq, scale = RoPE.of(rope).frequencies(head_dim, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:  # YaRN's attention factor
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


@dataclass
class MemoryInput:
    """Memories read by one forward pass.

    k, v: (Lm, B, K, N, D) post-RoPE keys and values, one entry per memory layer.
    visible: (B, T, N) bool: query t of sequence b may read memory slot n.
    """

    k: Tensor
    v: Tensor
    visible: Tensor


@dataclass
class Captured:
    """What a memory layer computed for the writer (§3.3): pre-RoPE q and k, post-RoPE k, and v."""

    q: Tensor  # (B, H, T, D) pre-RoPE
    k_pre: Tensor  # (B, K, T, D) pre-RoPE
    k: Tensor  # (B, K, T, D) post-RoPE
    v: Tensor  # (B, K, T, D)


class KVCache:
    """Preallocated context keys/values for every layer.

    Memory layers reserve `mem_slots` slots in front of the context, so that decoding with
    memories reads one contiguous view and swapping memories is an in-place copy.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        mem_slots: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        mem_layers = set(config.memory_layers or ())
        self.mem_slots = mem_slots
        # bfloat16 on a CPU: a decoding step attends over the whole preallocated tensors, the
        # slots not yet written masked: with the fused kernel (memory3.kernels), which skips
        # masked slots, or with `matmul_attention`, which needs them contiguous
        self.matmul = torch.device(device).type == "cpu" and dtype == torch.bfloat16
        self.max_len = max_len
        self.len = 0
        self.offsets = [mem_slots if i in mem_layers else 0 for i in range(config.n_layer)]
        B, K, D = batch_size, config.n_kv_head, config.head_dim
        self.k = [torch.zeros(B, K, off + max_len, D, device=device, dtype=dtype) for off in self.offsets]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.mem_valid = torch.zeros(batch_size, mem_slots, dtype=torch.bool, device=device)
        self.mem_layer_ids = sorted(mem_layers)
        self.padded = False  # whether any token written so far was padding
        self.has_memory = False  # no memory keys are read until set_memory gives some

    @property
    def batch_size(self) -> int:
        return self.key_valid.shape[0]

    def set_memory(self, k: Tensor, v: Tensor, valid: Tensor) -> None:
        """Replace the memories read by decoding: k, v (Lm, B, K, N, D), valid (B, N)."""
        for j, (ks, vs) in enumerate(self.memory_slots(k.shape[3])):
            ks.copy_(k[j])
            vs.copy_(v[j])
        self.set_memory_valid(valid)

    def memory_slots(self, n: int) -> list[tuple[Tensor, Tensor]]:
        """The first n memory slots of each memory layer: (B, K, n, D) views of the cache to write
        memories into (`memory.layout.into_cache`); `set_memory_valid` then says which to read."""
        if n > self.mem_slots:
            raise ValueError(f"{n} memory slots given but the cache reserves {self.mem_slots}")
        return [(self.k[layer][:, :, :n], self.v[layer][:, :, :n]) for layer in self.mem_layer_ids]

    def set_memory_valid(self, valid: Tensor) -> None:
        """valid (B, n): which of the first n memory slots decoding reads; the others are not read."""
        self.mem_valid.zero_()
        self.mem_valid[:, : valid.shape[1]] = valid
        self.has_memory = bool(valid.any())

    def write_prefix(self, kv: Sequence[tuple[Tensor, Tensor]]) -> None:
        """Start every row with the same p tokens: kv[i] = (k, v), (1, K, p, D) each, the keys and
        values of layer i at positions 0..p-1 (e.g. computed once by a batch-1 pass)."""
        if self.len:
            raise ValueError(f"write_prefix needs an empty cache; this one holds {self.len} tokens")
        if len(kv) != len(self.k):
            raise ValueError(f"prefix keys/values for {len(kv)} layers, the cache has {len(self.k)}")
        p = kv[0][0].shape[2]
        if p > self.max_len:
            raise ValueError(f"a {p}-token prefix does not fit a cache of {self.max_len} tokens")
        for i, (k, v) in enumerate(kv):
            off = self.offsets[i]
            self.k[i][:, :, off : off + p] = k
            self.v[i][:, :, off : off + p] = v
        self.key_valid[:, :p] = True
        self.len = p

    def clear_memory(self) -> None:
        self.mem_valid.zero_()
        self.has_memory = False

    def reads_all_slots(self, t: int) -> bool:
        """Whether a pass of t new tokens attends to every slot of the cache (masked) rather
        than to the slots written so far: single-token steps of a bfloat16 CPU cache."""
        return self.matmul and t == 1

    def update(self, layer: int, k: Tensor, v: Tensor, with_memory: bool) -> tuple[Tensor, Tensor]:
        """Append (B, K, T, D) new keys/values; return the keys/values to attend to: the memory
        slots when `with_memory`, then the context slots up to the new tokens (or all of them,
        see `reads_all_slots`)."""
        off, t = self.offsets[layer], k.shape[2]
        if self.len + t > self.max_len:
            raise ValueError(f"KV cache full: {self.len} + {t} tokens > max_len {self.max_len}")
        self.k[layer][:, :, off + self.len : off + self.len + t] = k
        self.v[layer][:, :, off + self.len : off + self.len + t] = v
        if self.reads_all_slots(t):
            end = off + self.max_len
        elif self.len == 0 and not with_memory:
            return k, v  # nothing older to read: the new keys as computed, not read back (cast)
        else:
            end = off + self.len + t
        start = 0 if with_memory else off
        return self.k[layer][:, :, start:end], self.v[layer][:, :, start:end]


def resolve_kv_dtype(
    kv_dtype: str | torch.dtype, model_dtype: torch.dtype, device: torch.device | str
) -> torch.dtype:
    """The dtype of the KV cache (context keys/values and the memories read from it).

    "auto": bfloat16 for a float32 model on a CPU with native bfloat16 (attention then runs as
    bfloat16 matmuls, see `matmul_attention`; its output differs from float32 by ~0.5%), else the
    model's dtype. A dtype or its name forces that dtype.
    """
    if isinstance(kv_dtype, torch.dtype):
        return kv_dtype
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES} or a torch dtype, got {kv_dtype!r}")
    if kv_dtype != "auto":
        return getattr(torch, kv_dtype)
    cpu = torch.device(device).type == "cpu"
    if cpu and model_dtype == torch.float32 and cpu_has_native_bf16():
        return torch.bfloat16
    return model_dtype


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention over a bfloat16 KV cache on a CPU; the same result as SDPA with a boolean mask.

    q (B, H, T, D) in the model's dtype; k, v (B, K, S, D) bfloat16, best contiguous (a strided
    view is copied by the CPU matmul); mask (B, 1, T, S). The H/K query heads of each kv head are
    stacked as the rows of one matmul (grouped-query attention without copying keys); scores go
    to float32 for the mask and the softmax. For single-token steps on CPUs this beats SDPA,
    whose bfloat16 kernel is slower than its float32 one, which reads twice the bytes. Decoding
    uses it where the fused kernel (`memory3.kernels.fused_decode`, faster still) does not apply.
    """
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    qg = (q * D**-0.5).reshape(B, K, G * T, D).to(k.dtype)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float()  # (B, K, G·T, S)
    scores = scores.view(B, K, G, T, S).masked_fill_(~mask.view(B, 1, 1, T, S), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(B, K, G * T, S)
    return torch.matmul(probs, v).view(B, H, T, D).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.n_head * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:  # Qwen3: each head's q and k normalised before RoPE
            self.q_norm = RMSNorm(c.head_dim, c.rms_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_eps)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, T, D), k and v (B, K, T, D), before RoPE (the writer scores with these)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        return q.transpose(1, 2), k.transpose(1, 2), v

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        layer: int,
        cache: KVCache | None,
        memory: tuple[Tensor, Tensor] | None,
        read_cached_memory: bool,
        capture: list[Captured] | None,
    ) -> Tensor:
        B, T, _ = x.shape
        q_pre, k_pre, v = self.qkv(x)
        q, k = apply_rope(q_pre, cos, sin), apply_rope(k_pre, cos, sin)
        if capture is not None:
            capture.append(Captured(q=q_pre, k_pre=k_pre, k=k, v=v))
        if cache is not None:
            k, v = cache.update(layer, k, v, with_memory=read_cached_memory)
        if memory is not None:  # (B, K, N, D) memory keys in front of the context keys
            k = torch.cat((memory[0].to(k.dtype), k), dim=2)
            v = torch.cat((memory[1].to(v.dtype), v), dim=2)
        if cache is not None and cache.reads_all_slots(T):
            y = fused_decode(q, k, v, mask[:, 0, 0])
            if y is None:  # no AVX-512, an unsupported head layout, or kernels turned off
                y = matmul_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=True
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = MLP(config)


class LlamaBody(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)


def context_mask(T: int, past: int, key_valid: Tensor | None, B: int, device: torch.device) -> Tensor:
    """(B, 1, T, past+T) bool: causal, padded keys hidden, and every query sees itself
    (so that a padded query row is never all-masked)."""
    S = past + T
    qpos = torch.arange(past, S, device=device)[:, None]
    kpos = torch.arange(S, device=device)[None, :]
    causal = kpos <= qpos  # (T, S)
    if key_valid is None:
        return causal.expand(B, 1, T, S)
    return (causal & key_valid[:, None, None, :S]) | (kpos == qpos)


class Memory3Model(nn.Module):
    """Llama decoder + explicit memory in `config.memory_layers`. Names follow HF Llama."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.memory_layers = tuple(config.memory_layers or ())
        self._mem_index = {layer: j for j, layer in enumerate(self.memory_layers)}

    def set_memory_layers(self, layers: tuple[int, ...]) -> None:
        """Change which layers read memories (and which the writer captures): to read in other
        layers than a model was trained with, or for a training curriculum. A model loaded from
        disk knows its weights' digest, so its fingerprint follows the new layers (memories and
        banks written with other layers are refused); otherwise call
        `memory.write.reset_fingerprint` when memories written before must be told apart."""
        self.config = dataclasses.replace(self.config, memory_layers=tuple(layers))  # validates
        self.memory_layers = tuple(self.config.memory_layers or ())
        self._mem_index = {layer: j for j, layer in enumerate(self.memory_layers)}
        digest = getattr(self, "_memory3_weights", None)
        if digest is not None:
            self._memory3_fingerprint = fingerprint(self.config, digest)

    def init_weights(self, seed: int = 0, std: float = 0.02) -> Memory3Model:
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        *,
        token_valid: Tensor | None = None,
        memory: MemoryInput | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> Tensor:
        """Logits (B, T, V), or (B, 1, V) with `last_only`, or final hidden states.

        input_ids, position_ids: (B, T). token_valid: (B, T) False for padding (None = all real).
        memory: memories read in this call, e.g. every chunk of a prompt at once; when None
        and the cache holds memories (`KVCache.set_memory`), memory layers read those.
        """
        x = self._run(input_ids, position_ids, token_valid, memory, cache, None, None)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    def capture_memory_layers(self, input_ids: Tensor, position_ids: Tensor) -> list[Captured]:
        """The writer's pass (§3.1): a causal forward that stops at the last memory layer and
        returns q/k/v of every memory layer. Right padding needs no mask (causal)."""
        captured: list[Captured] = []
        self._run(input_ids, position_ids, None, None, None, captured, self.memory_layers[-1])
        return captured

    def _run(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None,
        token_valid: Tensor | None,
        memory: MemoryInput | None,
        cache: KVCache | None,
        capture: list[Captured] | None,
        stop_at: int | None,
    ) -> Tensor:
        B, T = input_ids.shape
        past = cache.len if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        if memory is not None and memory.k.shape[0] != len(self.memory_layers):
            raise ValueError(
                f"memory has {memory.k.shape[0]} layers but the model has "
                f"{len(self.memory_layers)} memory layers {self.memory_layers}"
            )
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rope_cos_sin(position_ids, self.config.rope, self.config.head_dim, x.dtype)
        key_valid = token_valid
        if cache is not None:
            cache.key_valid[:, past : past + T] = True if token_valid is None else token_valid
            key_valid = cache.key_valid if (token_valid is not None or cache.padded) else None
            cache.padded |= token_valid is not None
        if cache is not None and cache.reads_all_slots(T):  # every slot; unwritten ones are invalid
            ctx_mask = cache.key_valid.clone()
            ctx_mask[:, past] = True  # the query sees itself
            ctx_mask = ctx_mask[:, None, None, :]
        else:
            ctx_mask = context_mask(T, past, key_valid, B, x.device)
        read_cached = memory is None and cache is not None and cache.has_memory
        mem_mask = ctx_mask
        if memory is not None:  # §3.2 one softmax over [memories, context]
            mem_mask = torch.cat((memory.visible[:, None].expand(B, 1, T, -1), ctx_mask), dim=-1)
        elif read_cached:
            assert cache is not None
            vis = cache.mem_valid[:, None, None, :].expand(B, 1, T, -1)
            mem_mask = torch.cat((vis, ctx_mask), dim=-1)

        for i, block in enumerate(self.model.layers):
            j = self._mem_index.get(i)
            h = block.input_layernorm(x)
            if stop_at == i:  # the writer needs only this layer's q/k/v
                assert capture is not None
                q, k, v = block.self_attn.qkv(h)
                capture.append(Captured(q, k, apply_rope(k, cos, sin), v))
                break
            reads = j is not None and (memory is not None or read_cached)
            h = block.self_attn(
                h,
                cos,
                sin,
                mem_mask if reads else ctx_mask,
                i,
                cache,
                (memory.k[j], memory.v[j]) if (j is not None and memory is not None) else None,
                read_cached and j is not None,
                capture if j is not None else None,
            )
            x = x + h
            x = x + block.mlp(block.post_attention_layernorm(x))
        if cache is not None:
            cache.len += T
        return x
