"""Pruning policies on SmolLM2 in RAP's ten (batch, sequence) scenarios.

For each scenario and a budget of 80% and 60% of the dense model's
weights + KV there, every policy (none, static, greedy, search, rl) picks a
plan; we report its held-out perplexity (evaluation split of the corpus), its
predicted bytes against the budget, the share of its dropped blocks that are
attention blocks, and its decision latency.

Goals (issue 3): every plan fits; rl perplexity <= greedy's in >= 16 of 20
cells, <= static's in all 20, within 5% of search in every cell; rl p99
decision latency <= 5 ms; and whether the attention share of dropped blocks
rises with batch x sequence (RAP's finding).

Usage: python benchmarks/policies.py [--eval-windows 4] [--search-quality profile]
Writes policies.json, policies.md and policies.png to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from elasticfleet.agent.corpus import build_corpus, token_windows
from elasticfleet.agent.perplexity import PerplexityEvaluator
from elasticfleet.agent.policy import NoFeasiblePlan, Policy, PolicyState, StaticPolicy
from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.agent.quality import ProfileQuality
from elasticfleet.agent.registry import POLICIES, make_policy
from elasticfleet.agent.rl.policy import DEFAULT_AGENT
from elasticfleet.agent.rl.training import RAP_SCENARIOS
from elasticfleet.worker.model.generation import load_tokenizer
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.model.prepare import prepare_model

SCENARIOS = RAP_SCENARIOS
BUDGETS = (0.8, 0.6)


def states(
    profile: ModelProfile, budgets: tuple[float, ...] = BUDGETS, dtype: str | None = None
) -> list[tuple[float, PolicyState]]:
    """The cells: each scenario at each budget fraction of its dense bytes
    (in `dtype`, else the profile's)."""
    result = []
    for fraction in budgets:
        for batch, seq in SCENARIOS:
            dense = predict_memory(profile.config, None, batch, seq, dtype or profile.dtype)
            budget = int(dense.total_bytes * fraction)
            result.append((fraction, PolicyState(budget, batch, seq, profile, dtype=dtype)))
    return result


def offline_static_ratio(profile: ModelProfile, cells: list[PolicyState]) -> float:
    """The smallest ratio (in whole blocks) whose one plan fits every cell:
    the best a load-blind policy can be tuned to offline."""
    blocks = profile.num_blocks
    for count in range(blocks):
        policy = StaticPolicy(count / blocks)
        if all(cell.fits(policy.plan(profile)) for cell in cells):
            return count / blocks
    raise SystemExit("no static ratio fits every cell")


def timed_decision(
    policy: Policy, cell: PolicyState, repeats: int
) -> tuple[Any, list[float], list[float]]:
    """The decision (a plan or the NoFeasiblePlan message), its wall-clock
    latencies and the CPU time of this thread for each, in ms. Wall time is the
    goal; CPU time shows the work when other jobs share the cores."""
    latencies = []
    cpu_times = []
    outcome: Any = None
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.thread_time()
        try:
            outcome = policy.decide(cell)
        except NoFeasiblePlan as error:
            outcome = str(error)
        latencies.append(1000 * (time.perf_counter() - start))
        cpu_times.append(1000 * (time.thread_time() - cpu_start))
    return outcome, latencies, cpu_times


def latency_summary(latencies: list[float]) -> dict[str, float]:
    """p50, p99 and max of decision latencies in ms (raw lists would make the
    results file hundreds of KB)."""
    ordered = sorted(latencies)
    return {
        "p50": round(statistics.median(ordered), 4),
        "p99": round(percentile(ordered, 0.99), 4),
        "max": round(ordered[-1], 4),
        "count": len(ordered),
    }


def percentile(ordered: list[float], share: float) -> float:
    """The `share` quantile of sorted values (nearest rank)."""
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def attention_share(plan: PruningPlan) -> float | None:
    dropped = len(plan.dropped_attention) + len(plan.dropped_ffn)
    return len(plan.dropped_attention) / dropped if dropped else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    profile = ModelProfile.load(args.profile)
    model_dir = prepare_model(progress=False)
    build_corpus(progress=False)
    tokenizer = load_tokenizer(model_dir)
    model = ElasticLlama.from_pretrained(model_dir)
    held_out = PerplexityEvaluator(
        model, token_windows("evaluation", tokenizer, 256, args.eval_windows)
    )
    search_score: Callable[[PruningPlan], float] = ProfileQuality(profile)
    if args.search_quality == "perplexity":
        calibration = token_windows("calibration", tokenizer, 256, args.search_windows)
        search_score = PerplexityEvaluator(model, calibration).evaluate
    cells = states(profile)
    ratio = offline_static_ratio(profile, [cell for _, cell in cells])
    policies: dict[str, Policy] = {
        name: make_policy(
            name,
            static_ratio=ratio,
            score=search_score,
            beam_width=args.beam_width,
            agent_path=args.agent,
        )
        for name in POLICIES
    }
    dense_ppl = held_out.evaluate(PruningPlan.dense(profile.config.num_hidden_layers))
    rows = []
    latencies: dict[str, list[float]] = {name: [] for name in policies}
    cpu_times: dict[str, list[float]] = {name: [] for name in policies}
    for fraction, cell in cells:
        row: dict[str, Any] = {
            "batch": cell.batch_size,
            "seq": cell.seq_len,
            "budget_fraction": fraction,
            "budget_bytes": cell.budget_bytes,
        }
        for name, policy in policies.items():
            repeats = args.latency_repeats if name in ("greedy", "rl", "static", "none") else 1
            outcome, times, cpu = timed_decision(policy, cell, repeats)
            latencies[name] += times
            cpu_times[name] += cpu
            entry: dict[str, Any] = {"latency_ms": latency_summary(times)}
            if isinstance(outcome, PruningPlan):
                entry.update(
                    keep="".join("1" if keep else "0" for keep in outcome.to_mask()),
                    predicted_bytes=cell.predicted_bytes(outcome),
                    fits=cell.fits(outcome),
                    attention_share=attention_share(outcome),
                    perplexity=held_out.evaluate(outcome),
                )
            else:
                entry["no_plan"] = outcome
            row[name] = entry
        rows.append(row)
        print(
            f"b={row['batch']} s={row['seq']} {row['budget_fraction']:.0%}: "
            + ", ".join(f"{n}={row[n].get('perplexity', float('nan')):.2f}" for n in POLICIES),
            flush=True,
        )
    return {
        "dense_perplexity": dense_ppl,
        "static_ratio": ratio,
        "latency_repeats": args.latency_repeats,
        "search_quality": args.search_quality,
        "eval_tokens": held_out.num_tokens,
        "profile_complete": profile.complete,
        "latency_ms": {name: latency_summary(times) for name, times in latencies.items()},
        "cpu_time_ms": {name: latency_summary(times) for name, times in cpu_times.items()},
        "load_average": os.getloadavg(),
        "rows": rows,
        "goals": goals(rows, latencies["rl"], cpu_times["rl"]),
    }


def perplexity_of(row: dict[str, Any], name: str) -> float:
    """Policy `name`'s perplexity in a result row (inf where it had no plan)."""
    return float(row[name].get("perplexity", math.inf))


def _spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        for rank, index in enumerate(order):
            result[index] = float(rank)
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    norm = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / norm if norm else 0.0


def goals(
    rows: list[dict[str, Any]], rl_latencies: list[float], rl_cpu: list[float]
) -> dict[str, Any]:
    plans = [row[n] for row in rows for n in POLICIES if "perplexity" in row[n]]
    shares: dict[str, float] = {}
    for name in ("greedy", "search", "rl"):
        points = [
            (row["batch"] * row["seq"], row[name]["attention_share"])
            for row in rows
            if row[name].get("attention_share") is not None
        ]
        shares[name] = _spearman([float(p[0]) for p in points], [p[1] for p in points])
    return {
        "all_plans_fit": all(p["fits"] for p in plans),
        "rl_le_greedy_cells": sum(
            perplexity_of(r, "rl") <= perplexity_of(r, "greedy") for r in rows
        ),
        "rl_le_static_cells": sum(
            perplexity_of(r, "rl") <= perplexity_of(r, "static") for r in rows
        ),
        "rl_within_5pct_of_search_cells": sum(
            perplexity_of(r, "rl") <= 1.05 * perplexity_of(r, "search") for r in rows
        ),
        "rl_latency_p99_ms": percentile(sorted(rl_latencies), 0.99),
        "rl_cpu_time_p99_ms": percentile(sorted(rl_cpu), 0.99),
        "attention_share_vs_load_spearman": shares,
    }


def markdown(results: dict[str, Any]) -> str:
    g = results["goals"]
    lines = [
        "# Pruning policies on SmolLM2-135M",
        "",
        f"Held-out perplexity on {results['eval_tokens']} evaluation tokens (dense "
        f"{results['dense_perplexity']:.2f}); static ratio chosen offline "
        f"{results['static_ratio']:.1%}; search scored by {results['search_quality']}; "
        f"profile complete: {results['profile_complete']}.",
        "",
        "| batch x seq | budget | " + " | ".join(POLICIES) + " | attention share (rl) |",
        "|---|---|" + "---|" * (len(POLICIES) + 1),
    ]
    for row in results["rows"]:
        cells = []
        for name in POLICIES:
            entry = row[name]
            cells.append(f"{entry['perplexity']:.2f}" if "perplexity" in entry else "no plan")
        share = row["rl"].get("attention_share")
        lines.append(
            f"| {row['batch']} x {row['seq']} | {row['budget_fraction']:.0%} | "
            + " | ".join(cells)
            + f" | {'-' if share is None else f'{share:.2f}'} |"
        )
    lines += [
        "",
        "| goal | measured |",
        "|---|---|",
        f"| every plan fits | {g['all_plans_fit']} |",
        f"| rl <= greedy in >= 16/20 cells | {g['rl_le_greedy_cells']}/20 |",
        f"| rl <= static in 20/20 cells | {g['rl_le_static_cells']}/20 |",
        f"| rl within 5% of search in 20/20 | {g['rl_within_5pct_of_search_cells']}/20 |",
        f"| rl p99 decision latency <= 5 ms | {g['rl_latency_p99_ms']:.2f} ms "
        f"(CPU time p99 {g['rl_cpu_time_p99_ms']:.2f} ms) |",
        "| attention share rises with batch x seq (Spearman) | "
        + ", ".join(f"{k} {v:+.2f}" for k, v in g["attention_share_vs_load_spearman"].items())
        + " |",
        "",
        "Decision latency over all cells in ms, wall clock and this thread's CPU time "
        f"(search decides once per cell, the others {results['latency_repeats']} times; "
        "load average during the run "
        + ", ".join(f"{x:.1f}" for x in results["load_average"])
        + f" on {os.cpu_count()} CPUs):",
        "",
        "| policy | wall p50 | wall p99 | wall max | CPU p50 | CPU p99 | CPU max |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, wall in results["latency_ms"].items():
        cpu = results["cpu_time_ms"][name]
        cells = [wall["p50"], wall["p99"], wall["max"], cpu["p50"], cpu["p99"], cpu["max"]]
        lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in cells) + " |")
    lines.append("")
    return "\n".join(lines)


def heatmap(results: dict[str, Any], path: Path) -> None:
    rows = results["rows"]
    dense = results["dense_perplexity"]
    values = [[perplexity_of(row, name) / dense for name in POLICIES] for row in rows]
    shown = [[min(v, 10.0) for v in line] for line in values]
    figure, axis = plt.subplots(figsize=(7, 9))
    image = axis.imshow(shown, cmap="viridis_r", aspect="auto")
    axis.set_xticks(range(len(POLICIES)), POLICIES)
    labels = [f"{r['batch']}x{r['seq']} @{r['budget_fraction']:.0%}" for r in rows]
    axis.set_yticks(range(len(rows)), labels)
    for i, line in enumerate(values):
        for j, value in enumerate(line):
            text = "-" if math.isinf(value) else f"{value:.2f}"
            axis.text(j, i, text, ha="center", va="center", fontsize=7, color="white")
    figure.colorbar(image, label="held-out perplexity / dense (capped at 10)")
    axis.set_title("Pruning policies: perplexity ratio to the dense model")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def dump(results: dict[str, Any]) -> str:
    """Indented JSON with one line per row, so the file stays small and diffable."""
    rows = ",\n".join("    " + json.dumps(row) for row in results["rows"])
    rest = json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=2)
    return rest[:-2] + ',\n  "rows": [\n' + rows + "\n  ]\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    parser.add_argument("--agent", type=Path, default=DEFAULT_AGENT)
    parser.add_argument("--eval-windows", type=int, default=4, help="held-out windows of 256")
    parser.add_argument(
        "--search-quality",
        choices=["profile", "perplexity"],
        default="profile",
        help="score search plans by the profile estimate (minutes) or perplexity (hours)",
    )
    parser.add_argument("--search-windows", type=int, default=1)
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--latency-repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "policies.json").write_text(dump(results))
    (args.out / "policies.md").write_text(markdown(results))
    heatmap(results, args.out / "policies.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
