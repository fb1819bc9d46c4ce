"""`elasticfleet adapters push | list | pull | delete`, end to end against a real Valkey server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from valkey_server import TestRedisServer, free_port

from elasticfleet.cli import main
from elasticfleet.worker.adapters.format import TENSORS_FILE, AdapterWeights

MakeAdapter = Callable[..., AdapterWeights]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["adapters", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_push_list_pull_delete(
    redis_url: str,
    make_adapter: MakeAdapter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ELASTICFLEET_REDIS_URL", redis_url)
    make_adapter(seed=1).save(tmp_path / "v1")
    make_adapter(seed=2).save(tmp_path / "v2")

    assert run(capsys, "list") == (0, "no adapters\n", "")
    code, out, _ = run(capsys, "push", str(tmp_path / "v1"))
    assert code == 0
    assert out.startswith("pushed demo version 1: 20 parts, ")
    assert out.endswith("(current version: 1)\n")
    assert run(capsys, "push", str(tmp_path / "v2"))[1].startswith("pushed demo version 2")

    code, out, _ = run(capsys, "list")
    header, first, second = out.splitlines()
    assert header.split()[:5] == ["NAME", "VERSION", "CURRENT", "SIZE", "PARTS"]
    assert first.split()[:2] == ["demo", "1"] and "*" not in first
    assert second.split()[:3] == ["demo", "2", "*"]
    assert "tiny-llama" in second and "code,qa,defs +router" in second

    code, out, _ = run(capsys, "pull", "demo", str(tmp_path / "pulled"))
    assert (code, out.split()[:4]) == (0, ["pulled", "demo", "version", "2"])
    pulled = (tmp_path / "pulled" / TENSORS_FILE).read_bytes()
    assert pulled == (tmp_path / "v2" / TENSORS_FILE).read_bytes()
    assert run(capsys, "pull", "demo", "--version", "1", str(tmp_path / "old"))[0] == 0
    old = AdapterWeights.load(tmp_path / "old")
    assert all(torch.equal(t, make_adapter(seed=1).tensors[n]) for n, t in old.tensors.items())

    code, _, err = run(capsys, "delete", "demo", "--version", "2")
    assert code == 2
    assert "version 2 is adapter 'demo''s current version" in err
    assert run(capsys, "delete", "demo", "--version", "1")[1].startswith("deleted demo version 1")
    assert run(capsys, "delete", "demo") == (0, "deleted demo (versions 2)\n", "")
    assert run(capsys, "list")[1] == "no adapters\n"


def test_errors_name_the_problem_and_set_the_exit_code(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "pull", "ghost", str(tmp_path), "--redis-url", redis_url)
    assert (code, err.strip()) == (
        2,
        f"elasticfleet: error: adapter 'ghost' is not in Redis at {redis_url}",
    )
    code, _, err = run(capsys, "push", str(tmp_path), "--redis-url", redis_url)
    assert code == 2 and "adapter.json is missing: not an adapter directory" in err
    down = f"redis://127.0.0.1:{free_port()}/0"
    code, _, err = run(capsys, "list", "--redis-url", down)
    assert code == 75 and f"Redis at {down} is unreachable" in err
    code, _, err = run(capsys, "list", "--redis-url", redis_url, "--tls-ca", "ca.pem")
    assert code == 2 and "TLS options need a rediss:// URL" in err


def test_password_from_flag_or_environment(
    make_adapter: MakeAdapter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = TestRedisServer(password="cli-pw")
    server.start()
    try:
        make_adapter().save(tmp_path / "adapter")
        url = ["--redis-url", server.url]
        assert run(capsys, "push", str(tmp_path / "adapter"), *url, "--password", "cli-pw")[0] == 0
        code, _, err = run(capsys, "list", *url, "--password", "nope")
        assert code == 2 and "refused the credentials" in err
        monkeypatch.setenv("ELASTICFLEET_REDIS_PASSWORD", "cli-pw")
        code, out, _ = run(capsys, "list", *url, "--prefix", "elasticfleet:")
        assert code == 0 and out.splitlines()[1].startswith("demo")
    finally:
        server.close()


def test_tls_flags(
    tls_redis: tuple[str, Path],
    redis_url: str,
    make_adapter: MakeAdapter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, ca = tls_redis
    make_adapter().save(tmp_path / "adapter")
    assert (
        run(capsys, "push", str(tmp_path / "adapter"), "--redis-url", url, "--tls-ca", str(ca))[0]
        == 0
    )
    code, _, err = run(capsys, "list", "--redis-url", url)
    assert code == 2 and "pass the CA that signed it (--tls-ca)" in err
    code, out, _ = run(capsys, "list", "--redis-url", url, "--tls-insecure")
    assert code == 0 and out.splitlines()[1].startswith("demo")
