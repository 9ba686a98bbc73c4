"""The batching engine between the HTTP server and the model.

One thread owns the model. Requests wait in a bounded queue; the thread takes the oldest one,
waits a short collection window for others that can share its batch (same mode, store, number
of references and sampling settings) and decodes them together as one `Generator` batch.
Knowledge-base operations (adding, replacing, deleting documents) run on the same thread, because
neither the model nor a store is assumed to be thread-safe: between two batches, and one at a time
between two decoding steps of a running batch, so that an edit waits for a step, not a batch.

A batch decodes until its longest member is done (the Generator has no continuous batching), so
requests that want fewer tokens are cut afterwards to exactly what they would have produced
alone; streaming requests only share a batch with streams of the same `max_tokens`, because a
text delta cannot be cut at a token count.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from memory3.config import GenerationConfig
from memory3.decoding import StreamEvent, find_stop
from memory3.generate import GenerationOutput, Generator, Mode
from memory3.retrieval.base import Retriever

log = logging.getLogger(__name__)


@runtime_checkable
class KnowledgeBase(Protocol):
    """Document operations of a knowledge base the server can change while it runs.

    A document dict has `text` and optionally `id`, `title` and `metadata`; a store cuts it into
    references and writes their memories. Implementations need not be thread-safe: the server
    calls them from its scheduler thread only, between batches or decoding steps.
    """

    def add_documents(self, docs: list[dict]) -> list[dict]:
        """Add documents; per document return at least {"id": str, "reference_ids": list[int]}."""
        ...

    def delete_documents(self, doc_ids: list[str]) -> int:
        """Delete documents and their references; return how many documents existed."""
        ...

    def list_documents(self, limit: int, offset: int) -> list[dict]: ...

    def get_document(self, doc_id: str) -> dict | None: ...

    def info(self) -> dict: ...


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the client should retry later (HTTP 429)."""


class SchedulerClosed(RuntimeError):
    """The scheduler is not running (not started, shutting down, or its thread died)."""


class Cancelled(Exception):
    """Delivered to a job whose client left (nobody reads it; sinks may ignore it)."""


class JobTimeout(TimeoutError):
    """A request did not finish within the scheduler's request timeout."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 8
    # The oldest request waits for others to join its batch until no request has arrived for
    # `batch_window_s`, and never longer than `max_batch_wait_s` (a burst that reaches the server
    # spread over some milliseconds still lands in one batch).
    batch_window_s: float = 0.02
    max_batch_wait_s: float = 0.2
    max_queue: int = 64  # requests (and document operations) waiting; more are refused
    request_timeout_s: float = 300.0  # queueing + decoding; an unfinished request then fails

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be ≥ 1, got {self.max_batch_size}")
        if not 0 <= self.batch_window_s <= self.max_batch_wait_s:
            raise ValueError(
                f"need 0 ≤ batch_window_s ({self.batch_window_s}) ≤ max_batch_wait_s ({self.max_batch_wait_s})"
            )
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be ≥ 1, got {self.max_queue}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete, as the HTTP layer hands it over."""

    prompt: str
    mode: Mode
    config: GenerationConfig
    k: int | None = None  # references per retrieval; None = the memory config's default
    min_score: float | None = None  # relevance floor of the hits; None = the Generator's own
    chat: bool = False  # apply the chat template to `prompt` (a single user message)
    query: str | None = None  # retrieval query of the first chunk, when the prompt is pre-rendered
    retriever: Retriever | None = None
    store: str = ""  # the retriever's name: requests only share a batch with the same store
    stream: bool = False
    context_tokens: int = 0  # positions taken before generation (prompt, memory prefix, RAG text)


# What a job's sink receives: text deltas while streaming, then exactly one final item.
JobItem = StreamEvent | GenerationOutput | BaseException
Sink = Callable[[JobItem], None]


class Job:
    """A submitted request: its sink gets StreamEvents (streams only), then a GenerationOutput
    or an exception. `cancel()` frees the slot (before the start) or stops delivery."""

    _ids = itertools.count()

    def __init__(self, request: GenerationRequest, sink: Sink, timeout_s: float) -> None:
        self.id = next(Job._ids)
        self.request = request
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout_s
        self._sink = sink
        self._cancelled = threading.Event()
        self._finished = False
        self.emitted = False  # a stream delta has been delivered

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def active(self) -> bool:
        return not self._finished and not self.cancelled

    def _deliver(self, item: JobItem) -> None:
        if self._finished:
            return
        if not isinstance(item, StreamEvent):
            self._finished = True
        elif item.delta:
            self.emitted = True
        self._sink(item)


# -- batching rules -----------------------------------------------------------------------------
def batch_key(job: Job) -> tuple:
    """Requests with equal keys can run as one Generator call."""
    r, cfg = job.request, job.request.config
    if cfg.temperature == 0:
        sampling: tuple = (0.0,)  # greedy: top_p, top_k and seed change nothing
    elif cfg.seed is not None:
        # A seeded request runs alone: its random draws would depend on its batch neighbours.
        sampling = ("seeded", job.id)
    else:
        sampling = (cfg.temperature, cfg.top_p, cfg.top_k)
    retrieval = (r.store, r.k, r.min_score) if r.mode != "none" else ()
    return (r.mode, retrieval, r.chat, r.query is not None, cfg.stop, cfg.ignore_eos, sampling)


def select_batch(waiting: Iterable[Job], max_batch: int, context_limit: int) -> list[Job]:
    """The oldest job and, in arrival order, the jobs that can join it: same key, every stream
    in the batch asks for the batch's largest max_tokens, and the longest prompt plus that many
    tokens fits the model's context."""
    it = iter(waiting)
    head = next(it, None)
    if head is None:
        return []
    key = batch_key(head)
    batch = [head]
    for job in it:
        if len(batch) == max_batch:
            break
        if batch_key(job) != key:
            continue
        trial = [*batch, job]
        longest = max(j.request.config.max_new_tokens for j in trial)
        if any(j.request.stream and j.request.config.max_new_tokens != longest for j in trial):
            continue
        if max(j.request.context_tokens for j in trial) + longest > context_limit:
            continue
        batch = trial
    return batch


def trim_output(
    out: GenerationOutput,
    max_tokens: int,
    stops: Sequence[str],
    decode: Callable[[list[int]], str],
    mode: Mode,
    chunk_tokens: int,
) -> GenerationOutput:
    """What a sequence decoded in a batch of up to `B ≥ max_tokens` steps would have been had it
    run alone with `max_tokens`: tokens and text cut, finish reason, and (memory mode) only the
    references retrieved while it was still decoding (a batch keeps re-retrieving for members
    that already finished)."""
    ids = out.token_ids
    if len(ids) >= max_tokens:
        ids = ids[:max_tokens]
        full = decode(ids)
        cut = find_stop(full, stops)
        text, finish = (full[:cut], "stop") if cut is not None else (full, "length")
        draws = max_tokens  # tokens it sampled
    else:
        text, finish = out.text, out.finish_reason
        ended_by_eos = finish == "stop" and text == decode(ids)  # a stop string would be cut off
        draws = len(ids) + 1 if ended_by_eos else len(ids)
    refs = out.references
    if mode == "memory":
        # §3.1 new memories after every `chunk_tokens` generated tokens, while tokens remain to draw
        prompt_chunks = math.ceil(out.prompt_tokens / chunk_tokens)
        refs = refs[: prompt_chunks + (draws - 1) // chunk_tokens]
    return GenerationOutput(text, list(ids), out.prompt_tokens, finish, refs)  # type: ignore[arg-type]


# The default way to run a batch. `Generator.stream()` drops the final outputs (token ids,
# references) that the server returns, and `generate()` yields nothing until the end, so the
# scheduler reads the iterator both are built on: StreamEvents, then the list of outputs.
BatchRunner = Callable[..., Iterator[StreamEvent | list[GenerationOutput]]]


def run_batch_events(
    generator: Generator, prompts: list[str], mode: Mode, config: GenerationConfig, **kwargs: Any
) -> Iterator[StreamEvent | list[GenerationOutput]]:
    return generator.events(prompts, mode, config, **kwargs)


@dataclass
class SchedulerStats:
    batches: int = 0
    sequences: int = 0
    largest_batch: int = 0
    cancelled: int = 0  # jobs dropped before or while running because their client left
    timed_out: int = 0
    failed: int = 0
    operations: int = 0  # knowledge-base calls run between batches or decoding steps
    busy_s: float = 0.0


class Scheduler:
    """Owns the Generator (and so the model) on one thread; see the module docstring.

    >>> sched = Scheduler(generator).start()
    >>> job = sched.submit(GenerationRequest("Hello", "none", GenerationConfig()), sink=print)
    >>> sched.call(store.add_documents, [{"text": "..."}]).result()
    """

    def __init__(
        self,
        generator: Generator,
        config: SchedulerConfig | None = None,
        runner: BatchRunner | None = None,
    ) -> None:
        self.generator = generator
        self.config = config or SchedulerConfig()
        self._runner = runner or run_batch_events
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._running: list[Job] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        self._last_arrival = 0.0
        self.stats = SchedulerStats()
        self.context_limit = generator.model.config.context_limit

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> Scheduler:
        if self._thread is not None:
            raise RuntimeError("the scheduler is already started")
        self._thread = threading.Thread(target=self._loop, name="memory3-scheduler", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new work, fail what waits, let the running batch end, join the thread."""
        with self._cv:
            self._closing = True
            for job in self._running:
                job.cancel()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def queue_depth(self) -> int:
        with self._cv:
            return len(self._waiting) + len(self._calls)

    def running(self) -> int:
        with self._cv:
            return len(self._running)

    # -- submitting ----------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink) -> Job:
        """Queue a generation request; raises QueueFull or SchedulerClosed at once."""
        job = Job(request, sink, self.config.request_timeout_s)
        with self._cv:
            self._check_open()
            if len(self._waiting) + len(self._calls) >= self.config.max_queue:
                raise QueueFull(f"{self.config.max_queue} requests are already waiting; retry later")
            self._waiting.append(job)
            self._last_arrival = job.submitted
            self._cv.notify_all()
        return job

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run `fn(*args, **kwargs)` on the scheduler thread between two batches or two decoding
        steps of a batch (operations go before waiting batches, one at a time)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._check_open()
            if len(self._waiting) + len(self._calls) >= self.config.max_queue:
                raise QueueFull(f"{self.config.max_queue} requests are already waiting; retry later")
            self._calls.append((lambda: fn(*args, **kwargs), fut))
            self._cv.notify_all()
        return fut

    def _check_open(self) -> None:
        if self._thread is None or not self._thread.is_alive() or self._closing:
            raise SchedulerClosed("the generation scheduler is not running (shutting down or failed)")

    # -- the thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        reason: BaseException = SchedulerClosed("the server is shutting down")
        try:
            while True:
                with self._cv:
                    while not (self._closing or self._waiting or self._calls):
                        self._cv.wait()
                    if self._closing:
                        break
                    call = self._calls.popleft() if self._calls else None
                if call is not None:
                    self._run_call(*call)
                batch = self._take_batch()
                if batch:
                    self._run_batch(batch)
        except BaseException as e:
            log.exception("the scheduler thread died; requests now fail with 503")
            reason = SchedulerClosed(
                f"the generation scheduler failed ({type(e).__name__}: {e}); restart the server"
            )
            raise
        finally:
            self._fail_waiting(reason)

    def _fail_waiting(self, error: BaseException) -> None:
        with self._cv:
            self._closing = True
            jobs, calls = list(self._waiting), list(self._calls)
            self._waiting.clear()
            self._calls.clear()
        for job in jobs:
            job._deliver(error)
        for _, fut in calls:
            fut.set_exception(error)

    def _run_one_waiting_call(self) -> None:
        """Run the oldest waiting knowledge-base operation, if any. Between two decoding steps
        this is safe: the running batch holds its memories in its own cache, and the next
        retrieval it makes sees the store as the operation left it, as a new request would."""
        with self._cv:
            call = self._calls.popleft() if self._calls else None
        if call is not None:
            self._run_call(*call)

    def _run_call(self, fn: Callable[[], Any], fut: concurrent.futures.Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        self.stats.operations += 1
        try:
            fut.set_result(fn())
        except Exception as e:  # handed to the caller, who answers the request with it
            fut.set_exception(e)

    def _drop_stale(self) -> None:
        """Remove waiting jobs whose client left or whose time is up (lock held)."""
        now, keep = time.monotonic(), deque()
        for job in self._waiting:
            if job.cancelled:
                self.stats.cancelled += 1
                job._deliver(Cancelled("the client left before the request started"))
            elif now > job.deadline:
                self.stats.timed_out += 1
                job._deliver(JobTimeout(f"request waited more than {self.config.request_timeout_s:g} s"))
            else:
                keep.append(job)
        self._waiting = keep

    def _take_batch(self) -> list[Job]:
        cfg = self.config
        with self._cv:
            self._drop_stale()
            if not self._waiting:
                return []
            head = self._waiting[0]
            while not self._closing and not self._calls:
                n = len(select_batch(self._waiting, cfg.max_batch_size, self.context_limit))
                until = min(
                    max(head.submitted, self._last_arrival) + cfg.batch_window_s,
                    head.submitted + cfg.max_batch_wait_s,
                )
                left = until - time.monotonic()
                if n >= cfg.max_batch_size or left <= 0:
                    break
                self._cv.wait(left)
                self._drop_stale()
                if not self._waiting or self._waiting[0] is not head:
                    return []  # the head left: start over with the next oldest
            if self._closing:
                return []
            batch = select_batch(self._waiting, cfg.max_batch_size, self.context_limit)
            chosen = {j.id for j in batch}
            self._waiting = deque(j for j in self._waiting if j.id not in chosen)
            return batch

    def _run_batch(self, batch: list[Job]) -> None:
        t0 = time.perf_counter()
        with self._cv:
            self._running = batch
        try:
            self._decode(batch)
        except Exception as e:
            fresh = [j for j in batch if j.active and not j.emitted]
            if len(batch) > 1 and fresh:
                # one bad request must not fail its neighbours: run the others alone
                log.warning("a batch of %d failed (%s); running its requests one by one", len(batch), e)
                for job in batch:
                    if job.active and job.emitted:
                        job._deliver(e)
                        self.stats.failed += 1
                for job in fresh:
                    self._run_batch([job])
            else:
                log.warning("request failed: %s", e)
                for job in batch:
                    if job.active:
                        self.stats.failed += 1
                        job._deliver(e)
        finally:
            with self._cv:
                self._running = []
            self.stats.busy_s += time.perf_counter() - t0

    def _decode(self, batch: list[Job]) -> None:
        reqs = [j.request for j in batch]
        first = reqs[0]
        gen = self.generator
        if first.mode != "none":
            if first.retriever is None:
                raise ValueError(f"mode {first.mode!r} needs a store, and none is loaded")
            if gen.retriever is not first.retriever:
                gen.set_retriever(first.retriever)
        longest = max(r.config.max_new_tokens for r in reqs)
        cfg = dataclasses.replace(first.config, max_new_tokens=longest)
        if cfg.temperature > 0 and cfg.seed is None:
            # the Generator seeds a fixed stream when given no seed; unseeded requests want fresh draws
            cfg = dataclasses.replace(cfg, seed=random.getrandbits(63))
        kwargs: dict[str, Any] = {"k": first.k, "chat": first.chat, "min_score": first.min_score}
        if first.query is not None:
            kwargs["queries"] = [r.query for r in reqs]
        self.stats.batches += 1
        self.stats.sequences += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        log.debug("batch of %d (%s, %d tokens)", len(batch), first.mode, longest)

        outputs: list[GenerationOutput] | None = None
        events = self._runner(gen, [r.prompt for r in reqs], first.mode, cfg, **kwargs)
        try:
            for item in events:
                if isinstance(item, StreamEvent):
                    job = batch[item.index]
                    if job.request.stream and job.active:
                        job._deliver(StreamEvent(item.index, item.delta, None))
                else:
                    outputs = item
                self._run_one_waiting_call()  # an edit waits for a decoding step, not the batch
                if not self._still_wanted(batch):
                    for job in batch:
                        if job.cancelled:
                            self.stats.cancelled += 1
                            job._deliver(Cancelled("the client left"))
                    return
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # stops the decode loop if we left early
        assert outputs is not None and len(outputs) == len(batch)
        decode = lambda ids: gen.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        for job, out in zip(batch, outputs, strict=True):
            if job.cancelled:
                self.stats.cancelled += 1
                job._deliver(Cancelled("the client left"))
            elif job.active:
                r = job.request
                job._deliver(
                    trim_output(
                        out, r.config.max_new_tokens, r.config.stop, decode, r.mode, gen.mem_cfg.chunk_tokens
                    )
                )

    def _still_wanted(self, batch: list[Job]) -> bool:
        """Expire jobs past their deadline; False when no job of the batch is still wanted."""
        now = time.monotonic()
        for job in batch:
            if job.active and now > job.deadline:
                self.stats.timed_out += 1
                job._deliver(JobTimeout(f"request did not finish within {self.config.request_timeout_s:g} s"))
        return any(j.active for j in batch)
