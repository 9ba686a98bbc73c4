"""Transform coding of memories: a few bits per number, spent where the answers need them.

The codec behind `CodecConfig(kind="transform", bits=B)` (`--codec tc<B>`). For every memory layer,
kv head and part (keys before RoPE, values) — a *unit* — vectors x are coded as

    c = (x − μ) · F        coefficients in an eigenbasis (F = G^½ · V)
    ĉ_j = Q_j(c_j)         one scalar quantizer of b_j bits per coefficient (b_j may be 0)
    x̂ = ĉ · F⁻¹ + μ

where V diagonalises the covariance of (x − μ)·G^½ and G is the metric errors are counted in.
With a model's `CodecCalibration` G is the Fisher matrix of the answer loss with respect to that
unit's vectors (measured on question answering, `memory3 train calibrate`), so ½·eᵀGe is the rise
of the loss an error e causes; bits then go one at a time, over every coefficient of every unit
of keys and values together, to the one whose quantizer lowers the expected loss most. Layers and
heads the answers barely read get few bits or none, and a few directions they read closely get
many: up to 8 bits Q_j is a Lloyd quantizer; above (up to `MAX_BITS`), each cell of the coefficient's
8-bit Lloyd quantizer is cut into 2^(b−8) equal parts, so that its levels need no table of 2^b
entries per coefficient to be stored and are not fitted to a few samples each. Without a
calibration G is the identity and
each part gets `bits` per vector (plain mean squared error; measured much worse in answers).

Codes are bit-packed per memory and part: for each bit width b in turn, the coefficients (over all
units) coded with b bits, for each its code in every slot, most significant bit first. Every memory of a codec takes the same
number of bytes, so records stay fixed-size. Keys are coded before RoPE (their statistics do not
depend on the position then) and rotated back with the positions stored in the record.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memory3.errors import ConfigError
from memory3.model import rope_cos_sin
from memory3.rope import RoPE

PARTS = ("k", "v")
LLOYD_BITS = 8  # up to this many bits a coefficient has its own Lloyd levels; above, refined cells
MAX_BITS = 16
CALIBRATION_FILE = "codec_calibration.safetensors"


class TransformError(ConfigError):
    """A transform codec or calibration that is damaged or does not fit the memories given."""


def rope_tables(positions: int, head_dim: int, rope: RoPE | float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE for positions 0..positions-1: two (positions, head_dim) tables (scaled
    by the attention factor of YaRN, as the model's are)."""
    cos, sin = rope_cos_sin(torch.arange(positions)[None], rope, head_dim, torch.float32)
    return cos[0, 0], sin[0, 0]


def rotate(
    k: torch.Tensor,
    positions: torch.Tensor,
    rope: RoPE | float,
    sign: int,
    tables: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(M, Lm, K, S, D) keys rotated by their positions' RoPE angles (sign 1: to after RoPE) or
    by the transposed map (sign -1: back to before RoPE, up to YaRN's attention factor squared,
    see `unrotate`; for a gradient the transpose is what is wanted). Empty slots (position -1)
    are rotated by angle 0. `tables`: `rope_tables` covering every position (made here when not
    given)."""
    D, h = k.shape[-1], k.shape[-1] // 2
    at = positions.clamp(min=0).reshape(-1).long().to(k.device)
    if tables is None:
        tables = rope_tables(int(at.max()) + 1 if at.numel() else 1, D, rope)
    # apply_rope's x·cos + rotate_half(x)·sin, written on the two halves (the tables repeat their
    # first half): the same products and sums, so the same floats, in fewer passes over memory
    cos, sin = (t[:, :h].to(k.device).index_select(0, at) for t in tables)
    x = k.float().reshape(-1, D)
    x1, x2 = x[:, :h], x[:, h:]
    out = torch.empty_like(x)
    if sign > 0:
        torch.sub(x1 * cos, x2 * sin, out=out[:, :h])
        torch.add(x2 * cos, x1 * sin, out=out[:, h:])
    else:  # the angle negated
        torch.add(x1 * cos, x2 * sin, out=out[:, :h])
        torch.sub(x2 * cos, x1 * sin, out=out[:, h:])
    return out.reshape(k.shape)


def unrotate(
    k: torch.Tensor, positions: torch.Tensor, rope: RoPE | float, tables: tuple | None = None
) -> torch.Tensor:
    """Keys after RoPE -> before RoPE: `rotate` with sign -1, divided by the square of YaRN's
    attention factor (1 for every other RoPE), which scales both directions' tables."""
    out = rotate(k, positions, rope, -1, tables)
    scale = RoPE.of(rope).frequencies(k.shape[-1])[1]
    return out if scale == 1.0 else out / (scale * scale)


@dataclass
class CodecCalibration:
    """What a model's answers are sensitive to, for a transform codec: per memory layer and kv head
    the Fisher matrix (D × D) of the answer loss with respect to a memory's key vector (before
    RoPE) and value vector, averaged over the memory slots read. `meta` says how it was measured."""

    key_fisher: np.ndarray  # (Lm, K, D, D)
    value_fisher: np.ndarray  # (Lm, K, D, D)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("key_fisher", "value_fisher"):
            a = getattr(self, name)
            if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
                raise TransformError(f"calibration {name} must be (Lm, K, D, D), got {a.shape}")
            if not np.isfinite(a).all():
                raise TransformError(f"calibration {name} holds NaN or inf: measure it again")
        if self.key_fisher.shape != self.value_fisher.shape:
            raise TransformError(
                f"calibration key and value Fisher shapes differ: {self.key_fisher.shape} and "
                f"{self.value_fisher.shape}"
            )

    @property
    def dims(self) -> tuple[int, int, int]:
        """(Lm, K, D)."""
        Lm, K, D, _ = self.key_fisher.shape
        return Lm, K, D

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "key_fisher": np.ascontiguousarray(self.key_fisher, dtype=np.float32),
            "value_fisher": np.ascontiguousarray(self.value_fisher, dtype=np.float32),
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(self.meta, sort_keys=True)})
        tmp.chmod(0o644)  # readable as the model files beside it are
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CodecCalibration:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no codec calibration here; measure one with `memory3 train calibrate`"
            )
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            return cls(
                f.get_tensor("key_fisher").astype(np.float64),
                f.get_tensor("value_fisher").astype(np.float64),
                meta,
            )


def weights_digest_of(model_dir: str | Path) -> str:
    """sha256 of a model directory's weight files (every `*.safetensors` but the calibration):
    what a calibration was measured with, so that one left beside retrained weights is refused."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        if f.name == CALIBRATION_FILE:
            continue
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def find_calibration(
    model_path: str | Path | None, file: str | Path | None = None
) -> CodecCalibration | None:
    """The calibration saved beside a model (`codec_calibration.safetensors` in its directory),
    or the one in `file`; checked against the model's weights when it recorded them."""
    if file is None:
        if model_path is None or not (Path(model_path) / CALIBRATION_FILE).is_file():
            return None
        file = Path(model_path) / CALIBRATION_FILE
    elif not Path(file).is_file():
        raise FileNotFoundError(
            f"no calibration at {file}: measure one with `memory3 train calibrate --model MODEL --out {file}`"
        )
    cal = CodecCalibration.load(file)
    want = cal.meta.get("weights")
    if want is not None and model_path is not None and want != weights_digest_of(model_path):
        raise TransformError(
            f"{file} was measured with other weights than those in {model_path} (weights {want}, now "
            f"{weights_digest_of(model_path)}): measure it again with `memory3 train calibrate --model "
            f"{model_path}`, or leave it out to allocate bits by mean squared error"
        )
    return cal


def lloyd_1d(x: torch.Tensor, levels: int, iters: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd quantizers of `levels` levels for each row of x (C, N), all rows at once: the sorted
    levels (C, levels) and each row's mean squared error (C,). Started at quantiles; a cell of a
    sorted row is a contiguous range, so its sum comes from prefix sums."""
    C, N = x.shape
    xs = x.double().sort(dim=1).values
    zero = torch.zeros(C, 1, dtype=torch.float64)
    p1 = torch.cat([zero, xs.cumsum(1)], 1)
    p2 = torch.cat([zero, (xs * xs).cumsum(1)], 1)
    if levels == 1:
        mean = p1[:, -1:] / N
        return mean, (p2[:, -1] / N - mean[:, 0] ** 2).clamp(min=0)
    at = ((torch.arange(levels, dtype=torch.float64) + 0.5) / levels * N).long().clamp(max=N - 1)
    lv = xs[:, at]

    def cells(lv: torch.Tensor) -> torch.Tensor:
        mids = (lv[:, 1:] + lv[:, :-1]) / 2
        cut = torch.searchsorted(xs, mids.contiguous())
        return torch.cat([torch.zeros(C, 1, dtype=torch.long), cut, torch.full((C, 1), N)], 1)

    for _ in range(iters):
        e = cells(lv)
        sums = p1.gather(1, e[:, 1:]) - p1.gather(1, e[:, :-1])
        counts = (e[:, 1:] - e[:, :-1]).double()
        lv = torch.where(counts > 0, sums / counts.clamp(min=1), lv).sort(dim=1).values
    e = cells(lv)
    s1 = p1.gather(1, e[:, 1:]) - p1.gather(1, e[:, :-1])
    s2 = p2.gather(1, e[:, 1:]) - p2.gather(1, e[:, :-1])
    counts = (e[:, 1:] - e[:, :-1]).double()
    mse = (s2 - 2 * lv * s1 + lv * lv * counts).sum(1) / N
    return lv, mse.clamp(min=0)


class TransformCoder:
    """The fitted transform codec of both parts. Tensors per part, with U = Lm·K units:
    mean (U, D), forward and inverse (U, D, D), bits (U, D) int and levels (U, D, L) with
    L = 2^min(max_bits, 8) (a coefficient of b ≤ 8 bits uses its first 2^b levels, sorted; the rest
    repeat the last one; one of more bits holds its 8-bit Lloyd levels, refined by
    `refined_levels` within the range lo (U, D) to hi (U, D) of its training coefficients, two
    tensors a codec has only when some coefficient has more than 8 bits)."""

    def __init__(
        self, dims: tuple[int, int, int], rope: RoPE | float, tensors: dict[str, torch.Tensor]
    ) -> None:
        self.dims, self.rope = dims, RoPE.of(rope)
        Lm, K, D = dims
        U = Lm * K
        self.t = {name: t.contiguous() for name, t in tensors.items()}
        for p in PARTS:
            want = {
                f"{p}.mean": (U, D),
                f"{p}.forward": (U, D, D),
                f"{p}.inverse": (U, D, D),
                f"{p}.bits": (U, D),
            }
            for name, shape in want.items():
                if name not in self.t or tuple(self.t[name].shape) != shape:
                    got = tuple(self.t[name].shape) if name in self.t else None
                    raise TransformError(f"transform codec tensor {name}: want {shape}, got {got}")
            levels = self.t.get(f"{p}.levels")
            if levels is None or levels.ndim != 3 or levels.shape[:2] != (U, D):
                raise TransformError(f"transform codec tensor {p}.levels does not fit {U} units of {D}")
            bits = self.t[f"{p}.bits"]
            top = int(bits.max())
            if int(bits.min()) < 0 or top > MAX_BITS or 2 ** min(top, LLOYD_BITS) > levels.shape[-1]:
                raise TransformError(
                    f"transform codec tensor {p}.bits holds {int(bits.min())}..{top} bits "
                    f"for {levels.shape[-1]} levels"
                )
            if top > LLOYD_BITS:
                for name in (f"{p}.lo", f"{p}.hi"):
                    if name not in self.t or tuple(self.t[name].shape) != (U, D):
                        raise TransformError(
                            f"transform codec tensor {name}: want {(U, D)} for coefficients of "
                            f"{top} bits, got {tuple(self.t[name].shape) if name in self.t else None}"
                        )
        self._layout: dict[str, _Layout] = {}
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- fitting ---------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        bits: int,
        rope: RoPE | float,
        calibration: CodecCalibration | None = None,
        max_bits: int = 12,
        ridge: float = 1e-3,
    ) -> TransformCoder:
        """Fit on (Lm, K, N, D) key vectors before RoPE and value vectors of real slots: `bits`
        per vector on average over keys and values. With a calibration, errors are weighed by its
        Fisher matrices (plus `ridge` × their mean eigenvalue, so that no direction is free) and
        bits are allocated over both parts at once; without, by mean squared error, per part."""
        Lm, K, N, D = keys.shape
        if values.shape != keys.shape:
            raise TransformError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ")
        if calibration is not None and calibration.dims != (Lm, K, D):
            raise TransformError(
                f"the calibration is for memories of (layers, kv heads, head dim) {calibration.dims}, "
                f"these are {(Lm, K, D)}: calibrate this model and memory config"
            )
        if N < 2:
            raise TransformError(f"{N} vectors per unit: a transform codec needs at least 2 to fit")
        if not 1 <= max_bits <= MAX_BITS:
            raise TransformError(f"max_bits must be 1..{MAX_BITS}, got {max_bits}")
        U, L = Lm * K, 2 ** min(max_bits, LLOYD_BITS)
        tensors: dict[str, torch.Tensor] = {}
        errs, tables = [], []
        for p, x in zip(PARTS, (keys, values), strict=True):
            x = x.double().reshape(U, N, D)
            mean = x.mean(1)
            if calibration is None:
                G = torch.eye(D, dtype=torch.float64).expand(U, D, D)
            else:
                fisher = calibration.key_fisher if p == "k" else calibration.value_fisher
                F = torch.from_numpy(np.asarray(fisher, dtype=np.float64)).reshape(U, D, D)
                F = (F + F.transpose(1, 2)) / 2
                scale = torch.diagonal(F, dim1=1, dim2=2).mean(1).clamp(min=1e-30)
                G = F + ridge * scale[:, None, None] * torch.eye(D, dtype=torch.float64)
            g, W = torch.linalg.eigh(G)
            g = g.clamp(min=1e-12 * g.max(1, keepdim=True).values)
            root = W @ torch.diag_embed(g.sqrt()) @ W.transpose(1, 2)
            inv_root = W @ torch.diag_embed(g.rsqrt()) @ W.transpose(1, 2)
            y = (x - mean[:, None]) @ root
            cov = y.transpose(1, 2) @ y / max(N - 1, 1)
            _, V = torch.linalg.eigh(cov)
            forward, inverse = root @ V, V.transpose(1, 2) @ inv_root
            c = ((x - mean[:, None]) @ forward).transpose(1, 2).reshape(U * D, N)  # rows: (unit, coef)
            fits = [_lloyd_rows(c, 2**b) for b in range(min(max_bits, LLOYD_BITS) + 1)]
            err = [e for _, e in fits]
            if max_bits > LLOYD_BITS:  # finer: the 8-bit cells cut in equal parts
                lo, hi = c.min(1).values, c.max(1).values
                err += [_refined_mse(c, fits[-1][0], lo, hi, b) for b in range(LLOYD_BITS + 1, max_bits + 1)]
                tensors[f"{p}.lo"], tensors[f"{p}.hi"] = lo.reshape(U, D), hi.reshape(U, D)
            errs.append(torch.stack(err, 1))  # (U·D, max_bits + 1)
            tables.append([lv for lv, _ in fits])
            tensors[f"{p}.mean"], tensors[f"{p}.forward"], tensors[f"{p}.inverse"] = mean, forward, inverse
        if calibration is not None:  # one allocation over both parts: errors are in loss units
            alloc = _allocate(torch.cat(errs), bits * 2 * U, max_bits).reshape(2, U, D)
        else:
            alloc = torch.stack([_allocate(e, bits * U, max_bits) for e in errs]).reshape(2, U, D)
        for i, p in enumerate(PARTS):
            b = alloc[i].reshape(-1)
            levels = torch.empty(U * D, L, dtype=torch.float64)
            for nb in range(max_bits + 1):
                rows = b == nb
                lv = tables[i][min(nb, LLOYD_BITS)][rows]  # above 8 bits: the 8-bit levels, refined
                levels[rows] = torch.cat([lv, lv[:, -1:].expand(-1, L - lv.shape[1])], 1)
            tensors[f"{p}.bits"] = alloc[i].to(torch.int32)
            tensors[f"{p}.levels"] = levels.reshape(U, D, L)
        return cls((Lm, K, D), rope, {k: _stored(v) for k, v in tensors.items()})

    # --- sizes -----------------------------------------------------------------------------
    def bits_per_slot(self, part: str) -> int:
        """Bits of one slot's vector summed over the units: a memory of S slots takes
        ceil(S · this / 8) bytes for this part."""
        return int(self.t[f"{part}.bits"].sum())

    def part_bytes(self, part: str, slots: int) -> int:
        return math.ceil(slots * self.bits_per_slot(part) / 8)

    # --- coding ----------------------------------------------------------------------------
    def _groups(self, part: str) -> _Layout:
        """How a part's codes are laid out: per bit width b ≥ 1 in turn, the coefficients (flat
        unit·D + j indices, ascending) coded with b bits; for each, each slot's code, most
        significant bit first. Decoding stacks the groups (after the coefficients without bits)
        and puts them back in unit order with one index_select."""
        if part not in self._layout:
            bits = self.t[f"{part}.bits"].reshape(-1).long()
            levels = self.t[f"{part}.levels"].reshape(bits.numel(), -1)
            zero = torch.nonzero(bits == 0).reshape(-1)
            groups = []
            for b in range(1, int(bits.max()) + 1):
                cols = torch.nonzero(bits == b).reshape(-1)
                if not len(cols):
                    continue
                if b <= LLOYD_BITS:
                    table = levels[cols, : 2**b].contiguous()  # (C, 2^b) levels
                else:
                    lo, hi = (self.t[f"{part}.{e}"].reshape(-1)[cols] for e in ("lo", "hi"))
                    table = refined_levels(levels[cols], lo, hi, b).float()
                groups.append((b, cols, table))
            order = torch.cat([zero, *[g[1] for g in groups]])
            self._layout[part] = _Layout(groups, levels[zero, 0].contiguous(), torch.argsort(order))
        return self._layout[part]

    def _pre(self, part: str, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(M, Lm, K, S, D) keys after RoPE or values -> coefficients (U·D, M, S), float64."""
        M, Lm, K, S, D = x.shape
        U = Lm * K
        if part == "k":
            x = self._rotate(x, positions, -1)
            scale = self.rope.frequencies(D)[1]
            if scale != 1.0:
                x = x / (scale * scale)
        x = x.double().reshape(M, U, S, D).transpose(0, 1).reshape(U, M * S, D)
        c = torch.bmm(x - self.t[f"{part}.mean"].double()[:, None], self.t[f"{part}.forward"].double())
        return c.reshape(U, M, S, D).permute(0, 3, 1, 2).reshape(U * D, M, S)

    def encode(self, part: str, x: torch.Tensor, positions: torch.Tensor) -> np.ndarray:
        """(M, Lm, K, S, D) keys after RoPE or values -> (M, part_bytes) uint8 codes: each
        coefficient's nearest level."""
        M, Lm, K, S, D = x.shape
        if (Lm, K, D) != self.dims:
            raise TransformError(f"memories of (Lm, K, D) {(Lm, K, D)} do not fit this codec {self.dims}")
        c = self._pre(part, x, positions)
        chunks = []
        for b, cols, table in self._groups(part).groups:
            lv = table.double()  # sorted levels
            bounds = ((lv[:, 1:] + lv[:, :-1]) / 2).contiguous()
            code = torch.searchsorted(bounds, c[cols].reshape(len(cols), M * S).contiguous())
            code = code.reshape(len(cols), M, S).transpose(0, 1)  # (M, C, S)
            shifts = torch.arange(b - 1, -1, -1)
            chunks.append(((code[..., None] >> shifts) & 1).reshape(M, -1))
        if not chunks:
            return np.zeros((M, 0), dtype=np.uint8)
        return np.packbits(torch.cat(chunks, 1).to(torch.uint8).numpy(), axis=1)

    def decode(self, part: str, codes: np.ndarray, positions: torch.Tensor) -> torch.Tensor:
        """(M, part_bytes) uint8 codes and (M, Lm, K, S) positions -> (M, Lm, K, S, D) float32
        keys after RoPE or values."""
        M, Lm, K, S = positions.shape
        U, D = Lm * K, self.dims[2]
        layout = self._groups(part)
        n = sum(b * len(cols) for b, cols, _ in layout.groups) * S
        stream = torch.from_numpy(np.unpackbits(np.ascontiguousarray(codes), axis=1, count=n))
        blocks = [layout.constant[:, None, None].expand(-1, M, S)]  # coefficients without bits
        at = 0
        for b, cols, table in layout.groups:
            size = S * len(cols) * b
            bits = stream[:, at : at + size].reshape(M, len(cols), S, b).transpose(0, 1)  # (C, M, S, b)
            at += size
            code = bits[..., 0]  # uint8 arithmetic up to 8 bits
            if b > 8:
                code = code.to(torch.int32)
            for t in range(1, b):
                code = code * 2 + bits[..., t]
            index = code.reshape(len(cols), M * S).long()
            blocks.append(torch.gather(table, 1, index).reshape(-1, M, S))
        c = torch.cat(blocks).index_select(0, layout.unit_order).reshape(U, D, M * S)
        x = torch.baddbmm(self.t[f"{part}.mean"][:, None], c.transpose(1, 2), self.t[f"{part}.inverse"])
        x = x.reshape(Lm, K, M, S, D).permute(2, 0, 1, 3, 4)
        if part == "k":
            return self._rotate(x, positions, 1)
        return x.contiguous()

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor, sign: int) -> torch.Tensor:
        """`rotate` with this codec's RoPE tables, kept (positions are small integers)."""
        top = int(positions.max()) + 1 if positions.numel() else 1
        if self._rope is None or self._rope[0].shape[0] < top:
            self._rope = rope_tables(max(top, 256), self.dims[2], self.rope)
        return rotate(x, positions, self.rope, sign, self._rope)

    # --- identity --------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.t)


@dataclass
class _Layout:
    groups: list[tuple[int, torch.Tensor, torch.Tensor]]  # (b, columns, their (C, 2^b) levels)
    constant: torch.Tensor  # the one level of each coefficient without bits
    unit_order: torch.Tensor  # rows of [no-bit coefficients, groups...] -> flat unit·D + j order


def _lloyd_rows(x: torch.Tensor, levels: int, rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """`lloyd_1d` over blocks of rows, so that fitting a whole model's coefficients at once does
    not hold several float64 copies of all of them."""
    parts = [lloyd_1d(x[i : i + rows], levels) for i in range(0, x.shape[0], rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def refined_levels(levels: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """The levels of a quantizer of `bits` > 8 bits built on an 8-bit one: each cell of the sorted
    8-bit `levels` (C, 256) — between the midpoints of neighbouring levels, the outer cells bounded by
    the coefficient's range `lo` (C,) and `hi` (C,) — cut into 2^(bits − 8) equal parts, a level in
    the middle of each. (C, 2^bits), sorted. At high rates a quantizer should be denser where the
    coefficients are, as the Lloyd cells are; within a cell the density is nearly flat."""
    parts = 2 ** (bits - LLOYD_BITS)
    lv = levels.double()
    lo = torch.minimum(lo.double(), lv[:, 0])
    hi = torch.maximum(hi.double(), lv[:, -1])
    edges = torch.cat([lo[:, None], (lv[:, 1:] + lv[:, :-1]) / 2, hi[:, None]], 1)
    width = (edges[:, 1:] - edges[:, :-1]) / parts
    at = torch.arange(parts, dtype=torch.float64) + 0.5
    return (edges[:, :-1, None] + width[..., None] * at).reshape(len(lv), -1)


def _refined_mse(
    x: torch.Tensor, levels: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, rows: int = 64
) -> torch.Tensor:
    """The mean squared error (C,) of coding each row of x (C, N) with its `refined_levels` at
    `bits` (nearest level), over blocks of rows. The levels themselves are not kept: coding
    rebuilds them from the 8-bit `levels` and the range."""
    errs = []
    for i in range(0, x.shape[0], rows):
        table = refined_levels(levels[i : i + rows], lo[i : i + rows], hi[i : i + rows], bits)
        xs = x[i : i + rows].double().contiguous()
        bounds = ((table[:, 1:] + table[:, :-1]) / 2).contiguous()
        q = table.gather(1, torch.searchsorted(bounds, xs))
        errs.append(((q - xs) ** 2).mean(1))
    return torch.cat(errs)


def _stored(t: torch.Tensor) -> torch.Tensor:
    """Bases and levels are kept in float32 (what decoding computes in); bits as int32."""
    return t.to(torch.int32) if not t.is_floating_point() else t.to(torch.float32)


def _allocate(err: torch.Tensor, budget: int, max_bits: int) -> torch.Tensor:
    """Greedy bit allocation: `budget` bits, one at a time, each to the row whose error drops most
    with one more bit. err (R, max_bits + 1) -> bits (R,)."""
    R = err.shape[0]
    bits = torch.zeros(R, dtype=torch.long)
    gain = err[:, 0] - err[:, 1]
    for _ in range(min(budget, R * max_bits)):
        r = int(gain.argmax())
        bits[r] += 1
        b = int(bits[r])
        gain[r] = err[r, b] - err[r, b + 1] if b < max_bits else -math.inf
    return bits
