"""Building a memory bank from a corpus, resumably (docs/design.md, "Storing memories").

    1. read and chunk the corpus into references of ≤128 tokens        (memory.ingest)
    2. train the codec on memories of uniformly sampled references     (memory.codec, §3.3)
    3. create the store and register every reference as pending        (one transaction)
    4. write memories for pending references, batch by batch           (memory.write; skipped in cold start)
    5. embed every reference and build the FAISS index                 (retrieval.embed / index)

Steps 4 and 5 overlap when there is hardware to spare (`BuildConfig.overlap_embedding`): the
embedder runs in a second thread while the writer fills memories, so on a machine with a free core
(or with the writer on an accelerator) the embedding costs no wall time.

Every step is idempotent: a build killed at any moment (kill -9) and run again with the same
arguments picks up where it stopped and ends with the same store. Embeddings are saved per batch
under `embeddings.partial/` so that they are not computed twice either.

Distributed: under `torchrun`, rank r builds the documents i ≡ r (mod world size) into its own part
with the codec trained by rank 0; rank 0 then merges the parts (shard files are moved, not copied)
and builds one index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from memory3.config import MemoryConfig
from memory3.faults import crash_point
from memory3.memory.codec import CodecConfig, MemoryCodec, train_codec
from memory3.memory.ingest import Document, IngestStats, Reference, chunk_documents
from memory3.memory.manifest import INDEX_DIR
from memory3.memory.merge import merge_stores
from memory3.memory.store import MemoryStore, RefMeta
from memory3.memory.transform import CodecCalibration
from memory3.memory.write import Memories, MemoryWriter
from memory3.model import Memory3Model
from memory3.retrieval.embed import get_embedder
from memory3.retrieval.index import IndexConfig, VectorIndex

log = logging.getLogger(__name__)

PARTIAL = "embeddings.partial"  # per-batch embeddings of an unfinished build, beside index/


@dataclass(frozen=True)
class BuildConfig:
    # the model as the build named it (a shipped name or a directory), recorded in the manifest:
    # the one to load to read the bank
    model: str = ""
    codec: CodecConfig = field(default_factory=CodecConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    embedder: str = "minilm"
    batch_size: int = 16  # references per forward pass of the writer
    codec_train_references: int = 512  # sampled uniformly to train the codec
    cold: bool = False  # register and index only; memories are written when first retrieved
    # Embed in a second thread while memories are written: "auto" does so when the writer leaves
    # a CPU core free (torch threads < cores) or runs on an accelerator; "on" / "off" force it.
    overlap_embedding: Literal["auto", "on", "off"] = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.overlap_embedding not in ("auto", "on", "off"):
            raise ValueError(
                f"overlap_embedding must be 'auto', 'on' or 'off', got {self.overlap_embedding!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BuildSummary:
    path: str
    references: int
    written: int  # memories written by this run
    ingest: dict[str, int]  # documents read, references made, inputs skipped and why
    bytes: int
    seconds: float
    references_per_s: float
    resumed: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _digest(refs: list[Reference]) -> str:
    h = hashlib.sha256()
    for r in refs:
        h.update(r.ref_id.encode())
        h.update(np.asarray(r.token_ids, dtype="<i4").tobytes())
    return h.hexdigest()[:16]


def codec_sample(n_refs: int, config: BuildConfig) -> list[int]:
    """Which of `n_refs` references a build fits its codec on (§3.3: uniformly sampled), in order."""
    return random.Random(config.seed).sample(range(n_refs), min(n_refs, config.codec_train_references))


def fit_codec(
    memories: list[Memories] | Memories,
    config: BuildConfig,
    rope_theta: float,
    kept_tokens: int,
    calibration: CodecCalibration | None = None,
) -> MemoryCodec:
    """The build's codec fitted on the sampled references' memories, with a warning when a
    transform codec has no calibration or one measured at other kept tokens."""
    if config.codec.kind == "transform" and calibration is None:
        log.warning(
            "codec %s without a calibration of this model: bits are allocated by mean squared error, "
            "which costs far more answers; measure one with `memory3 train calibrate --model ...`",
            config.codec.name,
        )
    measured = (calibration.meta.get("memory_config") or {}) if calibration is not None else {}
    if measured.get("kept_tokens") not in (None, kept_tokens):
        log.warning(
            "the model's codec calibration was measured with %s kept tokens, this bank keeps %d: its bit "
            "allocation is an approximation here (`memory3 train calibrate --kept-tokens %d` measures it)",
            measured["kept_tokens"],
            kept_tokens,
            kept_tokens,
        )
    return train_codec(memories, config.codec, rope_theta=rope_theta, calibration=calibration)


def _codec_for(
    refs: list[Reference],
    writer: MemoryWriter,
    config: BuildConfig,
    progress: bool,
    calibration: CodecCalibration | None = None,
) -> MemoryCodec:
    sample = [refs[i] for i in codec_sample(len(refs), config)]
    mems = []
    with torch.inference_mode():
        for s in tqdm(
            range(0, len(sample), config.batch_size), desc="codec sample", disable=not progress, unit="batch"
        ):
            batch = sample[s : s + config.batch_size]
            mems.append(
                writer.write([list(r.token_ids) for r in batch], config.batch_size).to("cpu", torch.float32)
            )
    theta = writer.model.config.rope
    return fit_codec(mems, config, theta, writer.config.kept_tokens, calibration)


def build(
    docs: Iterable[Document],
    out: str | Path,
    model: Memory3Model,
    tokenizer: Any,
    memory_config: MemoryConfig | None = None,
    config: BuildConfig | None = None,
    progress: bool = True,
    stats: IngestStats | None = None,
    codec: MemoryCodec | None = None,
    index: bool = True,
    calibration: CodecCalibration | None = None,
) -> BuildSummary:
    """Build (or resume building) the memory bank at `out` from `docs`. `calibration`: the
    model's, for a transform codec (`memory3.memory.transform.find_calibration`)."""
    t0 = time.perf_counter()
    out = Path(out)
    mem_cfg = memory_config or MemoryConfig()
    config = config or BuildConfig()
    stats = stats if stats is not None else IngestStats()
    writer = MemoryWriter.for_model(model, tokenizer, mem_cfg)
    refs = list(
        chunk_documents(
            tqdm(docs, desc="read", disable=not progress, unit="doc"),
            tokenizer,
            mem_cfg.reference_tokens,
            stats=stats,
        )
    )
    if not refs:
        raise ValueError(f"nothing to remember: no text in the input ({stats.as_dict()})")
    digest = _digest(refs)
    resumed = (out / "manifest.json").exists()
    if resumed:
        store = MemoryStore.open(out, expect_fingerprint=writer.fingerprint, readonly=False)
        made_from = (store.manifest.get("extra") or {}).get("source_digest")
        if made_from != digest:
            store.close()
            raise ValueError(
                f"{out} was built from other input (digest {made_from}, now {digest}); choose a new "
                "--out, or change documents with `memory3 store add/delete`"
            )
    else:
        codec = codec or _codec_for(refs, writer, config, progress, calibration)
        store = MemoryStore.create(
            out, codec, writer.fingerprint, model.config, mem_cfg,
            extra={"source_digest": digest, "build": config.to_dict(), "references": len(refs)},
        )  # fmt: skip
    try:
        if store.counts()["records"] == 0 and len(store.pending_ids()) == 0 and len(store.live_ids()) == 0:
            store.add_pending([RefMeta(r.doc_id, r.index, r.text, r.title, r.token_ids) for r in refs])
            crash_point("build.registered")
        embedding = None
        if index and not config.cold and _overlap(config, model):
            embedding = _EmbedInBackground(store, config, progress)
        try:
            written = 0 if config.cold else _fill(store, writer, config, progress)
        except BaseException:
            if embedding is not None:  # stop after the batch at hand; what is saved stays saved
                embedding.stop.set()
                embedding.join(reraise=False)
            raise
        if embedding is not None:
            embedding.join()  # re-raises an embedder error; its finished batches stay on disk
        if index:
            _index(store, config, progress)
        size = sum(p.stat().st_size for p in (out / "shards").glob("*.bin"))
        n = store.counts()
    finally:
        store.close()
    dt = time.perf_counter() - t0
    summary = BuildSummary(
        str(out), n["live"] + n["pending"], written, stats.as_dict(), size, dt, written / dt, resumed
    )
    log.info("built %s", json.dumps(summary.to_dict()))
    return summary


def _fill(store: MemoryStore, writer: MemoryWriter, config: BuildConfig, progress: bool) -> int:
    # Shortest first: a batch pads to its longest reference, and a document's last chunk is short.
    # The order is a function of the pending set, so a resumed build continues the same sequence.
    pending = store.pending_ids(by_length=True).tolist()
    bar = tqdm(total=len(pending), desc="write memories", disable=not progress, unit="ref")
    written = 0
    for s in range(0, len(pending), config.batch_size):
        ids = pending[s : s + config.batch_size]
        metas = store.refs(ids)
        with torch.inference_mode():
            mem = writer.write([list(r.tokens or ()) for r in metas], config.batch_size)
        store.fill(ids, mem)
        crash_point("build.filled")
        written += len(ids)
        bar.update(len(ids))
    bar.close()
    return written


EMBED_BATCH = 256  # references per saved file of embeddings.partial/


def _overlap(config: BuildConfig, model: Memory3Model) -> bool:
    if config.overlap_embedding != "auto":
        return config.overlap_embedding == "on"
    on_accelerator = next(model.parameters()).device.type != "cpu"
    return on_accelerator or torch.get_num_threads() < (os.cpu_count() or 1)


def _index_ids(store: MemoryStore) -> np.ndarray:
    """The references the index holds once the build is done: every registered one (pending
    references become live as they are written), in id order."""
    return np.sort(np.concatenate((store.live_ids(), store.pending_ids())))


def _embed_batches(
    part_dir: Path,
    ids: np.ndarray,
    texts: Any,
    embedder: Any,
    progress: bool,
    desc: str = "embed",
    stop: threading.Event | None = None,
) -> None:
    """Embed `ids` in batches of EMBED_BATCH, one .npy per batch, skipping batches already saved.
    `texts(chunk_ids)` returns their texts; `stop`, once set, ends the loop before the next batch."""
    part_dir.mkdir(parents=True, exist_ok=True)
    for s in tqdm(range(0, len(ids), EMBED_BATCH), desc=desc, disable=not progress, unit="batch"):
        if stop is not None and stop.is_set():
            return
        f = part_dir / f"{s:09d}.npy"
        if f.exists():
            continue
        chunk = ids[s : s + EMBED_BATCH]
        vec = embedder.embed(texts(chunk.tolist())).astype(np.float32)
        tmp = part_dir / f".{s:09d}.tmp.npy"
        np.save(tmp, vec)
        os.replace(tmp, f)
        crash_point("build.embedded")


class _EmbedInBackground:
    """Embeds every reference of a build in a thread while the main thread writes memories.
    Texts are read from the store here, up front: the SQLite connection stays with the main thread."""

    def __init__(self, store: MemoryStore, config: BuildConfig, progress: bool) -> None:
        self.error: BaseException | None = None
        self.stop = threading.Event()
        part_dir = store.path / PARTIAL
        ids = _index_ids(store)
        # saved batches are NNNNNNNNN.npy; a .NNNNNNNNN.tmp.npy left by a kill is not one
        done = {int(f.stem) for f in part_dir.glob("[0-9]*.npy")} if part_dir.exists() else set()
        todo = [s for s in range(0, len(ids), EMBED_BATCH) if s not in done]
        wanted = [int(i) for s in todo for i in ids[s : s + EMBED_BATCH]]
        text_of = dict(zip(wanted, store.texts(wanted), strict=True))

        def run() -> None:
            try:
                embedder = get_embedder(config.embedder)
                _embed_batches(
                    part_dir,
                    ids,
                    lambda chunk: [text_of[i] for i in chunk],
                    embedder,
                    progress,
                    "embed (beside)",
                    self.stop,
                )
            except BaseException as e:  # handed to the main thread by join()
                self.error = e

        self.thread = threading.Thread(target=run, name="memory3-embed", daemon=True)
        self.thread.start()

    def join(self, reraise: bool = True) -> None:
        self.thread.join()
        if self.error is not None and reraise:
            raise self.error


def _index(store: MemoryStore, config: BuildConfig, progress: bool, again: bool = False) -> None:
    """Embed every reference (resumable: one .npy per batch) and build the retrieval index
    (`again`: also when the bank has one; it is replaced when the new one is complete)."""
    index_dir = store.path / INDEX_DIR
    if not again and (index_dir / "index.json").exists() and store.manifest.get("index"):
        return
    part_dir = store.path / PARTIAL
    ids = _index_ids(store)
    embedder = get_embedder(config.embedder)
    _embed_batches(part_dir, ids, store.texts, embedder, progress)
    vectors = np.concatenate([np.load(part_dir / f"{s:09d}.npy") for s in range(0, len(ids), EMBED_BATCH)])
    vindex = VectorIndex.build(vectors, ids, config.index)
    vindex.save(index_dir)
    crash_point("build.index_saved")
    store.set_index_info({**vindex.describe(), "embedder": embedder.spec()})
    for f in part_dir.glob("*.npy"):
        f.unlink()
    part_dir.rmdir()


def reindex(
    path: str | Path, embedder: str | None = None, index: IndexConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """Embed every reference of the bank at `path` again and replace its retrieval index, as a
    whole once the new one is complete (for a bank whose index is missing or damaged, or to
    change the embedder or the index kind). `embedder` / `index`: None keeps what the bank was
    built with."""
    with MemoryStore.open(path, readonly=False) as store:
        built = (store.manifest.get("extra") or {}).get("build") or {}
        spec = (store.manifest.get("index") or {}).get("embedder") or {}
        if embedder is None:
            embedder = built.get("embedder") or (
                f"hashing-{spec['dim']}" if spec.get("kind") == "hashing" else spec.get("name")
            )
        if index is None:
            index = IndexConfig(**built["index"]) if built.get("index") else IndexConfig()
        cfg = BuildConfig(embedder=embedder or "minilm", index=index)
        shutil.rmtree(store.path / PARTIAL, ignore_errors=True)  # maybe vectors of another embedder
        _index(store, cfg, progress, again=True)
        n = store.counts()
        return {
            "path": str(store.path),
            "indexed": n["live"] + n["pending"],
            "embedder": cfg.embedder,
            "index": (store.manifest.get("index") or {}).get("kind"),
        }


def build_distributed(
    docs: list[Document],
    out: str | Path,
    model: Memory3Model,
    tokenizer: Any,
    memory_config: MemoryConfig | None = None,
    config: BuildConfig | None = None,
    progress: bool = True,
    calibration: CodecCalibration | None = None,
) -> BuildSummary | None:
    """Under torchrun: each rank builds its share into `out.parts/rank-N`; rank 0 merges them.
    Returns the summary on rank 0, None elsewhere."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    joined = not dist.is_initialized()  # then leave it at the end: a rank exiting with it up can abort
    if joined:
        dist.init_process_group("gloo")
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    mem_cfg = memory_config or MemoryConfig()
    config = config or BuildConfig()
    codec_dir = parts / "codec"
    if rank == 0 and not (codec_dir / "codec.json").exists():
        # one codec for every part, so their records are interchangeable (merge moves shard files)
        writer = MemoryWriter.for_model(model, tokenizer, mem_cfg)
        refs = list(chunk_documents(docs, tokenizer, mem_cfg.reference_tokens))
        _codec_for(refs, writer, config, progress, calibration).save(codec_dir)
    dist.barrier()
    codec = MemoryCodec.load(codec_dir)
    mine = [d for i, d in enumerate(docs) if i % world == rank]
    part = parts / f"rank-{rank}"
    build(
        mine,
        part,
        model,
        tokenizer,
        mem_cfg,
        config,
        progress=progress and rank == 0,
        codec=codec,
        index=False,
    )
    dist.barrier()
    summary = None
    if rank == 0:
        t0 = time.perf_counter()
        merge_stores([parts / f"rank-{r}" for r in range(world)], out)
        store = MemoryStore.open(out, readonly=False)
        try:
            _index(store, config, progress)
            n = store.counts()
            size = sum(p.stat().st_size for p in (out / "shards").glob("*.bin"))
        finally:
            store.close()
        summary = BuildSummary(
            str(out), n["live"] + n["pending"], n["live"], {}, size, time.perf_counter() - t0, 0.0, False
        )
    dist.barrier()
    if joined:
        dist.destroy_process_group()
    return summary
