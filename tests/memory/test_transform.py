"""The transform codec (`--codec tc<bits>`): Lloyd quantizers against theory and a plain loop, the
bit packing against a plain bitstream, round trips, error that falls with more bits, keys coded
before RoPE, bits that follow the calibration, files that describe themselves and refuse damage."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from test_codec import random_memories

from memory3.memory.codec import CodecConfig, CodecError, MemoryCodec, MemoryShape, train_codec
from memory3.memory.transform import (
    CodecCalibration,
    TransformCoder,
    TransformError,
    find_calibration,
    lloyd_1d,
    refined_levels,
    rotate,
)
from memory3.memory.write import Memories

THETA = 10000.0
SHAPE = MemoryShape(layers=2, kv_heads=2, slots=4, head_dim=16)


def _units(M: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Lm, K, N, D) pre-RoPE keys and values with unequal variances per dimension."""
    g = torch.Generator().manual_seed(seed)
    Lm, K, _, D = SHAPE.dims
    scale = torch.linspace(0.2, 2.0, D)
    return torch.randn(Lm, K, M, D, generator=g) * scale, torch.randn(Lm, K, M, D, generator=g)


def _lloyd_loop(x: np.ndarray, k: int, iters: int = 15) -> tuple[np.ndarray, float]:
    """Lloyd's algorithm one step at a time, from the same quantile start."""
    xs = np.sort(x)
    levels = xs[np.minimum(((np.arange(k) + 0.5) / k * len(x)).astype(int), len(x) - 1)].astype(np.float64)
    for _ in range(iters):
        cell = np.argmin(np.abs(xs[:, None] - levels[None]), axis=1)
        for i in range(k):
            if (cell == i).any():
                levels[i] = xs[cell == i].mean()
        levels.sort()
    cell = np.argmin(np.abs(xs[:, None] - levels[None]), axis=1)
    return levels, float(((xs - levels[cell]) ** 2).mean())


def test_lloyd_quantizers_match_theory_and_a_plain_loop() -> None:
    x = torch.randn(2, 40000, generator=torch.Generator().manual_seed(0))
    _, e1 = lloyd_1d(x, 2, iters=30)
    _, e2 = lloyd_1d(x, 4, iters=30)
    # Lloyd-Max for a unit Gaussian: 0.3634 at 1 bit, 0.1175 at 2 bits
    assert np.allclose(e1.numpy(), 0.3634, atol=0.01) and np.allclose(e2.numpy(), 0.1175, atol=0.005)
    small = torch.randn(3, 500, generator=torch.Generator().manual_seed(1)) ** 3  # skewed
    for k in (1, 2, 8):
        levels, mse = lloyd_1d(small, k)
        for row in range(3):
            want_levels, want_mse = _lloyd_loop(small[row].double().numpy(), k)
            np.testing.assert_allclose(levels[row].numpy(), want_levels, rtol=1e-9, atol=1e-12)
            assert mse[row].item() == pytest.approx(want_mse, rel=1e-9, abs=1e-12)


def _levels_of(tc: TransformCoder, part: str, u: int, j: int, width: int) -> torch.Tensor:
    """The levels of coefficient j of unit u, from the stored tensors, written out plainly: up to 8
    bits its first 2^width Lloyd levels; above, each 8-bit cell cut into equal parts."""
    lv = tc.t[f"{part}.levels"][u, j].double()
    if width <= 8:
        return lv[: 2**width]
    lo = min(float(tc.t[f"{part}.lo"][u, j]), float(lv[0]))
    hi = max(float(tc.t[f"{part}.hi"][u, j]), float(lv[-1]))
    edges = [lo] + [float(lv[i] + lv[i + 1]) / 2 for i in range(255)] + [hi]
    n = 2 ** (width - 8)
    return torch.tensor(
        [edges[i] + (t + 0.5) * (edges[i + 1] - edges[i]) / n for i in range(256) for t in range(n)],
        dtype=torch.float64,
    )


def test_refined_levels_cut_every_8_bit_cell_in_equal_parts() -> None:
    x = torch.randn(3, 5000, generator=torch.Generator().manual_seed(7)) ** 3
    lv, _ = lloyd_1d(x, 256)
    lo, hi = x.min(1).values.double(), x.max(1).values.double()
    for bits in (9, 11):
        table = refined_levels(lv, lo, hi, bits)
        assert table.shape == (3, 2**bits) and bool((table.diff(dim=1) >= 0).all())
        n = 2 ** (bits - 8)
        for row in range(3):
            edges = torch.cat([lo[row : row + 1], (lv[row, 1:] + lv[row, :-1]) / 2, hi[row : row + 1]])
            for i in (0, 17, 255):
                want = edges[i] + (torch.arange(n, dtype=torch.float64) + 0.5) * (edges[i + 1] - edges[i]) / n
                torch.testing.assert_close(table[row, i * n : (i + 1) * n], want, rtol=0, atol=1e-12)
    # on Gaussian numbers each bit above 8 cuts the error about 4 times (cells are nearly flat
    # inside): at least 3
    x = torch.randn(3, 20000, generator=torch.Generator().manual_seed(8))
    lv, mse8 = lloyd_1d(x, 256)
    lo, hi = x.min(1).values.double(), x.max(1).values.double()
    for bits in (9, 10):
        table = refined_levels(lv, lo, hi, bits)
        q = table.gather(1, torch.searchsorted(((table[:, 1:] + table[:, :-1]) / 2).contiguous(), x.double()))
        mse = ((q - x.double()) ** 2).mean(1)
        assert bool((mse < mse8 / 3 ** (bits - 8)).all()), (bits, mse, mse8)


@pytest.mark.slow
def test_coefficients_that_need_more_than_8_bits_get_them() -> None:
    """Vectors whose dimensions span four orders of magnitude: at the same size, a codec allowed 12
    bits a coefficient spends them on the widest and errs less than one held to 8, and its decoded
    vectors are representable (coded again, the same codes)."""
    g = torch.Generator().manual_seed(9)
    Lm, K, _, D = SHAPE.dims
    scale = torch.logspace(-2, 2, D)
    keys, values = (torch.randn(Lm, K, 2000, D, generator=g) * scale for _ in range(2))
    test = torch.randn(1, Lm, K, 64, D, generator=g) * scale
    pos = torch.zeros(1, Lm, K, 64, dtype=torch.int32)
    err = {}
    for max_bits in (8, 12):
        tc = TransformCoder.fit(keys, values, 96, THETA, max_bits=max_bits)
        codes = tc.encode("v", test, pos)
        dec = tc.decode("v", codes, pos)
        assert np.array_equal(tc.encode("v", dec, pos), codes)
        err[max_bits] = float((dec - test).norm() / test.norm())
    assert int(tc.t["v.bits"].max()) > 8
    assert err[12] < err[8] / 2, err
    # what is saved is enough to decode: the refined levels are rebuilt from levels, lo and hi
    again = TransformCoder(tc.dims, THETA, tc.state())
    assert torch.equal(again.decode("v", codes, pos), dec)
    with pytest.raises(TransformError, match=r"v\.lo"):
        TransformCoder(tc.dims, THETA, {k: t for k, t in tc.state().items() if k != "v.lo"})


@pytest.mark.parametrize(("bits", "max_bits"), [(20, 6), (180, 12)])
@pytest.mark.slow
def test_codes_are_the_plain_bitstream_of_the_nearest_levels(bits: int, max_bits: int) -> None:
    keys, values = _units(300, seed=2)
    tc = TransformCoder.fit(keys, values, bits, THETA, max_bits=max_bits)
    if max_bits > 8:  # coefficients above 8 bits are coded with refined cells
        assert int(tc.t["k.bits"].max()) > 8
    mem = random_memories(3, SHAPE, seed=3, short=0)
    for part, x in (("k", mem.k), ("v", mem.v)):
        codes = tc.encode(part, x, mem.positions)
        pre = rotate(x, mem.positions, THETA, -1) if part == "k" else x
        U, D = SHAPE.layers * SHAPE.kv_heads, SHAPE.head_dim
        pre = pre.double().reshape(3, U, SHAPE.slots, D)
        bits = tc.t[f"{part}.bits"]
        for m in range(3):
            stream: list[int] = []
            coef = torch.stack(
                [
                    (pre[m, u] - tc.t[f"{part}.mean"][u].double()) @ tc.t[f"{part}.forward"][u].double()
                    for u in range(U)
                ]
            )  # (U, S, D)
            for width in range(1, max_bits + 1):  # each width in turn, its coefficients in unit order
                for u in range(U):
                    for j in range(D):
                        if int(bits[u, j]) != width:
                            continue
                        lv = _levels_of(tc, part, u, j, width)
                        for s in range(SHAPE.slots):
                            i = int(torch.argmin((coef[u, s, j] - lv).abs()))
                            stream += [(i >> (width - 1 - t)) & 1 for t in range(width)]
            want = np.packbits(np.array(stream, dtype=np.uint8))
            assert np.array_equal(codes[m], want), (part, m)
        assert codes.shape == (3, tc.part_bytes(part, SHAPE.slots))


@pytest.mark.slow
def test_decoding_is_exact_on_representable_vectors_and_error_falls_with_bits() -> None:
    train = random_memories(300, SHAPE, seed=1)
    test = random_memories(40, SHAPE, seed=4)
    errors = []
    for bits in (8, 16, 32, 64):
        codec = train_codec(train, CodecConfig(kind="transform", bits=bits), rope_theta=THETA)
        records = codec.encode(test)
        assert records.shape == (40, codec.record_bytes)
        dec = codec.decode(records, "x")
        assert torch.equal(dec.positions, test.positions)
        empty = test.positions < 0
        assert bool(empty.any()) and dec.k[empty].abs().max() == 0 and dec.v[empty].abs().max() == 0
        # decoded vectors are representable: coding them again gives the same codes and vectors
        again = codec.encode(dec)
        assert np.array_equal(again, records)
        torch.testing.assert_close(codec.decode(again, "x").k, dec.k, rtol=0, atol=1e-5)
        real = ~empty
        errors.append(float((dec.k - test.k)[real].norm() / test.k[real].norm()))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.15  # 4 bits per number on Gaussian-like vectors


def test_keys_are_coded_before_rope_so_their_position_does_not_change_the_code() -> None:
    keys, values = _units(300, seed=5)
    tc = TransformCoder.fit(keys, values, 24, THETA)
    g = torch.Generator().manual_seed(6)
    pre = torch.randn(1, *SHAPE.dims, generator=g)
    at = [torch.full((1, *SHAPE.dims[:3]), p, dtype=torch.int32) for p in (3, 90)]
    codes = [tc.encode("k", rotate(pre, pos, THETA, 1), pos) for pos in at]
    assert np.array_equal(codes[0], codes[1])
    a, b = (rotate(tc.decode("k", c, pos), pos, THETA, -1) for c, pos in zip(codes, at, strict=True))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_bits_follow_the_calibration() -> None:
    """A layer whose memories the answers never read gets no bits; the loss-weighted error of the
    calibrated codec is below that of plain mean-squared-error allocation at the same size."""
    keys, values = _units(400, seed=7)
    Lm, K, D = SHAPE.layers, SHAPE.kv_heads, SHAPE.head_dim
    g = torch.Generator().manual_seed(8)
    A = torch.randn(K, D, D, generator=g, dtype=torch.float64)
    F = torch.zeros(Lm, K, D, D, dtype=torch.float64)
    F[1] = A @ A.transpose(1, 2) / D  # only layer 1 matters
    cal = CodecCalibration(F.numpy(), (2 * F).numpy(), {"test": True})
    fisher = TransformCoder.fit(keys, values, 32, THETA, cal)
    mse = TransformCoder.fit(keys, values, 32, THETA)
    for part in ("k", "v"):
        bits = fisher.t[f"{part}.bits"].reshape(Lm, K, D)
        assert int(bits[0].sum()) == 0 and int(bits[1].sum()) > 0
    total = fisher.bits_per_slot("k") + fisher.bits_per_slot("v")
    assert total == mse.bits_per_slot("k") + mse.bits_per_slot("v") == 2 * 32 * Lm * K
    test_k, test_v = _units(50, seed=9)
    mem_pos = torch.full((50, Lm, K, SHAPE.slots), 7, dtype=torch.int32)[:, :, :, :1].expand(50, Lm, K, 1)
    x = {
        "k": rotate(test_k.permute(2, 0, 1, 3)[:, :, :, None], mem_pos, THETA, 1),
        "v": test_v.permute(2, 0, 1, 3)[:, :, :, None],
    }

    def loss_rise(coder: TransformCoder) -> float:
        rise = 0.0
        for part, Fp in (("k", F), ("v", 2 * F)):
            dec = coder.decode(part, coder.encode(part, x[part], mem_pos), mem_pos)
            e = dec - x[part]
            if part == "k":
                e = rotate(dec, mem_pos, THETA, -1) - rotate(x[part], mem_pos, THETA, -1)
            e = e[:, :, :, 0].double()  # (N, Lm, K, D)
            rise += float(torch.einsum("nlkd,lkde,nlke->", e, Fp, e))
        return rise

    assert loss_rise(fisher) < 0.5 * loss_rise(mse)


def test_calibration_files_round_trip_and_wrong_shapes_are_refused(tmp_path) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 2, 16, 16))
    cal = CodecCalibration(
        a @ a.transpose(0, 1, 3, 2), np.eye(16)[None, None].repeat(2, 0).repeat(2, 1), {"g": 3}
    )
    cal.save(tmp_path / "codec_calibration.safetensors")
    back = find_calibration(tmp_path)
    assert back is not None and back.meta == {"g": 3}
    np.testing.assert_allclose(back.key_fisher, cal.key_fisher, rtol=1e-6)
    assert find_calibration(tmp_path / "elsewhere") is None
    with pytest.raises(FileNotFoundError, match="memory3 train calibrate"):
        CodecCalibration.load(tmp_path / "missing.safetensors")
    keys, values = _units(50, seed=1)
    small = CodecCalibration(np.zeros((1, 2, 16, 16)), np.zeros((1, 2, 16, 16)))
    with pytest.raises(TransformError, match="calibrate this model"):
        TransformCoder.fit(keys, values, 16, THETA, small)
    with pytest.raises(TransformError, match="NaN"):
        CodecCalibration(np.full((1, 1, 4, 4), np.nan), np.zeros((1, 1, 4, 4)))


@pytest.mark.slow
def test_transform_codec_files_describe_themselves_and_refuse_damage(tmp_path) -> None:
    assert CodecConfig.parse("tc96") == CodecConfig(kind="transform", bits=96)
    assert CodecConfig.parse("SQ8").factory == "SQ8" and CodecConfig.parse("none").kind == "none"
    # other codecs' configs (and so the fingerprints of existing banks) carry no transform fields
    assert "bits" not in CodecConfig(kind="faiss").to_dict()
    with pytest.raises(ValueError, match="takes no factory"):
        CodecConfig(kind="transform", factory="SQ8")
    train = random_memories(200, SHAPE, seed=1)
    with pytest.raises(CodecError, match="rope_theta"):
        train_codec(train, CodecConfig(kind="transform", bits=16))
    codec = train_codec(train, CodecConfig(kind="transform", bits=16), rope_theta=THETA)
    with pytest.raises(CodecError, match="train_codec"):
        codec.train(np.zeros((2, 10, 16), np.float32), np.zeros((2, 10, 16), np.float32))
    assert "tc16" in repr(codec) and "mse" in repr(codec)
    test = random_memories(10, SHAPE, seed=2)
    records = codec.encode(test)
    codec.save(tmp_path / "codec")
    meta = json.loads((tmp_path / "codec" / "codec.json").read_text())
    assert meta["transform"]["rope_theta"] == THETA and meta["transform"]["metric"] == "mse"
    loaded = MemoryCodec.load(tmp_path / "codec")
    assert loaded.fingerprint == codec.fingerprint and np.array_equal(loaded.encode(test), records)
    out = loaded.decode(records, "x")
    assert isinstance(out, Memories) and out.k.shape == test.k.shape
    f = tmp_path / "codec" / "transform.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x40  # a stored number changes
    f.write_bytes(bytes(raw))
    with pytest.raises(CodecError, match="damaged"):
        MemoryCodec.load(tmp_path / "codec")
    f.write_bytes(b"not a safetensors file")
    with pytest.raises(CodecError, match="damaged"):
        MemoryCodec.load(tmp_path / "codec")


@pytest.mark.slow
def test_the_storage_table_sizes_a_transform_codec_as_the_store_writes_it() -> None:
    from memory3.eval.storage import codec_size

    codec = train_codec(random_memories(200, SHAPE, seed=1), CodecConfig.parse("tc16"), rope_theta=THETA)
    # each part rounds up to whole bytes per memory: at most 2 bytes over 2·Lm·K·S vectors
    slack = 2 / (2 * SHAPE.vectors)
    assert codec_size("tc16", SHAPE.head_dim).bytes_per_vector == pytest.approx(codec.code_bytes, abs=slack)


def test_a_calibration_left_beside_other_weights_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    from memory3.memory.transform import CALIBRATION_FILE, weights_digest_of

    save_file({"w": torch.ones(3)}, str(tmp_path / "adapter.safetensors"))
    cal = CodecCalibration(
        np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4, 4)), {"weights": weights_digest_of(tmp_path)}
    )
    cal.save(tmp_path / CALIBRATION_FILE)
    assert find_calibration(tmp_path) is not None
    save_file({"w": torch.zeros(3)}, str(tmp_path / "adapter.safetensors"))  # retrained weights
    with pytest.raises(TransformError, match="memory3 train calibrate --model"):
        find_calibration(tmp_path)
    given = (tmp_path / CALIBRATION_FILE).rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(TransformError, match="other weights"):  # a file given by path is checked too
        find_calibration(tmp_path, given)
    assert find_calibration(None, given) is not None  # no model directory to check against


def test_rotate_is_the_models_rope_to_the_bit() -> None:
    """`rotate` (used by the codec, the calibration and the benchmarks) computes the model's
    apply_rope on the halves of each vector: the same floats, either way round, empty slots
    (position -1) rotated by angle 0."""
    from memory3.model import apply_rope, rope_cos_sin

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 2, 8, 16, generator=g)
    pos = torch.randint(-1, 200, (2, 3, 2, 8), generator=g)
    cos, sin = rope_cos_sin(pos.clamp(min=0).reshape(1, -1), THETA, 16, torch.float32)
    for sign in (1, -1):
        want = apply_rope(x.reshape(-1, 16), cos[0, 0], sign * sin[0, 0]).reshape(x.shape)
        assert torch.equal(rotate(x, pos, THETA, sign), want)
    assert torch.allclose(rotate(rotate(x, pos, THETA, 1), pos, THETA, -1), x, atol=1e-5)


def test_gradients_rotated_back_are_the_gradients_of_the_keys_before_rope() -> None:
    """What `memory3 train calibrate` does with a post-RoPE key's gradient equals autograd
    through the model's own RoPE."""
    from memory3.model import apply_rope, rope_cos_sin

    g = torch.Generator().manual_seed(0)
    pre = torch.randn(2, 1, 1, 3, 16, generator=g, requires_grad=True)
    pos = torch.tensor([[[[4, 9, 77]]], [[[0, 3, 120]]]])
    cos, sin = rope_cos_sin(pos.reshape(1, -1), THETA, 16, torch.float32)
    post = apply_rope(pre.reshape(1, 1, -1, 16), cos, sin).reshape(pre.shape)
    weight = torch.randn(post.shape, generator=g)
    post_leaf = post.detach().requires_grad_(True)
    (post_leaf * weight).sum().backward()
    (post * weight).sum().backward()
    torch.testing.assert_close(rotate(post_leaf.grad, pos, THETA, -1), pre.grad)


def test_codec_names_spell_the_bit_cap() -> None:
    assert CodecConfig.parse("tc96") == CodecConfig(kind="transform", bits=96)
    capped = CodecConfig.parse("tc96m8")
    assert (capped.bits, capped.max_bits, capped.name) == (96, 8, "tc96m8")
    assert CodecConfig.parse(capped.name) == capped and CodecConfig.parse("tc96").name == "tc96"
    with pytest.raises(ValueError, match=r"max_bits must be 1\.\.16"):
        CodecConfig.parse("tc96m17")
