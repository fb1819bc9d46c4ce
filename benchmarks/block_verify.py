"""What verifying a restored block costs, on SmolLM2-135M-Instruct.

Restoring a dropped block reads its tensors back from model.safetensors and
checks them against the block's digest in the manifest
(worker/model/integrity.py); the engine also checks a plan's restored
blocks before it drops anything (`ElasticLlama.check_restore`). Per block
kind (attention 3.5 MB, FFN 10.6 MB) this measures, for every block of the
model, medians over rounds:

- read, unverified: the tensors read and copied as before verification
  existed (safe_open, get_tensor, a float32 copy): the baseline;
- read, verified: the same read through `read_groups` (copy, then sha256);
- digest: the sha256 of the block's tensors alone, in memory (what the
  verified read adds, without the noise of subtracting two reads);
- pre-check: `check_restore` of a plan restoring just that block (sha256 of
  the mapped file, no copy);
- restore: `apply_plan` restoring that block (verified read, module build,
  oneDNN packing), for scale.

The verification cost of one restore in the engine is digest + pre-check.
Usage:

    .venv/bin/python benchmarks/block_verify.py [--rounds 5] [--out benchmarks/results]

Writes block_verify.json and block_verify.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from elasticfleet.worker.model.integrity import group_digest, group_names, read_groups
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.model.prepare import prepare_model


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def unverified_read(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as source:
        return {name: source.get_tensor(name).to(torch.float32, copy=True) for name in names}


def measure(model: ElasticLlama, rounds: int) -> dict[str, Any]:
    assert model.weights_path is not None and model.digests is not None
    digests, path = model.digests, model.weights_path
    with safe_open(str(path), framework="pt") as source:
        members = group_names(source.keys())
    dense = PruningPlan.dense(model.config.num_hidden_layers)
    samples: dict[str, dict[str, list[float]]] = {}
    for _ in range(rounds):
        for block in range(model.config.num_blocks):
            kind = "attention" if block % 2 == 0 else "FFN"
            times = samples.setdefault(
                kind,
                {"unverified": [], "verified": [], "digest": [], "precheck": [], "restore": []},
            )
            names = members[block]
            tensors = unverified_read(path, names)
            times["digest"].append(timed(partial(group_digest, tensors)))
            without = PruningPlan.without_blocks(model.config.num_hidden_layers, [block])
            times["unverified"].append(timed(partial(unverified_read, path, names)))
            times["verified"].append(timed(partial(read_groups, digests, [block], torch.float32)))
            model.apply_plan(without)
            times["precheck"].append(timed(partial(model.check_restore, dense)))
            times["restore"].append(timed(partial(model.apply_plan, dense)))
    with safe_open(str(path), framework="pt") as source:
        sizes = {
            kind: sum(source.get_tensor(n).nbytes for n in members[first])
            for kind, first in (("attention", 0), ("FFN", 1))
        }
    results: dict[str, Any] = {}
    for kind, times in samples.items():
        ms = {key: 1000 * statistics.median(values) for key, values in times.items()}
        added = ms["digest"] + ms["precheck"]
        results[kind] = {
            "bytes": sizes[kind],
            **{f"{key}_ms": round(value, 3) for key, value in ms.items()},
            "verification_ms": round(added, 3),
            "verification_share_of_restore": round(added / (ms["restore"] + ms["precheck"]), 3),
            "samples": len(times["restore"]),
        }
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Verifying restored blocks",
        "",
        f"command: `{results['command']}`; {results['threads']} torch threads, "
        f"{results['cpus']} CPUs (shared, load average {results['load_average']}); medians "
        "over every block of the model and all rounds",
        "",
        "| block | MB | read, unverified | read, verified | digest | pre-check | restore | "
        "verification per restore | share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("attention", "FFN"):
        r = results["blocks"][kind]
        lines.append(
            f"| {kind} | {r['bytes'] / 1e6:.1f} | {r['unverified_ms']:.2f} ms | "
            f"{r['verified_ms']:.2f} ms | {r['digest_ms']:.2f} ms | {r['precheck_ms']:.2f} ms | "
            f"{r['restore_ms']:.2f} ms | "
            f"{r['verification_ms']:.2f} ms | {100 * r['verification_share_of_restore']:.0f}% |"
        )
    lines += [
        "",
        "verification per restore = digest + pre-check; share = that over restore + pre-check, "
        "what an engine plan switch spends per restored block. Absolute times depend on the "
        "load of the shared cores; the digest runs at sha256 speed (about 2 GB/s here).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    model = ElasticLlama.from_pretrained(prepare_model(progress=False))
    results = {
        "command": f"python benchmarks/block_verify.py --rounds {args.rounds}",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 1),
        "blocks": measure(model, args.rounds),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "block_verify.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "block_verify.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
