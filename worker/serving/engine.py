"""The serving engine: continuous batching, memory-safe admission and live
plan switching, in plain Python so it is tested without gRPC.

One thread owns the model and its KV cache and runs iterations. Each one:

1. applies the latest pruning plan pushed (plans change only here, between
   decode steps, never inside one). A plan that fits the budget only once
   some running requests finish waits for them, for a bounded time, and no
   new request is admitted meanwhile; a newer plan supersedes it. What a
   switch frees goes back to the device (its allocator's cache is released);
2. drops cancelled requests, freeing their KV rows;
3. admits waiting requests, first come first served, while the cache laid
   out for them still fits the memory budget (worker/serving/admission.py); while
   sequences run, a few newcomers are gathered first so that they share
   one prefill (at most `max_admit_delay` iterations);
4. prefills the newcomers (one forward over their prompts) and samples each
   one's first token;
5. runs one decode step over every running sequence, samples, streams each
   token to its request's sink, and releases finished requests at once;
6. gives memory back (a smaller KV cache, none when idle), measures what it
   holds and, when asked (Engine.snapshot, for GetStats), reads the device
   at that moment, so that the device's figures and the worker's describe
   the same memory.

Running sequences occupy the first rows of the cache; a finished row is
filled by moving the last one into it, so every forward works on a view of
the cache, never a copy.

What a plan switch does to a running request (the documented semantics):

- its tokens before the switch were computed under the old plan and stay;
- an attention block that the new plan drops is gone for every sequence
  from the next step on, and its KV is freed at the switch;
- an attention block that the new plan restores has no KV for the tokens a
  running sequence already holds: it attends only to tokens from the switch
  on (KVCache.history_start), while the other kept blocks keep their full
  history;
- requests admitted after the switch run under the new plan from their
  first token, exactly as if it had always been in force.

Events carry the step counter and plan id, so a client can tell which plan
produced each token (tokens with decode_step >= a switch's effective_step
came from the new plan).

Adapters plug in through `AdapterHost` (worker/adapters/interface.py).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from tokenizers import Tokenizer

from elasticfleet.worker.adapters.interface import (
    AdapterHost,
    AdapterInfo,
    AdapterListing,
    AdapterRequest,
)
from elasticfleet.worker.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from elasticfleet.worker.model.accounting import account
from elasticfleet.worker.model.generation import (
    Completion,
    FinishRules,
    SamplingParams,
    TextStream,
    cut_at_stop,
    sample_rows,
)
from elasticfleet.worker.model.kvcache import KVCache
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.admission import Admission, Layout
from elasticfleet.worker.serving.latency import LatencyHistograms
from elasticfleet.worker.serving.telemetry import (
    Device,
    DeviceMemory,
    MixSnapshot,
    RequestMix,
    SystemDevice,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Limits on what a caller sends, checked before any work is done, so that no
# request can make the worker tokenize megabytes or echo an unbounded value
# into an error message (status details travel in size-limited metadata).
# Identifiers follow the CRDs that store them: a plan id (status.plan.id),
# an adapter's store name, a task (a DNS label), a version (digits).
MAX_REQUEST_ID = 128
MAX_PLAN_ID = 128
MAX_ADAPTER_NAME = 128
MAX_TASK_NAME = 63
MAX_VERSION = 20
MAX_TASKS = 64
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
# 32 bytes per token of SmolLM2's 8,192-token context: no prompt that fits
# the context is longer, and tokenizing this much takes about a tenth of a
# second on one core. Longer prompts are refused before they are tokenized.
MAX_PROMPT_BYTES = 256 * 1024


@dataclass(frozen=True)
class TokenEvent:
    """Tokens one request got from one iteration. finish_reason is '' while
    the request runs, then 'eos', 'stop' or 'length'."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    decode_step: int
    plan_id: str


# A request's sink gets its events, or an exception if the engine fails it.
Sink = Callable[[TokenEvent | Exception], None]


def check_length(field: str, value: str, limit: int) -> str:
    """`value` when it has at most `limit` characters, else InvalidArgument
    naming its length, never the value (which may be megabytes)."""
    if len(value) > limit:
        raise InvalidArgument(f"{field} has {len(value)} characters; at most {limit}")
    return value


def _check_adapter_name(name: str) -> None:
    if not name:
        raise InvalidArgument("name is empty; name the adapter set")
    check_length("name", name, MAX_ADAPTER_NAME)


def _settle(future: Future[T], error: Exception) -> None:
    """Fail a future (a plan's, a snapshot's), unless its caller already
    gave up on it (a cancelled future cannot be set: doing so raised on the
    engine thread and killed it)."""
    if future.set_running_or_notify_cancel():
        future.set_exception(error)


@dataclass(frozen=True)
class PreparedRequest:
    """A request tokenized and checked (Engine.prepare), not yet queued.
    Preparing is the CPU-heavy half of a submission and touches no engine
    state, so a server runs it off its event loop and a caller that leaves
    meanwhile leaves nothing behind."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterRequest | None
    worst_case: int


@dataclass(frozen=True)
class EnginePicture:
    """Memory (measured by the accountant) and plan, taken between two
    iterations, so the figures are consistent with each other."""

    weight_bytes: int
    kv_reserved_bytes: int
    kv_used_bytes: int
    adapter_bytes: int
    budget_bytes: int
    kv_committed_bytes: int
    active_sequences: int
    plan_id: str
    keep_mask: tuple[bool, ...]
    decode_step: int

    @property
    def total_bytes(self) -> int:
        """What the worker holds: weights, reserved KV and adapters."""
        return self.weight_bytes + self.kv_reserved_bytes + self.adapter_bytes


@dataclass(frozen=True)
class PlanSwitch:
    """The outcome of a plan switch; `after` is the picture taken right
    after it (so a caller learns what the worker now holds without asking),
    and `device` the device read at that moment (None when it could not be
    read: GetStats says why)."""

    plan_id: str
    bytes_before: int
    after: EnginePicture
    effective_step: int
    kept_blocks: int
    device: DeviceMemory | None

    @property
    def bytes_after(self) -> int:
        return self.after.total_bytes


@dataclass(frozen=True)
class EngineStats:
    """The latest picture, the live queue depth and the windowed request mix."""

    picture: EnginePicture
    queue_depth: int
    mix: MixSnapshot


@dataclass(frozen=True)
class Snapshot:
    """The engine's figures and its device's, taken together between two
    iterations (Engine.snapshot): the device's `own_bytes` and the picture
    describe the same memory."""

    stats: EngineStats
    device: DeviceMemory


@dataclass(frozen=True)
class Iteration:
    """Timing of one iteration (for metrics and benchmarks)."""

    rows: int  # sequences it ran, newcomers included
    newcomers: int  # sequences it admitted and prefilled
    switched: bool  # whether it began with a plan switch
    seconds: float  # all of it: switch, prefill, decode step, bookkeeping
    prefill_s: float  # the newcomers' prefill

    @property
    def step_s(self) -> float:
        """The iteration without its prefill: the decode step (plus any switch)."""
        return self.seconds - self.prefill_s


@dataclass
class Counters:
    """Monotonic totals since start (exported as Prometheus counters)."""

    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_refused: int = 0
    requests_failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    plan_changes: int = 0
    adapter_cache_hits: int = 0
    adapter_cache_misses: int = 0


@dataclass
class _Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterRequest | None
    sink: Sink
    worst_case: int
    stream: TextStream
    generator: torch.Generator | None
    next_input: int = 0
    row: int = -1
    cancelled: bool = False
    held: int = 0  # iterations held back to share a prefill
    arrived: float = field(default_factory=time.perf_counter)  # queued (latency.py)
    first_token_at: float | None = None

    @property
    def tokens(self) -> list[int]:
        """The tokens generated so far (the stream holds them, to decode them once)."""
        return self.stream.tokens


@dataclass
class _PendingPlan:
    plan: PruningPlan
    plan_id: str
    budget_bytes: int | None
    future: Future[PlanSwitch]
    deadline: float  # time.monotonic() after which it stops waiting


class Engine:
    """Continuous-batching generation over one ElasticLlama."""

    def __init__(
        self,
        model: ElasticLlama,
        tokenizer: Tokenizer,
        *,
        budget_bytes: int,
        max_queue: int = 256,
        max_batch: int = 64,
        window_s: float = 60.0,
        adapters: AdapterHost | None = None,
        plan_id: str = "initial",
        prefill_group: int = 4,
        max_admit_delay: int = 3,
        device: Device | None = None,
    ) -> None:
        if max_queue < 0 or max_batch < 1:
            raise ValueError(f"need max_queue >= 0 and max_batch >= 1, got {max_queue}/{max_batch}")
        if prefill_group < 1 or max_admit_delay < 0:
            raise ValueError("need prefill_group >= 1 and max_admit_delay >= 0")
        self.model = model
        # A prefill forward reads every weight however few prompts it holds,
        # so one over several newcomers costs far less per request than one
        # each (on 2 CPU cores: 350 ms for one 40-token prompt, 510 ms for
        # three). While sequences are running, newcomers are therefore held
        # back until prefill_group of them wait, or the oldest has waited
        # max_admit_delay iterations; an idle worker admits at once.
        self.prefill_group = prefill_group
        self.max_admit_delay = max_admit_delay
        self.tokenizer = tokenizer
        self.adapters = adapters
        # Where the model's memory lives (telemetry.Device): read with the
        # engine's own figures at one moment, and its allocator's cache
        # released after a plan switch. The GPU's, else the host's, by default.
        self.device: Device = device or SystemDevice()
        # The loaded adapters' bytes change only on load, unload and plan
        # switches; every iteration reads them, so they are kept here.
        self._adapter_resident = 0
        self._refresh_adapter_bytes()
        self.max_queue = max_queue
        self.admission = Admission(model.config, model.dtype, budget_bytes, max_batch)
        if not self.admission.fits(model.plan, None, self._adapter_bytes()):
            needed = self.admission.total_bytes(model.plan, None, self._adapter_bytes())
            raise FailedPrecondition(
                f"the model's weights under its plan take {needed} bytes, more than the "
                f"budget of {budget_bytes}; raise the budget or start with a smaller plan"
            )
        self.plan_id = plan_id
        self.counters = Counters()
        self.mix = RequestMix(window_s)
        self.step_count = 0
        self.iterations: deque[Iteration] = deque(maxlen=100_000)
        self.latency = LatencyHistograms()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[_Request] = deque()
        self._in_flight: dict[str, _Request] = {}
        self._pending_plans: list[_PendingPlan] = []
        self._snapshots: list[Future[Snapshot]] = []
        self._active: list[_Request] = []
        self._cache: KVCache | None = None
        self._step_lock = threading.Lock()
        self._closing = False
        self._stop = False
        self._thread: threading.Thread | None = None
        # Why the engine thread died, if it did; then every call fails fast.
        self.failure: BaseException | None = None
        self._failure_listeners: list[Callable[[BaseException], None]] = []
        self._stats = self._measure()

    # -- requests -------------------------------------------------------------

    def submit(
        self,
        prompt: str,
        params: SamplingParams,
        sink: Sink,
        *,
        request_id: str = "",
        adapter: AdapterRequest | None = None,
    ) -> str:
        """Queue a request (prepare, then enqueue); returns its id. Raises
        InvalidArgument, NotFound, ResourceExhausted or Unavailable without
        queueing."""
        prepared = self.prepare(prompt, params, request_id=request_id, adapter=adapter)
        return self.enqueue(prepared, sink)

    def prepare(
        self,
        prompt: str,
        params: SamplingParams,
        *,
        request_id: str = "",
        adapter: AdapterRequest | None = None,
    ) -> PreparedRequest:
        """Check and tokenize a request, from any thread. Raises
        InvalidArgument, or ResourceExhausted for a request that cannot fit
        the budget even on an idle worker."""
        try:
            return self._prepare(prompt, params, request_id, adapter)
        except ResourceExhausted:
            self.counters.requests_refused += 1
            raise

    def _prepare(
        self,
        prompt: str,
        params: SamplingParams,
        request_id: str,
        adapter: AdapterRequest | None,
    ) -> PreparedRequest:
        check_length("request_id", request_id, MAX_REQUEST_ID)
        if adapter is not None:
            check_length("adapter.name", adapter.name, MAX_ADAPTER_NAME)
            check_length("adapter.task", adapter.task or "", MAX_TASK_NAME)
        if len(params.stop) > MAX_STOP_STRINGS or any(
            len(s) > MAX_STOP_LENGTH for s in params.stop
        ):
            raise InvalidArgument(
                f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_LENGTH} characters"
            )
        if not prompt:
            raise InvalidArgument("prompt is empty; send at least one character")
        # A str has at least as many UTF-8 bytes as characters: the first test
        # refuses a huge prompt without encoding it.
        if len(prompt) > MAX_PROMPT_BYTES or len(prompt.encode()) > MAX_PROMPT_BYTES:
            raise InvalidArgument(
                f"prompt is longer than {MAX_PROMPT_BYTES} bytes of UTF-8, more than the model's "
                "context could hold; shorten the prompt"
            )
        # encode_batch, unlike encode, releases the GIL while it works, so a
        # long prompt tokenized on another thread does not stall the server's
        # event loop (health checks, running streams).
        (encoding,) = self.tokenizer.encode_batch([prompt], add_special_tokens=False)
        ids: list[int] = encoding.ids
        context = self.model.config.max_position_embeddings
        if not ids:
            raise InvalidArgument("prompt encodes to no tokens")
        if len(ids) >= context:
            raise InvalidArgument(
                f"prompt has {len(ids)} tokens but the model's context is {context}, "
                "which must also hold at least one new token; shorten the prompt"
            )
        worst = self.admission.worst_case_tokens(len(ids), params.max_new_tokens)
        alone = Layout(1, worst)
        if not self.admission.fits(self.model.plan, alone, self._adapter_bytes()):
            kv = self.admission.kv_bytes(self.model.plan, alone)
            raise ResourceExhausted(
                f"request needs {kv} bytes of KV cache at its worst case ({len(ids)} prompt + "
                f"{params.max_new_tokens} new tokens), more than the budget of "
                f"{self.admission.budget_bytes} leaves after weights and adapters even on an "
                "idle worker; lower max_new_tokens or shorten the prompt"
            )
        return PreparedRequest(request_id or uuid.uuid4().hex, ids, params, adapter, worst)

    def enqueue(self, prepared: PreparedRequest, sink: Sink) -> str:
        """Queue a prepared request; returns its id. Quick: it only takes the
        lock. Raises InvalidArgument (an id already in flight), NotFound (its
        adapter is not loaded), ResourceExhausted (the queue is full) or
        Unavailable (shutting down, or the engine has stopped)."""
        params = prepared.params
        adapter = prepared.adapter
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        request = _Request(
            id=prepared.id,
            prompt_ids=prepared.prompt_ids,
            params=params,
            adapter=adapter,
            sink=sink,
            worst_case=prepared.worst_case,
            stream=TextStream(self.tokenizer, params.stop),
            generator=generator,
        )
        with self._lock:
            self._check_running()
            if self._closing:
                raise Unavailable("worker is shutting down; send the request to another worker")
            if request.id in self._in_flight:
                raise InvalidArgument(f"request id {request.id!r} is already in flight")
            if adapter is not None:
                if self.adapters is None:
                    raise NotFound(
                        f"adapter {adapter.name!r} is not loaded: this worker serves no adapters"
                    )
                self.adapters.check(adapter)
            if len(self._queue) >= self.max_queue:
                self.counters.requests_refused += 1
                raise ResourceExhausted(
                    f"wait queue is full ({len(self._queue)} requests waiting for memory); "
                    "retry later or send to another worker"
                )
            self._queue.append(request)
            self._in_flight[request.id] = request
            self._wake.notify_all()
        return request.id

    def cancel(self, request_id: str) -> bool:
        """Stop a request; its sink gets nothing more. A running request
        leaves the batch (and frees its KV) before the next step."""
        with self._lock:
            request = self._in_flight.pop(request_id, None)
            if request is None:
                return False
            request.cancelled = True
            self.counters.requests_cancelled += 1
            if request in self._queue:
                self._queue.remove(request)
            self._wake.notify_all()
        return True

    # -- plans ------------------------------------------------------------------

    def submit_plan(
        self,
        plan: PruningPlan,
        plan_id: str,
        budget_bytes: int | None = None,
        wait_s: float = 0.0,
    ) -> Future[PlanSwitch]:
        """Schedule a plan (and optionally a new budget) for the next
        iteration; the future gets the PlanSwitch.

        When the plan fits only once some running requests finish, the
        engine admits no new request and waits for that, up to wait_s
        seconds, then switches. The future fails with FailedPrecondition
        when the plan does not fit in time (nothing changes then), or when a
        newer plan supersedes it first. A plan whose weights alone exceed
        the budget is refused at once."""
        check_length("plan_id", plan_id, MAX_PLAN_ID)
        config = self.model.config
        if plan.num_layers != config.num_hidden_layers:
            raise InvalidArgument(
                f"plan is for {plan.num_layers} layers but the model has "
                f"{config.num_hidden_layers} ({config.num_blocks} blocks)"
            )
        if budget_bytes is not None and budget_bytes <= 0:
            raise InvalidArgument(f"budget must be positive, got {budget_bytes}")
        budget = budget_bytes or self.admission.budget_bytes
        check = Admission(config, self.model.dtype, budget, self.admission.max_rows)
        fixed = check.total_bytes(plan, None, self._adapter_bytes())
        if fixed > budget:
            raise FailedPrecondition(
                f"plan {plan_id!r} needs {fixed} bytes for its weights and the loaded adapters "
                f"alone, more than the budget of {budget}; drop more blocks"
            )
        future: Future[PlanSwitch] = Future()
        pending = _PendingPlan(plan, plan_id, budget_bytes, future, time.monotonic() + wait_s)
        with self._lock:
            self._check_running()
            for older in self._pending_plans:
                _settle(older.future, self._superseded(older, plan_id))
            self._pending_plans = [pending]
            self._wake.notify_all()
        return future

    @staticmethod
    def _superseded(pending: _PendingPlan, newer: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"plan {pending.plan_id!r} was superseded by plan {newer!r} before it could fit"
        )

    def _take_plan(self) -> tuple[PlanSwitch | None, bool]:
        """Try the waiting plan: (the switch if it happened, whether a plan
        still waits for running requests to finish).

        A plan whose caller gave up (cancelled the future: a cancelled RPC,
        a passed deadline) is dropped unapplied, and admissions resume. The
        future is claimed (set running) only once the plan fits, just
        before the switch, so a caller can give up at any moment before it
        and a settled or cancelled future is never set again."""
        with self._lock:
            if not self._pending_plans:
                return None, False
            pending = self._pending_plans.pop(0)
        future = pending.future
        if future.cancelled():
            return None, False
        check, needed, adapter_bytes = self._plan_check(pending)
        if check.fits(pending.plan, needed, adapter_bytes):
            if not future.set_running_or_notify_cancel():
                return None, False  # the caller left just now: change nothing
            try:
                switch = self._switch(pending)
            except Exception as error:
                future.set_exception(error)
                return None, False
            future.set_result(switch)
            return switch, False
        if time.monotonic() >= pending.deadline:
            _settle(future, self._does_not_fit(pending))
            return None, False
        with self._lock:
            if self._pending_plans:  # a newer plan arrived meanwhile
                _settle(future, self._superseded(pending, self._pending_plans[0].plan_id))
                return None, True
            self._pending_plans.append(pending)
        return None, True

    def _plan_check(self, pending: _PendingPlan) -> tuple[Admission, Layout | None, int]:
        budget = pending.budget_bytes or self.admission.budget_bytes
        check = Admission(self.model.config, self.model.dtype, budget, self.admission.max_rows)
        return check, self._needed_layout(), self._adapter_bytes()

    def _does_not_fit(self, pending: _PendingPlan) -> FailedPrecondition:
        check, needed, adapter_bytes = self._plan_check(pending)
        total = check.total_bytes(pending.plan, needed, adapter_bytes)
        running = 0 if needed is None else needed.rows
        return FailedPrecondition(
            f"plan {pending.plan_id!r} needs {total} bytes with the {running} running sequences "
            f"(weights, their KV at worst case, adapters) but the budget is "
            f"{check.budget_bytes}, and they did not finish in time; drop more blocks, or "
            "allow the switch to wait longer"
        )

    def _switch(self, pending: _PendingPlan) -> PlanSwitch:
        """Switch to the plan, which fits next to the running requests."""
        started = time.perf_counter()
        plan = pending.plan
        check, needed, adapter_bytes = self._plan_check(pending)
        # Blocks are dropped before others are restored (below): verify the
        # stored weights first, so a corrupt block refuses the switch intact.
        self.model.check_restore(plan)
        before = self._stats.total_bytes
        current = self.model.plan
        # Drop first, then resize, then restore: memory never peaks above
        # the larger of the old and new totals.
        both = [a and b for a, b in zip(current.to_mask(), plan.to_mask(), strict=True)]
        if any(both):
            self._set_plan(PruningPlan.from_mask(both))
        self.admission = check
        layout = check.layout_for(plan, needed, adapter_bytes, self._layout()) if needed else None
        self._resize(layout)
        self._set_plan(plan)
        self.plan_id = pending.plan_id
        self.counters.plan_changes += 1
        # What the plan dropped goes back to the device, not to a cache of
        # this process: otherwise pruning frees nothing another process can use.
        self.device.release_cache()
        self._stats = self._measure()
        device: DeviceMemory | None
        try:
            device = self.device.read(self._stats.total_bytes)
        except Exception as error:  # the switch happened all the same
            log.warning("the device could not be read after the plan switch: %s", error)
            device = None
        self.latency.plan_switch.observe(time.perf_counter() - started)
        return PlanSwitch(
            plan_id=pending.plan_id,
            bytes_before=before,
            after=self._stats,
            effective_step=self.step_count,
            kept_blocks=plan.kept_blocks,
            device=device,
        )

    def _set_plan(self, plan: PruningPlan) -> None:
        self.model.apply_plan(plan)
        if self._cache is not None:
            self._cache.sync_layers(plan.keep_attention)
        if self.adapters is not None:
            self.adapters.apply_plan(plan)
            self._refresh_adapter_bytes()

    # -- adapters -----------------------------------------------------------

    def load_adapter(
        self, name: str, version: str, tasks: Sequence[str]
    ) -> tuple[AdapterInfo, bool]:
        """Fetch an adapter set into the cache (in the caller's thread: the
        host installs it without disturbing a running forward)."""
        _check_adapter_name(name)
        check_length("version", version, MAX_VERSION)
        if len(tasks) > MAX_TASKS:
            raise InvalidArgument(f"{len(tasks)} tasks named; at most {MAX_TASKS}")
        for task in tasks:
            check_length("task", task, MAX_TASK_NAME)
        host = self._require_adapters()
        with self._lock:
            committed = self.admission.total_bytes(
                self.model.plan, self._needed_layout(), self._adapter_bytes()
            )
        info, hit = host.load(name, version, tasks, self.admission.budget_bytes - committed)
        if hit:
            self.counters.adapter_cache_hits += 1
        else:
            self.counters.adapter_cache_misses += 1
        with self._lock:  # an idle engine takes no picture of its own
            self._refresh_adapter_bytes()
            self._stats = self._measure()
        return info, hit

    def unload_adapter(self, name: str) -> int:
        _check_adapter_name(name)
        host = self._require_adapters()
        with self._lock:
            users = sum(1 for r in self._in_flight.values() if r.adapter and r.adapter.name == name)
            if users:
                raise FailedPrecondition(
                    f"adapter {name!r} is used by {users} queued or running requests; "
                    "unload it when they finish"
                )
            freed = host.unload(name)
            self._refresh_adapter_bytes()
            self._stats = self._measure()
            return freed

    def list_adapters(self) -> AdapterListing:
        return AdapterListing() if self.adapters is None else self.adapters.listing()

    def _require_adapters(self) -> AdapterHost:
        if self.adapters is None:
            raise FailedPrecondition(
                "this worker has no adapter store; start it with an adapter store to load adapters"
            )
        return self.adapters

    def _adapter_bytes(self) -> int:
        return self._adapter_resident

    def _refresh_adapter_bytes(self) -> None:
        self._adapter_resident = 0 if self.adapters is None else self.adapters.resident_bytes()

    # -- the loop -------------------------------------------------------------

    def step(self) -> bool:
        """Run one iteration; returns whether there was any work. Call it
        from one thread only (start() does that for you)."""
        with self._step_lock:
            started = time.perf_counter()
            switch, waiting = self._take_plan()
            self._drop_cancelled()
            # A waiting plan needs running requests to finish: admit none.
            newcomers = [] if waiting else self._admit()
            rows = len(self._active) + len(newcomers)  # the sequences this iteration runs
            prefill_started = prefill_ended = time.perf_counter()
            produced = 0
            if newcomers:
                produced = self._prefill(newcomers)
                prefill_ended = time.perf_counter()
                self.latency.prefill.observe(prefill_ended - prefill_started)
            try:
                if self._active:
                    decode_started = time.perf_counter()
                    produced += self._decode()
                    self.latency.decode_step.observe(time.perf_counter() - decode_started)
            except Exception as error:  # one forward for all rows: a bug, not a request's fault
                log.exception("decode step failed")
                self._fail_all(error)
            if rows:
                self.mix.record_step(rows, produced)
            if rows:
                self.step_count += 1
            self._shrink()
            self._stats = self._measure()
            self._serve_snapshots()
            if rows or switch:
                iteration = Iteration(
                    rows=rows,
                    newcomers=len(newcomers),
                    switched=switch is not None,
                    seconds=time.perf_counter() - started,
                    prefill_s=prefill_ended - prefill_started,
                )
                self.iterations.append(iteration)
            if waiting and not rows:
                time.sleep(0.001)  # only the plan's deadline can change anything now
            return bool(rows or switch or waiting)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._active if r.cancelled]:
            self._release(request)

    def _needed_layout(self, extra: Sequence[_Request] = ()) -> Layout | None:
        running = [*self._active, *extra]
        if not running:
            return None
        return Layout(len(running), max(r.worst_case for r in running))

    def _layout(self) -> Layout | None:
        cache = self._cache
        return None if cache is None else Layout(cache.batch_size, cache.capacity)

    def _admit(self) -> list[_Request]:
        """Take waiting requests, oldest first, while they fit. One that
        cannot fit even alone (the plan or budget changed since it was
        queued) is refused with ResourceExhausted rather than left waiting."""
        admitted: list[_Request] = []
        refused: list[_Request] = []
        layout = self._layout()
        adapter_bytes = self._adapter_bytes()
        with self._lock:
            if self._hold_back():
                return []
            while self._queue and len(self._active) + len(admitted) < self.admission.max_rows:
                candidate = self._queue[0]
                needed = self._needed_layout([*admitted, candidate])
                assert needed is not None
                chosen = self.admission.layout_for(self.model.plan, needed, adapter_bytes, layout)
                if chosen is not None:
                    admitted.append(self._queue.popleft())
                    layout = chosen
                elif not self.admission.fits(
                    self.model.plan, Layout(1, candidate.worst_case), adapter_bytes
                ):
                    refused.append(self._queue.popleft())
                    del self._in_flight[candidate.id]
                else:
                    break
        for request in refused:
            self.counters.requests_refused += 1
            self._emit(
                request,
                ResourceExhausted(
                    f"request needs {request.worst_case} positions of KV cache, which no "
                    "longer fit the budget under the current plan even alone; retry with "
                    "fewer max_new_tokens or on another worker"
                ),
            )
        if admitted:
            self._resize(layout)
            now = time.perf_counter()
            for request in admitted:
                self.latency.queue_wait.observe(now - request.arrived)
        return admitted

    def _hold_back(self) -> bool:
        """Whether to keep the queue waiting one more iteration so that its
        requests share a prefill (see __init__). Called under the lock."""
        if not self._queue or not self._active:
            return False
        group = min(self.prefill_group, self.admission.max_rows - len(self._active))
        head = self._queue[0]
        if len(self._queue) >= group or head.held >= self.max_admit_delay:
            return False
        head.held += 1
        return True

    def _shrink(self) -> None:
        """Give memory back when requests have left: free the cache when
        idle, shrink it when it is more than twice what is running needs."""
        needed = self._needed_layout()
        if needed is None:
            self._resize(None)
            return
        layout = self.admission.layout_for(
            self.model.plan, needed, self._adapter_bytes(), self._layout()
        )
        if layout is not None:
            self._resize(layout)

    def _resize(self, layout: Layout | None) -> None:
        """Give the cache this layout (None frees it), keeping running rows."""
        if layout == self._layout():
            return
        if layout is None:
            self._cache = None
        elif self._cache is None:
            self._cache = self.model.new_cache(layout.rows, layout.capacity)
        else:
            self._cache.resize(layout.rows, layout.capacity)

    def _forward(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, requests: Sequence[_Request]
    ) -> torch.Tensor:
        """Last-token logits [B, V] for rows requests[0].row.. of the cache."""
        assert self._cache is not None
        first = requests[0].row
        view = self._cache.rows(first, first + len(requests))
        extra: dict[str, object] = {}
        if self.adapters is not None and any(r.adapter for r in requests):
            extra["adapters"] = self.adapters.batch([r.adapter for r in requests])
        with torch.inference_mode():
            logits = self.model(input_ids, view, input_lengths=lengths, last_only=True, **extra)
        return logits[:, 0]  # type: ignore[no-any-return]

    def _prefill(self, newcomers: list[_Request]) -> int:
        """Seat the newcomers in the batch and prefill them together. Their
        forward touches their own rows only, so when it fails the running
        requests go on; and it is retried one newcomer at a time, so that a
        request that breaks its forward fails alone, not its group."""
        assert self._cache is not None
        for request in newcomers:
            request.row = len(self._active)
            self._active.append(request)
            self._cache.clear_row(request.row)
        return self._prefill_seated(newcomers)

    def _prefill_seated(self, newcomers: list[_Request]) -> int:
        assert self._cache is not None
        try:
            return self._prefill_rows(newcomers)
        except Exception as error:
            if len(newcomers) == 1:
                log.exception("prefill of request %s failed", newcomers[0].id)
                self._fail(newcomers, error)
                return 0
            log.warning("prefill of %d newcomers failed; trying each alone", len(newcomers))
        produced = 0
        for request in newcomers:  # rows move as requests leave: read each one's now
            if request.row >= 0:
                self._cache.clear_row(request.row)
                produced += self._prefill_seated([request])
        return produced

    def _prefill_rows(self, newcomers: list[_Request]) -> int:
        """One forward over the seated newcomers' prompts, then their first tokens."""
        width = max(len(r.prompt_ids) for r in newcomers)
        input_ids = torch.zeros(len(newcomers), width, dtype=torch.long)
        for index, request in enumerate(newcomers):
            input_ids[index, : len(request.prompt_ids)] = torch.tensor(request.prompt_ids)
        lengths = torch.tensor([len(r.prompt_ids) for r in newcomers])
        logits = self._forward(input_ids, lengths, newcomers)
        self.counters.prompt_tokens += int(lengths.sum())
        return self._sample_and_emit(newcomers, logits)

    def _decode(self) -> int:
        running = list(self._active)
        input_ids = torch.tensor([[r.next_input] for r in running])
        logits = self._forward(input_ids, torch.ones(len(running), dtype=torch.long), running)
        return self._sample_and_emit(running, logits)

    def _sample_and_emit(self, requests: list[_Request], logits: torch.Tensor) -> int:
        """Sample each row's token, stream it, release finished rows; returns
        the number of tokens produced. A row that fails here (its sampling,
        its text) fails alone: the others get their tokens."""
        tokens = sample_rows(logits, [r.params for r in requests], [r.generator for r in requests])
        config = self.model.config
        rules = FinishRules(config.eos_token_id, config.max_position_embeddings)
        produced = 0
        for request, token in zip(requests, tokens, strict=True):
            if request.cancelled:
                continue
            try:
                if isinstance(token, Exception):
                    raise token
                event = self._advance(request, token, rules)
            except Exception as error:
                log.exception("request %s failed", request.id)
                self._fail([request], error)
                continue
            produced += len(event.token_ids)
            if request.first_token_at is None:
                request.first_token_at = time.perf_counter()
                self.latency.time_to_first_token.observe(request.first_token_at - request.arrived)
            if event.finish_reason:  # released first: a client told "done" finds it gone
                self._release(request)
            self._emit(request, event)
        return produced

    def _advance(self, request: _Request, token: int, rules: FinishRules) -> TokenEvent:
        """Record one sampled token; the event to stream for it."""
        params = request.params
        stream = request.stream
        finish = rules.add(
            token, stream.tokens, len(request.prompt_ids), params, lambda: stream.text
        )
        new: tuple[int, ...] = ()
        text = ""
        if finish != "eos":  # the token was kept
            request.next_input = token
            new = (token,)
            self.counters.generated_tokens += 1
            text = stream.pending()
        if finish:
            completion = Completion(
                prompt_tokens=len(request.prompt_ids),
                token_ids=request.tokens,
                text=cut_at_stop(stream.text, params.stop),
                finish_reason=finish,
            )
            text += stream.finish(completion)
        return TokenEvent(
            request_id=request.id,
            token_ids=new,
            text=text,
            finish_reason=finish,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(request.tokens),
            decode_step=self.step_count,
            plan_id=self.plan_id,
        )

    def _emit(self, request: _Request, event: TokenEvent | Exception) -> None:
        try:
            request.sink(event)
        except Exception:  # a broken sink must not stop the loop
            log.exception("sink of request %s failed; cancelling it", request.id)
            self.cancel(request.id)

    def _release(self, request: _Request, failed: bool = False) -> None:
        """Take a request out of the batch: move the last row into its row
        (a request that never got a row is only forgotten)."""
        if request.row >= 0:
            assert self._cache is not None
            last = len(self._active) - 1
            row = request.row
            if row != last:
                moved = self._active[last]
                self._cache.move_row(last, row)
                self._active[row] = moved
                moved.row = row
            self._active.pop()
            self._cache.clear_row(last)
            request.row = -1
        with self._lock:
            if self._in_flight.get(request.id) is request:
                del self._in_flight[request.id]
                if failed:
                    self.counters.requests_failed += 1
                elif not request.cancelled:
                    self.counters.requests_finished += 1
        if not (request.cancelled or failed):
            self.mix.record_finished(len(request.prompt_ids), len(request.tokens))
            self._observe_finished(request)

    def _observe_finished(self, request: _Request) -> None:
        now = time.perf_counter()
        self.latency.request_duration.observe(now - request.arrived)
        generated = len(request.tokens)
        if request.first_token_at is not None and generated >= 2:
            per_token = (now - request.first_token_at) / (generated - 1)
            self.latency.time_per_output_token.observe(per_token)

    def _fail(self, requests: Sequence[_Request], error: Exception) -> None:
        """End these requests with `error`; the rest of the batch goes on."""
        for request in requests:
            self._release(request, failed=True)
            if not request.cancelled:
                self._emit(request, error)

    def _fail_all(self, error: Exception) -> None:
        """End every running request: their shared forward failed, so the
        cache may hold anything; it is dropped."""
        for request in list(self._active):
            self._emit(request, error)
            with self._lock:
                self._in_flight.pop(request.id, None)
            self.counters.requests_failed += 1
        self._active.clear()
        self._cache = None

    # -- statistics -------------------------------------------------------------

    def _measure(self) -> EnginePicture:
        report = account(self.model, self._cache)
        needed = self._needed_layout()
        return EnginePicture(
            weight_bytes=report.weight_bytes,
            kv_reserved_bytes=report.kv_reserved_bytes,
            kv_used_bytes=report.kv_used_bytes,
            adapter_bytes=self._adapter_bytes(),
            budget_bytes=self.admission.budget_bytes,
            kv_committed_bytes=self.admission.kv_bytes(self.model.plan, needed),
            active_sequences=len(self._active),
            plan_id=self.plan_id,
            keep_mask=tuple(self.model.plan.to_mask()),
            decode_step=self.step_count,
        )

    def stats(self) -> EngineStats:
        """The picture taken after the latest iteration, with the live queue depth."""
        with self._lock:
            queued = len(self._queue)
        return EngineStats(picture=self._stats, queue_depth=queued, mix=self.mix.snapshot())

    def snapshot(self) -> Future[Snapshot]:
        """The engine's figures and its device's, read together between two
        iterations, once the one running now (if any) has finished.

        What GetStats reports, so that the device's used bytes and the
        worker's own come from one moment: the picture from the latest
        iteration is older than the device (a request whose last token was
        just sent still holds its KV cache in it), and the operator would
        count the difference as other processes' memory. The engine's thread
        takes it (no iteration changes memory meanwhile); an engine whose
        thread has not started takes it at once in the caller's thread. The
        future fails with ValueError when the device cannot be read, and
        with Unavailable when the engine stops first."""
        future: Future[Snapshot] = Future()
        with self._lock:
            self._check_running()
            if self._thread is not None:
                self._snapshots.append(future)
                self._wake.notify_all()
                return future
        with self._step_lock:  # only the caller can be running iterations
            self._stats = self._measure()
            self._snapshots.append(future)
            self._serve_snapshots()
        return future

    def _serve_snapshots(self) -> None:
        """Answer the snapshots asked for, from one device reading, right
        after the picture was taken (the caller holds the step lock)."""
        with self._lock:
            waiting, self._snapshots = self._snapshots, []
        if not waiting:
            return
        try:
            snapshot = Snapshot(self.stats(), self.device.read(self._stats.total_bytes))
        except Exception as error:  # e.g. a broken simulated device file: the callers', not ours
            for future in waiting:
                _settle(future, error)
            return
        for future in waiting:
            if future.set_running_or_notify_cancel():
                future.set_result(snapshot)

    # -- the thread ---------------------------------------------------------------

    def start(self) -> None:
        """Run iterations in a background thread until close()."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run, name="elasticfleet-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (
                        self._stop
                        or self._queue
                        or self._pending_plans
                        or self._active
                        or self._snapshots
                    ):
                        self._wake.wait()
                    if self._stop:
                        return
                self.step()
        except BaseException as error:  # whatever it was: say so and fail fast
            log.critical("the engine thread died; the worker serves no more", exc_info=error)
            self._die(error)

    def _die(self, error: BaseException) -> None:
        """What is left when the engine thread dies: every queued and running
        request and every waiting plan fails with Unavailable, later calls
        fail at once (they would otherwise wait forever for a thread that is
        gone), and the listeners hear of it (the server turns NOT_SERVING)."""
        unavailable = Unavailable(
            f"the worker's engine stopped after an internal error ({type(error).__name__}); "
            "retry on another worker"
        )
        with self._lock:
            self.failure = error
            self._closing = True
            listeners = list(self._failure_listeners)
        self._abandon(unavailable)
        for listener in listeners:
            try:
                listener(error)
            except Exception:  # one listener's failure must not silence the others
                log.exception("an engine failure listener failed")

    def on_failure(self, listener: Callable[[BaseException], None]) -> None:
        """Call `listener(error)` (from the dying thread) if the engine thread
        dies; at once if it already has."""
        with self._lock:
            failure = self.failure
            if failure is None:
                self._failure_listeners.append(listener)
        if failure is not None:
            listener(failure)

    def check_running(self) -> None:
        """Raise Unavailable if the engine thread has died."""
        with self._lock:
            self._check_running()

    def _check_running(self) -> None:  # under the lock
        if self.failure is not None:
            raise Unavailable(
                "the worker's engine has stopped after an internal error; retry on another worker"
            )
        if self._stop:
            raise Unavailable("worker has shut down; send the request to another worker")

    def idle(self) -> bool:
        with self._lock:
            return not (self._queue or self._active or self._pending_plans)

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait until queued and running ones finish;
        returns whether they all did within the timeout."""
        with self._lock:
            self._closing = True
        deadline = time.monotonic() + timeout_s
        while not self.idle():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        """Stop the thread; requests still queued or running fail with Unavailable."""
        with self._lock:
            self._closing = True
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._abandon(Unavailable("worker shut down before the request finished; retry elsewhere"))

    def _abandon(self, error: Unavailable) -> None:
        """Fail every queued and running request and every waiting plan with
        `error`, and free the cache: no thread will run them any more."""
        with self._lock:
            leftovers = [*self._queue, *self._active]
            self._queue.clear()
            self._in_flight.clear()
            for pending in self._pending_plans:
                _settle(pending.future, error)
            self._pending_plans.clear()
            for future in self._snapshots:
                _settle(future, error)
            self._snapshots.clear()
        for request in leftovers:
            if not request.cancelled:
                self._emit(request, error)
        self._active.clear()
        self._cache = None
