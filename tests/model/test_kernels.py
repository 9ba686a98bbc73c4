"""The fused decode attention kernel against float32 SDPA, and the model with it against the
model without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import decode_with_memories
from memory3 import kernels
from memory3.model import Memory3Model

needs_kernel = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512", reason="the fused kernel needs AVX-512"
)


def reference(q, k, v, visible):
    """float32 attention over the bfloat16 keys and values, in the kernel's (B, H, 1, D) form."""
    mask = visible[:, None, None, :]
    return F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask, enable_gqa=True)


@needs_kernel
@pytest.mark.parametrize(
    ("H", "K", "D", "S"),
    [(9, 3, 64, 37), (4, 1, 80, 50), (8, 8, 128, 9), (6, 2, 16, 4), (16, 2, 32, 130)],
)
def test_fused_decode_equals_float32_attention(H: int, K: int, D: int, S: int) -> None:
    """Every head layout it takes: grouped-query heads in order, D in chunks of 32 with or without
    a chunk of 16, slot counts that are not multiples of 4, masked blocks skipped, masked slots
    holding NaN (never read into a result)."""
    g = torch.Generator().manual_seed(H * 1000 + S)
    B = 3
    q = torch.randn(B, H, 1, D, generator=g)
    k = torch.randn(B, K, S, D, generator=g).bfloat16()
    v = torch.randn(B, K, S, D, generator=g).bfloat16()
    visible = torch.rand(B, S, generator=g) > 0.4
    visible[0, : min(S - 1, 8)] = False  # whole blocks of four masked
    visible[:, -1] = True
    hidden = ~visible[:, None, :, None].expand(B, K, S, D)
    junk_k, junk_v = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("nan"))
    got = kernels.fused_decode(q, junk_k, junk_v, visible)
    assert got is not None and got.shape == (B, H, 1, D) and got.dtype == q.dtype
    assert_close(got, reference(q, k, v, visible), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_fused_decode_reads_a_cache_slice_and_gives_zeros_when_nothing_is_visible() -> None:
    """A slice of a preallocated cache along the slots (strided over batch and heads) reads as
    the same keys copied; a row with no visible slot gives zeros rather than NaN."""
    g = torch.Generator().manual_seed(1)
    B, H, K, D = 2, 9, 3, 64
    big_k = torch.randn(B, K, 100, D, generator=g).bfloat16()
    big_v = torch.randn(B, K, 100, D, generator=g).bfloat16()
    k, v = big_k[:, :, 10:71], big_v[:, :, 10:71]
    q = torch.randn(B, H, 1, D, generator=g)
    visible = torch.ones(B, 61, dtype=torch.bool)
    visible[1] = False
    got = kernels.fused_decode(q, k, v, visible)
    assert got is not None
    assert_close(got[:1], reference(q[:1], k[:1].contiguous(), v[:1].contiguous(), visible[:1]))
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_fused_decode_declines_what_it_does_not_take() -> None:
    """None, so that the model keeps its PyTorch path: several new tokens, float32 keys, a head
    dim that is not a multiple of 16, a layout whose keys are not contiguous per head, or the
    kernels turned off."""
    q = torch.randn(1, 4, 1, 64)
    k = torch.randn(1, 2, 8, 64).bfloat16()
    vis = torch.ones(1, 8, dtype=torch.bool)
    assert kernels.fused_decode(torch.randn(1, 4, 2, 64), k, k, vis) is None
    assert kernels.fused_decode(q, k.float(), k.float(), vis) is None
    assert kernels.fused_decode(torch.randn(1, 4, 1, 24), k[..., :24], k[..., :24], vis) is None
    assert kernels.fused_decode(q, k.transpose(1, 2).contiguous().transpose(1, 2), k, vis) is None
    kernels.set_enabled(False)
    try:
        assert not kernels.available()
        assert kernels.fused_decode(q, k, k, vis) is None
    finally:
        kernels.set_enabled(None)


@needs_kernel
@pytest.mark.slow
def test_decoding_with_the_kernel_is_closer_to_float32_than_without(tiny: Memory3Model) -> None:
    """A bfloat16 cache with memories (one row's slots partly empty), left padding and junk in
    unwritten slots, against a float32 cache: the fused kernel's logits are within bfloat16
    precision, and closer than the matmul path's (which also rounds queries and probabilities)."""
    logits = {}
    for name, dtype, fused in (("f32", torch.float32, False), ("kernel", torch.bfloat16, True),
                               ("matmul", torch.bfloat16, False)):  # fmt: skip
        kernels.set_enabled(fused)
        try:
            logits[name], _ = decode_with_memories(tiny, dtype, seed=7, empty_from=2)
        finally:
            kernels.set_enabled(None)
    want = logits["f32"]
    err = {name: (logits[name] - want).abs().max().item() for name in ("kernel", "matmul")}
    assert torch.isfinite(logits["kernel"]).all()
    assert err["kernel"] < 0.01 * want.abs().max()
    assert err["kernel"] <= err["matmul"], err
