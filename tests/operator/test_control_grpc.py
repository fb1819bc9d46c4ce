"""The control loop through real gRPC: the project's asyncio client against
gRPC servers on 127.0.0.1 that answer like fake workers, so the loop's
connection interface, deadlines and error handling are checked against the
real transport, not only against fakes."""

from __future__ import annotations

import asyncio
import socket

import grpc
import grpc.aio
from fake_fleet import GIB, FakeWorker, RecordingSink, fake_worker_service

from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.operator.control import (
    FleetController,
    LoopSettings,
    WorkerEndpoint,
    plaintext_connect,
)
from elasticfleet.operator.spec import FleetSpec

PROFILE = ModelProfile.load(DEFAULT_PROFILE)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens on it once the socket is closed


class NoSleep:
    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def test_tick_over_real_grpc() -> None:
    spec = FleetSpec.parse(
        "fleet",
        "ns",
        {
            "model": {"name": "SmolLM2-135M-Instruct"},
            "worker": {"image": "img"},
            "memoryPolicy": {"policy": "greedy", "budget": {"fraction": 0.5}},
        },
    )
    squeezed = FakeWorker(PROFILE, others_bytes=int(3.2 * GIB))

    async def run() -> None:
        server = grpc.aio.server(handlers=[fake_worker_service(squeezed)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        sink = RecordingSink()
        sleep = NoSleep()
        settings = LoopSettings(stats_timeout_s=2.0, attempts=2)
        controller = FleetController(
            spec, PROFILE, plaintext_connect, settings=settings, sleep=sleep
        )
        endpoints = [
            WorkerEndpoint("up", f"127.0.0.1:{port}"),
            WorkerEndpoint("gone", f"127.0.0.1:{_closed_port()}"),
        ]
        try:
            report = await controller.tick(endpoints, sink)
        finally:
            await controller.close()
            await server.stop(None)
        up, gone = report.outcomes
        assert up.changed and squeezed.applied and up.status.plan is not None
        assert up.status.plan.id == squeezed.plan_id
        assert gone.error_reason == "WorkerUnreachable" and "UNAVAILABLE" in gone.error
        assert sleep.sleeps == [0.5]  # one retry of the unreachable worker's GetStats
        assert [e.reason for e in sink.events] == ["PlanChanged", "WorkerUnreachable"]

    asyncio.run(asyncio.wait_for(run(), 20))
