"""Fault injection over the whole loop: the real operator (`elasticfleet
operator run`, a process of its own) against the emulated API server, two
real `elasticfleet worker` processes on the tiny model (tiny_fleet.Kubelet
runs them from the operator's Deployment), a real Valkey holding the
fleet's adapter set, client threads streaming completions to both workers
the whole time, and other processes squeezing and relaxing the workers'
devices so plans keep switching. Then, one after the other:

1. the API server fails the operator's status writes with 500 and 409 and
   ends its watches with 410 Expired (as a compaction does);
2. a worker is killed with SIGKILL in the middle of a stream, and restarted;
3. Redis is stopped while plans switch, and a worker restarts while it is
   down (so it cannot load its adapter set), then Redis comes back;
4. the operator is killed with SIGKILL in the middle of a tick (after it
   pushed a plan, while its status write hangs), and a new one started.

What must hold:
- zero budget overruns: no GetStats sample (ten a second per worker) shows
  a worker holding more than its budget (weights + reserved KV + adapters),
  and no plan change is predicted over its budget;
- zero lost or duplicated completions: every request either completes once
  (one final message, the tokens asked for, decode steps strictly
  increasing, nothing repeated) or fails, and no stream hangs;
- every client error precise: UNAVAILABLE only from the worker killed or
  restarted (or, while Redis is down, for an adapter that could not follow a
  plan switch), NOT_FOUND only for adapter requests to a restarted worker
  before the operator has loaded its adapter, RESOURCE_EXHAUSTED only for a
  request the squeezed budget cannot hold; nothing else;
- recovery within RECOVERY_TICKS control ticks once each fault is over
  (ticks counted as the operator's status writes the API server accepted):
  the fleet Available and not Degraded, every worker reachable, holding
  its adapter set and serving requests with it.

About a minute on two busy cores.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from kube_faults import Fault
from operator_pod import ELASTICFLEET, alive
from test_operator_kopf import FLEETS, _condition
from test_operator_workers import fleet_body, fleet_object, publish_adapter, worker_status
from tiny_fleet import DEVICE_BYTES, Kubelet, squeeze
from valkey_server import TestRedisServer, free_port
from waiting import wait_for

from elasticfleet.worker.serving.client import WorkerClient, generate_request
from elasticfleet.worker.serving.process import stop_process
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb

if TYPE_CHECKING:
    from kube_emulator import EmulatedCluster

# Fixture: cluster (the emulated API, $KUBECONFIG pointing at it).
pytest_plugins = ["kube_emulator"]

# The bound the test states: control ticks from the end of a fault to a
# recovered fleet (a tick to notice, a tick or two to reload an adapter
# through retries, slack for a tick whose write the API refused).
RECOVERY_TICKS = 6
MAX_NEW_TOKENS = 48
REQUEST_TIMEOUT_S = 30.0
STATUS_WRITE = ("patch", "elasticfleets", "status")


class OperatorProcess:
    """`elasticfleet operator run` as its own process (so it can be killed
    with SIGKILL), logged in with the admin's kubeconfig ($KUBECONFIG)."""

    def __init__(self, folder: Path, name: str) -> None:
        self.log = folder / f"{name}.log"
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        env = {k: v for k, v in os.environ.items() if k != "ELASTICFLEET_REDIS_URL"}
        with self.log.open("w") as sink:
            command = [ELASTICFLEET, "operator", "run", "--standalone", "--liveness", self.liveness]
            self.process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        probe = partial(alive, self.process, self.log, self.liveness)
        wait_for("the operator's liveness endpoint", probe, 60, 0.2)

    def __enter__(self) -> OperatorProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        stop_process(self.process)


@dataclass
class Outcome:
    """One request as its client saw it."""

    request_id: str
    pod: str
    adapter: bool
    started: float
    ended: float = 0.0
    messages: list[pb.GenerateResponse] = field(default_factory=list)
    code: grpc.StatusCode | None = None
    details: str = ""

    def problem(self) -> str:
        """What is wrong with the stream itself ('' if nothing)."""
        # The iteration that prefills a request also decodes it, so its first
        # two messages carry one step, and so do the two after a preemption
        # (the engine recomputes the request's tokens so far, then decodes);
        # steps never go back, and no step carries more than two messages.
        steps = [m.decode_step for m in self.messages]
        if any(b < a for a, b in itertools.pairwise(steps)) or any(
            steps.count(step) > 2 for step in set(steps)
        ):
            return f"decode steps out of order: {steps}"
        if any(m.request_id != self.request_id for m in self.messages):
            return "a message for another request"
        counted = 0
        for message in self.messages:
            counted += len(message.token_ids)
            if message.completion_tokens != counted:
                return f"completion_tokens {message.completion_tokens} after {counted} tokens"
        finals = [i for i, m in enumerate(self.messages) if m.finish_reason]
        if self.code is not None:
            # A worker killed after it sent a final message but before the
            # call's trailers ends the call UNAVAILABLE (checked below to come
            # from a killed worker only); any other error after the end is wrong.
            after_end = finals and self.code != grpc.StatusCode.UNAVAILABLE
            return "a final message, then an error" if after_end else ""
        if finals != [len(self.messages) - 1]:
            return f"final messages at {finals} of {len(self.messages)}"
        if counted != MAX_NEW_TOKENS or self.messages[-1].finish_reason != pb.FINISH_REASON_LENGTH:
            return f"{counted} tokens, finish {self.messages[-1].finish_reason}"
        return ""


class Traffic:
    """Client threads streaming completions to each worker until stopped;
    every other request names the fleet's adapter set (task qa)."""

    def __init__(self, addresses: dict[str, str], per_worker: int = 2) -> None:
        self.outcomes: list[Outcome] = []
        self.running: dict[str, Outcome] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(pod, address, index), daemon=True)
            for pod, address in addresses.items()
            for index in range(per_worker)
        ]
        for thread in self._threads:
            thread.start()

    def _client(self, pod: str, address: str, index: int) -> None:
        with WorkerClient(address) as client:
            for number in itertools.count():
                if self._stop.is_set():
                    return
                adapter = number % 2 == 1
                outcome = Outcome(f"{pod}-{index}-{number}", pod, adapter, time.monotonic())
                request = generate_request(
                    "<1> <2> <3> <4>",
                    max_new_tokens=MAX_NEW_TOKENS,
                    ignore_eos=True,
                    request_id=outcome.request_id,
                    adapter="tasks" if adapter else None,
                    task="qa" if adapter else None,
                )
                with self._lock:
                    self.running[outcome.request_id] = outcome
                try:
                    for message in client.generate(request, timeout=REQUEST_TIMEOUT_S):
                        outcome.messages.append(message)
                except grpc.RpcError as error:
                    outcome.code, outcome.details = error.code(), str(error.details())
                outcome.ended = time.monotonic()
                with self._lock:
                    del self.running[outcome.request_id]
                    self.outcomes.append(outcome)
                if outcome.code is not None:
                    time.sleep(0.05)  # a worker that is down is not hammered

    def mid_stream(self, pod: str) -> bool:
        """Whether a request to `pod` has received tokens and not finished."""
        with self._lock:
            return any(o.pod == pod and o.messages for o in self.running.values())

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT_S + 5)
            assert not thread.is_alive(), "a client hangs"
        return self.outcomes


class BudgetWatch:
    """Samples every worker's memory ten times a second; an overrun is a
    sample holding more than its budget."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self.samples = 0
        self.overruns: list[tuple[str, pb.WorkerMemory]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(addresses,), daemon=True)
        self._thread.start()

    def _run(self, addresses: dict[str, str]) -> None:
        clients = {pod: WorkerClient(address) for pod, address in addresses.items()}
        try:
            while not self._stop.wait(0.1):
                for pod, client in clients.items():
                    try:
                        memory = client.get_stats(timeout=2).memory
                    except grpc.RpcError:
                        continue  # down: nothing to sample
                    self.samples += 1
                    held = memory.weight_bytes + memory.kv_reserved_bytes + memory.adapter_bytes
                    if held > memory.budget_bytes:
                        self.overruns.append((pod, memory))
        finally:
            for client in clients.values():
                client.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Squeezer:
    """Other processes taking and giving back the workers' device memory,
    each worker on its own rhythm, so plans keep switching (unless paused)."""

    def __init__(self, kubelet: Kubelet, pods: list[str], levels: list[int]) -> None:
        self.kubelet, self.pods, self.levels = kubelet, pods, levels
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for step in itertools.count():
            if self._stop.wait(0.7):
                return
            if not self._paused.is_set():
                for offset, pod in enumerate(self.pods):
                    level = self.levels[(step + offset) % len(self.levels)]
                    squeeze(self.kubelet.device(pod), level)

    def pause(self, level: int = 0) -> None:
        """Let other processes hold `level` bytes of every device, and keep it so."""
        self._paused.set()
        time.sleep(0.1)  # a round in progress ends
        for pod in self.pods:
            squeeze(self.kubelet.device(pod), level)

    def resume(self) -> None:
        self._paused.clear()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def status_writes(cluster: EmulatedCluster) -> int:
    """Control ticks so far: the fleet status writes the API server served
    (a write it failed is no tick; the spec handler's rare writes count
    too, which only makes the bound stricter)."""
    decisions = list(cluster.emulator.decisions)
    return sum(
        1
        for d in decisions
        if d.allowed
        and (d.attributes.verb, d.attributes.resource, d.attributes.subresource) == STATUS_WRITE
    ) - sum(f.fired for f in list(cluster.emulator.faults) if f.verb == "patch")


def recovered(cluster: EmulatedCluster, addresses: dict[str, str], version: int) -> bool:
    """Available, not Degraded, every worker reachable with its adapter set
    and serving requests with it."""
    fleet = fleet_object(cluster)
    if _condition(fleet, "Available").get("status") != "True":
        return False
    if _condition(fleet, "Degraded").get("status") != "False":
        return False
    for pod in addresses:
        entry = worker_status(cluster, pod)
        held = {(a["name"], a["version"]) for a in entry.get("adapters", [])}
        if not entry.get("reachable") or ("tasks", str(version)) not in held:
            return False
    return all(serves_adapter(address) for address in addresses.values())


@dataclass
class Recovery:
    """Ticks from the end of each fault to a recovered fleet."""

    cluster: EmulatedCluster
    addresses: dict[str, str]
    version: int
    ticks: dict[str, int] = field(default_factory=dict)

    def wait(self, fault: str, timeout_s: float = 45.0) -> None:
        start = status_writes(self.cluster)
        wait_for(
            f"recovery from {fault}",
            lambda: (
                status_writes(self.cluster) > start
                and recovered(self.cluster, self.addresses, self.version)
            ),
            timeout_s,
            0.05,
        )
        self.ticks[fault] = status_writes(self.cluster) - start


def serves_adapter(address: str) -> bool:
    """Whether `address` completes a request with the fleet's adapter set."""
    request = generate_request("<1>", max_new_tokens=2, adapter="tasks", task="qa")
    with WorkerClient(address) as client:
        try:
            client.complete(request, timeout=10)
        except grpc.RpcError:
            return False
    return True


@contextlib.contextmanager
def logs_shown_on_failure(folder: Path) -> Iterator[None]:
    """On a failure, print the end of every process's log (operators, workers)."""
    try:
        yield
    except BaseException:
        for log in sorted(folder.glob("*.log")):
            lines = [line for line in log.read_text().splitlines() if "/healthz" not in line]
            print(f"--- {log.name}", *lines[-40:], sep="\n")
        raise


@contextlib.contextmanager
def running(*stoppable: Any) -> Iterator[None]:
    """Stop each of `stoppable` on the way out, whatever happens."""
    try:
        yield
    finally:
        for thing in stoppable:
            thing.stop()


def test_the_loop_survives_faults_with_every_guarantee_kept(
    cluster: EmulatedCluster,
    tiny_profiles: Path,
    tiny_worker_model: Path,
    restartable_redis: TestRedisServer,
    tmp_path: Path,
) -> None:
    version = publish_adapter(restartable_redis.url)
    body = fleet_body(
        tiny_worker_model,
        "tiny",
        2,
        adapters=[{"name": "tasks"}],
        redis={"url": restartable_redis.url},
    )
    adapter_set = {
        "apiVersion": "elasticfleet.io/v1alpha1",
        "kind": "AdapterSet",
        "metadata": {"name": "tasks"},
        "spec": {"baseModel": "tiny-llama", "tasks": ["code", "qa"], "rank": 4, "alpha": 8,
                 "modules": ["q_proj", "v_proj"]},
    }  # fmt: skip
    with (
        logs_shown_on_failure(tmp_path),
        Kubelet(cluster, tmp_path) as kubelet,
        OperatorProcess(tmp_path, "operator-1") as first_operator,
    ):
        cluster.call(
            "POST", "/apis/elasticfleet.io/v1alpha1/namespaces/ns/adaptersets", adapter_set
        )
        cluster.call("POST", FLEETS, body)
        (deployment,) = wait_for("the Deployment", lambda: cluster.objects("apps/v1/deployments"))
        pods = kubelet.sync(deployment)
        addresses = {pod: kubelet.workers[pod].address for pod in pods}
        recovery = Recovery(cluster, addresses, version)
        recovery.wait("the start")
        with WorkerClient(addresses[pods[0]]) as client:
            dense = client.get_stats(timeout=10).memory
        own = dense.weight_bytes + dense.adapter_bytes
        # Nothing taken; half the worker's memory taken; all but its own.
        levels = [0, DEVICE_BYTES - 2 * own, DEVICE_BYTES - own]
        squeezer = Squeezer(kubelet, pods, levels)
        budgets = BudgetWatch(addresses)
        traffic = Traffic(addresses)
        with running(squeezer, budgets, traffic):
            # 1. The API server fails status writes and ends the watches.
            faults = [
                cluster.emulator.inject(Fault(500, *STATUS_WRITE, times=3)),
                cluster.emulator.inject(Fault(409, *STATUS_WRITE, times=2)),
                cluster.emulator.inject(Fault(410, "watch", "pods")),
            ]
            for resource in ("v1/pods", "elasticfleet.io/v1alpha1/elasticfleets"):
                cluster.run(cluster.emulator.expire_watches(resource))
            wait_for(
                "every API fault answered", lambda: all(f.fired == f.times for f in faults), 30
            )
            recovery.wait("API errors")

            # 2. A worker killed in the middle of a stream, then restarted on
            # a squeezed device: it starts pruned, and loads its adapter set
            # for the blocks its plan keeps.
            squeezer.pause(levels[-1])
            victim = pods[1]
            wait_for("a stream in flight", lambda: traffic.mid_stream(victim), 10, 0.005)
            kubelet.kill(victim)
            killed_at = time.monotonic()
            wait_for(
                "the killed worker reported",
                lambda: (
                    _condition(fleet_object(cluster), "Degraded").get("reason")
                    == "WorkerUnreachable"
                ),
            )
            kubelet.restart(victim)
            restarted = [(victim, killed_at, time.monotonic())]
            recovery.wait("a killed worker")

            # 3. Redis stopped; a worker restarts meanwhile (so cannot load its
            # adapter set); the memory comes back, and the other worker's
            # restored blocks need adapter parts it never fetched. Plans then
            # stay as they are, so only the loop can bring the adapters back
            # once Redis is.
            restartable_redis.stop()
            redis_down = time.monotonic()
            kubelet.kill(pods[0])
            killed_at = time.monotonic()
            kubelet.restart(pods[0])
            wait_for(
                "the adapter set failing to load",
                lambda: (
                    _condition(fleet_object(cluster), "Degraded").get("reason") == "AdapterFailed"
                ),
            )
            squeezer.pause(0)
            with WorkerClient(addresses[victim]) as client:
                wait_for("the dense plan", lambda: all(client.get_stats(timeout=5).keep_mask))
            restartable_redis.start()
            redis_up = time.monotonic()
            restarted.append((pods[0], killed_at, redis_up))
            recovery.wait("Redis down")
            squeezer.resume()

            # 4. The operator killed in the middle of a tick: it has pushed a
            # plan, and its status write hangs.
            def plan_changed(body: Any) -> bool:
                # On the emulator's loop: its store is read directly.
                (fleet,) = cluster.emulator.stored("elasticfleet.io/v1alpha1/elasticfleets", "ns")
                stored = fleet.get("status", {}).get("lastPlans", [])
                written = body.get("status", {}).get("lastPlans", [])
                return bool(written) and written[-1:] != stored[-1:]

            held = cluster.emulator.inject(Fault(500, *STATUS_WRITE, when=plan_changed, held=True))
            assert held.reached.wait(30), "no tick changed a plan"
            first_operator.kill()
            held.release()
            with OperatorProcess(tmp_path, "operator-2"):
                recovery.wait("a killed operator")
    outcomes = traffic.outcomes

    # Zero budget overruns.
    assert budgets.samples > 100
    assert not budgets.overruns, budgets.overruns[:3]
    plans = fleet_object(cluster)["status"]["lastPlans"]
    assert plans and all(p["predictedBytes"] <= p["budgetBytes"] for p in plans), plans
    # Zero lost or duplicated completions.
    ids = [o.request_id for o in outcomes]
    assert len(ids) == len(set(ids))
    problems = [(o.request_id, o.problem()) for o in outcomes if o.problem()]
    assert not problems, problems[:5]
    completed = [o for o in outcomes if o.code is None]
    assert len(completed) > 50
    # Every client error precise.
    codes = Counter((o.code, o.pod) for o in outcomes if o.code is not None)
    imprecise = []
    for o in outcomes:
        if o.code is None:
            continue
        restart = any(
            pod == o.pod and killed - 1 <= o.ended and o.started <= back + 15
            for pod, killed, back in restarted
        )
        if o.code == grpc.StatusCode.UNAVAILABLE:
            during_outage = o.adapter and redis_down <= o.ended and o.started <= redis_up + 5
            precise = restart or during_outage
        elif o.code == grpc.StatusCode.NOT_FOUND:
            precise = o.adapter and restart and "is not loaded" in o.details
        else:
            precise = o.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        if not precise:
            imprecise.append((o.request_id, o.code, o.details))
    assert not imprecise, imprecise[:5]
    # The worker killed mid-stream failed a stream that had tokens, with UNAVAILABLE.
    assert any(
        o.pod == victim and o.messages and o.code == grpc.StatusCode.UNAVAILABLE for o in outcomes
    ), codes
    # Recovery within the stated number of ticks.
    print(
        f"recovery ticks {recovery.ticks}; {budgets.samples} memory samples; "
        f"{len(completed)} completed, errors {dict(Counter(c.name for c, _ in codes.elements()))}"
    )
    assert all(t <= RECOVERY_TICKS for t in recovery.ticks.values()), recovery.ticks
