"""The serving engine: continuous batching, memory-safe admission and live
plan switching, in plain Python so it is tested without gRPC.

One thread owns the model and its paged KV cache and runs iterations. Each one:

1. applies the latest pruning plan pushed (plans change only here, between
   decode steps, never inside one). When the running requests' KV blocks
   do not fit beside the new plan and budget (a squeeze), the youngest are
   preempted first, so the switch takes effect in this iteration. What a
   switch frees goes back to the device (its allocator's cache is released);
2. drops cancelled requests, freeing their KV blocks;
3. admits waiting requests, preempted ones first, then first come first
   served, while the blocks charged to the running requests and them fit
   the memory budget (worker/serving/admission.py: each is charged what it
   holds after the next step plus a growth window); while sequences run, a
   few newcomers are gathered first so that they share one prefill (at most
   `max_admit_delay` iterations);
4. feeds prompt chunks in one forward, at most `step_tokens` minus the
   decoding rows (at least MIN_CHUNK), oldest prompt first; a request whose
   prompt is complete samples its first token (chunked prefill: a joining
   prompt holds the running batch up for one chunk at most);
5. runs one decode step over every decoding sequence, samples, streams each
   token to its request's sink, and releases finished requests at once;
6. sizes the pool for what the running requests are charged (none when
   idle), measures what it holds and, when asked (Engine.snapshot, for
   GetStats), reads the device at that moment, so that the device's figures
   and the worker's describe the same memory.

Before each forward every row gets the blocks its new tokens need; where
the budget has none free, the youngest running request is preempted. A
preempted request loses its blocks, waits at the head of the queue, and
when admitted again its prompt and the tokens it generated are prefilled
anew (recompute: on a CPU, swapping to host memory would free nothing);
its stream, sampling generator and tokens are kept, so nothing is sent
twice and greedy output is the same as an unpreempted run's.

Running sequences occupy the first rows of the cache, decoding ones first
and then those still prefilling, oldest first, so that each forward runs on
a view of consecutive rows; a row that leaves closes its gap by moving
block-table rows, never keys or values.

What a plan switch does to a running request (the documented semantics):

- its tokens before the switch were computed under the old plan and stay;
- an attention block that the new plan drops is gone for every sequence
  from the next step on, and its KV is freed at the switch;
- an attention block that the new plan restores has no KV for the tokens a
  running sequence already holds: it attends only to tokens from the switch
  on (KVCache.history_start), while the other kept blocks keep their full
  history;
- requests admitted after the switch, requests whose prompt was not yet
  fully fed (their prefill starts over), and preempted requests when they
  are recomputed, run under the new plan from their first token, exactly as
  if it had always been in force.

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
from dataclasses import dataclass, field, replace
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
from elasticfleet.worker.model.memory import blocks_for
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.admission import GROWTH_TOKENS, Admission
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
# Tokens one iteration computes (decode rows and prompt chunks together), and
# the smallest prompt chunk an iteration feeds however many rows decode.
STEP_TOKENS = 256
MIN_CHUNK = 32


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
    kv_block_tokens: int  # positions per KV block
    kv_blocks_in_use: int  # blocks holding running sequences' tokens
    kv_blocks_reserved: int  # blocks in the pool (in use, free and scratch)
    kv_blocks_committed: int  # blocks admission charges the running sequences
    active_sequences: int
    plan_id: str
    keep_mask: tuple[bool, ...]
    decode_step: int
    plan: PruningPlan | None = None  # the plan in force, levels and all

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
    preempted: int = 0  # running sequences it sent back to the queue

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
    preemptions: int = 0
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
    # What the prefill feeds the cache: the prompt, or after a preemption
    # the prompt and every token generated so far (recomputed, not resent).
    feed: list[int] = field(default_factory=list)
    fed: int = 0  # tokens of `feed` in the cache; the request decodes once all are
    admitted: int = 0  # first admission's order: the youngest is preempted first

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.feed)

    def held_after_step(self) -> int:
        """Tokens the cache holds for this request after its next step."""
        return max(len(self.feed), len(self.prompt_ids) + len(self.tokens) + 1)

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
        step_tokens: int = STEP_TOKENS,
        kv_growth_tokens: int = GROWTH_TOKENS,
    ) -> None:
        if max_queue < 0 or max_batch < 1:
            raise ValueError(f"need max_queue >= 0 and max_batch >= 1, got {max_queue}/{max_batch}")
        if prefill_group < 1 or max_admit_delay < 0:
            raise ValueError("need prefill_group >= 1 and max_admit_delay >= 0")
        if step_tokens < 1 or kv_growth_tokens < 0:
            raise ValueError("need step_tokens >= 1 and kv_growth_tokens >= 0")
        self.model = model
        # Chunked prefill: an iteration feeds prompts at most
        # max(step_tokens - decoding rows, MIN_CHUNK) tokens, in one forward
        # before the decode step, so a joining prompt stalls the running
        # batch for one chunk at most, and prompts always make progress.
        self.step_tokens = step_tokens
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
        self.admission = Admission(
            model.config, model.dtype, budget_bytes, max_batch, kv_growth_tokens
        )
        if self.admission.max_blocks(model.plan, self._adapter_bytes()) < 2:
            needed = self.admission.total_bytes(model.plan, 0, self._adapter_bytes())
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
        # Running requests in row order: decoding ones first, then those
        # still prefilling, oldest first (so each forward's rows are consecutive).
        self._active: list[_Request] = []
        self._admissions = 0
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
        if not self._fits_alone(worst):
            kv = self.admission.kv_bytes(self.model.plan, blocks_for(worst))
            raise ResourceExhausted(
                f"request needs {kv} bytes of KV cache at its worst case ({len(ids)} prompt + "
                f"{params.max_new_tokens} new tokens), more than the budget of "
                f"{self.admission.budget_bytes} leaves after weights and adapters even on an "
                "idle worker; lower max_new_tokens or shorten the prompt"
            )
        return PreparedRequest(request_id or uuid.uuid4().hex, ids, params, adapter, worst)

    def _fits_alone(self, worst_case: int) -> bool:
        """Whether a request that may fill `worst_case` positions could run
        to its end on an idle worker (else it would preempt itself forever)."""
        cap = self.admission.max_blocks(self.model.plan, self._adapter_bytes())
        return 1 + blocks_for(worst_case) <= cap

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
            feed=prepared.prompt_ids,
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
    ) -> Future[PlanSwitch]:
        """Schedule a plan (and optionally a new budget) for the next
        iteration; the future gets the PlanSwitch.

        The switch happens at the start of the next iteration. When the
        running sequences' blocks do not fit beside the new plan's weights
        (a squeeze), the youngest are preempted first (`_preempt_to_fit`):
        they wait in the queue, keep their tokens, and resume when room
        returns. The future fails with FailedPrecondition when a newer plan
        supersedes it before that iteration. A plan whose weights alone
        exceed the budget is refused at once."""
        check_length("plan_id", plan_id, MAX_PLAN_ID)
        config = self.model.config
        if plan.num_layers != config.num_hidden_layers:
            raise InvalidArgument(
                f"plan is for {plan.num_layers} layers but the model has "
                f"{config.num_hidden_layers} ({config.num_blocks} blocks)"
            )
        if budget_bytes is not None and budget_bytes <= 0:
            raise InvalidArgument(f"budget must be positive, got {budget_bytes}")
        check = self._admission_for(budget_bytes)
        fixed = check.total_bytes(plan, 0, self._adapter_bytes())
        if check.max_blocks(plan, self._adapter_bytes()) < 2:  # scratch + one block
            raise FailedPrecondition(
                f"plan {plan_id!r} needs {fixed} bytes for its weights and the loaded adapters "
                f"alone, leaving no KV block within the budget of {check.budget_bytes}; drop "
                "more blocks"
            )
        future: Future[PlanSwitch] = Future()
        pending = _PendingPlan(plan, plan_id, budget_bytes, future)
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
            f"plan {pending.plan_id!r} was superseded by plan {newer!r} before it was applied"
        )

    def _admission_for(self, budget_bytes: int | None) -> Admission:
        """The admission arithmetic under a new budget (None: the current one)."""
        return replace(self.admission, budget_bytes=budget_bytes or self.admission.budget_bytes)

    def _take_plan(self) -> PlanSwitch | None:
        """Apply the plan waiting, if any; the switch it made.

        A plan whose caller gave up (cancelled the future: a cancelled RPC,
        a passed deadline) is dropped unapplied. The future is claimed (set
        running) just before the switch, so a settled or cancelled future
        is never set again."""
        with self._lock:
            if not self._pending_plans:
                return None
            pending = self._pending_plans.pop(0)
        future = pending.future
        if not future.set_running_or_notify_cancel():
            return None
        try:
            switch = self._switch(pending)
        except Exception as error:
            future.set_exception(error)
            return None
        future.set_result(switch)
        return switch

    def _switch(self, pending: _PendingPlan) -> PlanSwitch:
        """Switch to the plan, preempting the youngest running sequences
        whose blocks do not fit beside it."""
        started = time.perf_counter()
        plan = pending.plan
        check = self._admission_for(pending.budget_bytes)
        # Blocks are dropped before others are restored (below): verify the
        # stored weights first, so a corrupt block refuses the switch intact.
        self.model.check_restore(plan)
        before = self._stats.total_bytes
        current = self.model.plan
        cap = check.max_blocks(plan, self._adapter_bytes())
        preempted = self._preempt_to_fit(cap)
        if plan != current:
            # A prompt part-fed under the old plan starts over under the new
            # one, exactly like a request admitted after the switch.
            for request in self._active:
                if request.fed and not request.decoding:
                    assert self._cache is not None
                    self._cache.clear_row(request.row)
                    request.fed = 0
        # Drop and demote first, then shrink the pool, then restore and
        # promote: memory never peaks above the larger of the old and new totals.
        lower = current.meet(plan)
        if lower is not None:
            self._set_plan(lower)
        self.admission = check
        if self._cache is not None:
            self._cache.reserve(min(self._cache.num_blocks, cap))
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
            preempted=preempted,
        )

    def _set_plan(self, plan: PruningPlan) -> None:
        self.model.apply_plan(plan)
        if self._cache is not None:
            self._cache.sync_layers(plan.keep_attention, plan.kv_levels())
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
                self.model.plan, 1 + self._charged(), self._adapter_bytes()
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
            switch = self._take_plan()
            self._drop_cancelled()
            newcomers = self._admit()
            rows = len(self._active)  # the sequences this iteration runs
            prefill_started = prefill_ended = time.perf_counter()
            produced = 0
            chunks = self._chunks()
            if chunks:
                produced = self._prefill(chunks)
                prefill_ended = time.perf_counter()
                self.latency.prefill.observe(prefill_ended - prefill_started)
            try:
                if any(r.decoding for r in self._active):
                    decode_started = time.perf_counter()
                    produced += self._decode()
                    self.latency.decode_step.observe(time.perf_counter() - decode_started)
            except Exception as error:  # one forward for all rows: a bug, not a request's fault
                log.exception("decode step failed")
                self._fail_all(error)
            if rows:
                self.mix.record_step(rows, produced)
                self.step_count += 1
            self._fit_pool()
            self._stats = self._measure()
            self._serve_snapshots()
            if rows or switch:
                iteration = Iteration(
                    rows=rows,
                    newcomers=newcomers,
                    switched=switch is not None,
                    seconds=time.perf_counter() - started,
                    prefill_s=prefill_ended - prefill_started,
                )
                self.iterations.append(iteration)
            return bool(rows or switch)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._active if r.cancelled]:
            self._release(request)

    def _charged(self, extra: Sequence[_Request] = ()) -> int:
        """Blocks the growth reservation charges the running requests (and `extra`)."""
        charge = self.admission.charge
        return sum(charge(r.held_after_step(), r.worst_case) for r in (*self._active, *extra))

    def _cap(self) -> int:
        """The largest pool the budget allows now."""
        return self.admission.max_blocks(self.model.plan, self._adapter_bytes())

    def _admit(self) -> int:
        """Seat waiting requests, oldest first (preempted ones are at the
        head), while their charges fit; returns how many. One that cannot
        fit even alone (the plan or budget changed since it was queued) is
        refused with ResourceExhausted rather than left waiting."""
        admitted: list[_Request] = []
        refused: list[_Request] = []
        cap = self._cap()
        with self._lock:
            if self._hold_back():
                return 0
            charged = self._charged()
            while self._queue and len(self._active) + len(admitted) < self.admission.max_rows:
                candidate = self._queue[0]
                cost = self.admission.charge(candidate.held_after_step(), candidate.worst_case)
                if 1 + charged + cost <= cap:
                    admitted.append(self._queue.popleft())
                    charged += cost
                elif not self._fits_alone(candidate.worst_case):
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
        if admitted and self._cache is None:
            self._cache = self.model.new_cache(self.admission.max_rows, 0)
        for request in admitted:
            if not request.admitted:  # a preempted request keeps its age: no starving
                self._admissions += 1
                request.admitted = self._admissions
            request.row = len(self._active)
            self._active.append(request)
        if admitted:
            self._fit_pool()
            now = time.perf_counter()
            for request in admitted:
                self.latency.queue_wait.observe(now - request.arrived)
        return len(admitted)

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

    def _fit_pool(self) -> None:
        """Size the pool for what the running requests are charged (see
        admission.py): none when idle, grown ahead of their growth, shrunk
        when it is more than twice what they are charged."""
        if not self._active:
            self._cache = None
            return
        assert self._cache is not None
        cache = self._cache
        size = self.admission.pool_size(self._charged(), cache.num_blocks, self._cap())
        cache.reserve(max(size, cache.blocks_in_use + 1))

    def _secure(self, requests: Sequence[_Request], tokens: Sequence[int]) -> list[_Request]:
        """Assign blocks so that each request holds its `tokens` positions,
        growing the pool within the budget; where the budget has no room,
        preempt the youngest running request until it does. Returns the
        requests still running, in row order."""
        assert self._cache is not None
        cache = self._cache
        want = dict(zip((r.id for r in requests), tokens, strict=True))
        while True:
            running = [r for r in self._active if r.id in want]
            missing = sum(
                max(0, blocks_for(want[r.id]) - len(cache.row_blocks[r.row])) for r in running
            )
            if missing > len(cache.free):
                needed = cache.num_blocks + missing - len(cache.free)
                if needed <= self._cap():
                    cap = self._cap()
                    cache.reserve(max(needed, self.admission.pool_size(needed - 1, needed, cap)))
            if missing <= len(cache.free):
                for request in running:
                    cache.assign(request.row, want[request.id])
                return running
            self._preempt(max(self._active, key=lambda r: r.admitted))

    def _preempt(self, request: _Request) -> None:
        """Send a running request back to the head of the queue (recompute):
        its blocks are freed now; when it is admitted again its prompt and
        the tokens it has generated are prefilled anew, and it goes on
        generating from there. Nothing is sent twice: its stream, sampling
        generator and tokens are kept."""
        self._unseat(request)
        request.feed = request.prompt_ids + request.tokens
        request.fed = 0
        request.held = 0
        self.counters.preemptions += 1
        with self._lock:
            self._queue.appendleft(request)

    def _preempt_to_fit(self, cap: int) -> int:
        """Preempt the youngest running requests until the blocks the rest
        need for their next step (plus scratch) fit a pool of `cap`; returns
        how many were preempted (the squeeze rule)."""
        preempted = 0
        while self._active and 1 + sum(blocks_for(r.held_after_step()) for r in self._active) > cap:
            self._preempt(max(self._active, key=lambda r: r.admitted))
            preempted += 1
        return preempted

    def _forward(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, requests: Sequence[_Request]
    ) -> torch.Tensor:
        """Last-token logits [B, V] for the consecutive rows requests[0].row.. of the cache."""
        assert self._cache is not None
        first = requests[0].row
        view = self._cache.rows(first, first + len(requests))
        extra: dict[str, object] = {}
        if self.adapters is not None and any(r.adapter for r in requests):
            extra["adapters"] = self.adapters.batch([r.adapter for r in requests])
        with torch.inference_mode():
            logits = self.model(input_ids, view, input_lengths=lengths, last_only=True, **extra)
        return logits[:, 0]  # type: ignore[no-any-return]

    def _chunks(self) -> list[tuple[_Request, int]]:
        """This iteration's prompt chunks: prefilling requests, oldest first,
        each fed as much as the step's token budget has left."""
        decoding = sum(1 for r in self._active if r.decoding)
        budget = max(self.step_tokens - decoding, MIN_CHUNK)
        chunks: list[tuple[_Request, int]] = []
        for request in self._active[decoding:]:
            if budget <= 0:
                break
            count = min(len(request.feed) - request.fed, budget)
            chunks.append((request, count))
            budget -= count
        return chunks

    def _prefill(self, chunks: list[tuple[_Request, int]]) -> int:
        """Feed the chunks in one forward; requests whose feed is complete
        sample their next token. The forward touches the chunks' rows only,
        so when it fails the running requests go on; and it is retried one
        request at a time, so that a request that breaks its forward fails
        alone, not its group."""
        assert self._cache is not None
        counts = {r.id: count for r, count in chunks}
        running = self._secure([r for r, _ in chunks], [r.fed + c for r, c in chunks])
        chunks = [(r, counts[r.id]) for r in running]
        if not chunks:
            return 0
        try:
            return self._prefill_rows(chunks)
        except Exception as error:
            if len(chunks) == 1:
                log.exception("prefill of request %s failed", chunks[0][0].id)
                self._fail([chunks[0][0]], error)
                return 0
            log.warning("prefill of %d requests failed; trying each alone", len(chunks))
        produced = 0
        for request, count in chunks:  # rows move as requests leave: read each one's now
            if request.row >= 0:
                self._cache.lengths[request.row] = request.fed
                produced += self._prefill([(request, count)])
        return produced

    def _prefill_rows(self, chunks: list[tuple[_Request, int]]) -> int:
        """One forward over the chunks (consecutive rows), then the next
        token of each request it completed."""
        width = max(count for _, count in chunks)
        input_ids = torch.zeros(len(chunks), width, dtype=torch.long)
        for index, (request, count) in enumerate(chunks):
            part = request.feed[request.fed : request.fed + count]
            input_ids[index, :count] = torch.tensor(part)
        lengths = torch.tensor([count for _, count in chunks])
        logits = self._forward(input_ids, lengths, [r for r, _ in chunks])
        self.counters.prompt_tokens += int(lengths.sum())
        done: list[int] = []
        for index, (request, count) in enumerate(chunks):
            request.fed += count
            if request.decoding:
                done.append(index)
        if not done:
            return 0
        return self._sample_and_emit([chunks[i][0] for i in done], logits[done])

    def _decode(self) -> int:
        decoding = [r for r in self._active if r.decoding]
        assert self._cache is not None
        lengths = self._cache.lengths.tolist()
        running = self._secure(decoding, [lengths[r.row] + 1 for r in decoding])
        if not running:
            return 0
        assert running[-1].row == len(running) - 1, "decoding rows must come first"
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
        """Take a request out of the batch, freeing its blocks (a request
        that never got a row is only forgotten)."""
        if request.row >= 0:
            self._unseat(request)
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

    def _unseat(self, request: _Request) -> None:
        """Free a running request's blocks and close the gap its row leaves,
        keeping the other rows' order (decoding ones first)."""
        assert self._cache is not None
        row = request.row
        self._cache.clear_row(row)
        self._active.pop(row)
        order = [*range(row), *range(row + 1, len(self._active) + 1), row]
        self._cache.arrange(order)
        for index in range(row, len(self._active)):
            self._active[index].row = index
        request.row = -1

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
        cache = self._cache
        charged = self._charged()
        return EnginePicture(
            weight_bytes=report.weight_bytes,
            kv_reserved_bytes=report.kv_reserved_bytes,
            kv_used_bytes=report.kv_used_bytes,
            adapter_bytes=self._adapter_bytes(),
            budget_bytes=self.admission.budget_bytes,
            kv_committed_bytes=self.admission.kv_bytes(self.model.plan, charged),
            kv_block_tokens=self.admission.block_tokens,
            kv_blocks_in_use=0 if cache is None else cache.blocks_in_use,
            kv_blocks_reserved=0 if cache is None else cache.num_blocks,
            kv_blocks_committed=charged,
            active_sequences=len(self._active),
            plan_id=self.plan_id,
            keep_mask=tuple(self.model.plan.to_mask()),
            decode_step=self.step_count,
            plan=self.model.plan,
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
