"""The precision ladder on SmolLM2 in RAP's ten (batch, sequence) scenarios.

Budgets of 80%, 60% and 40% of the dense bf16 model's weights + KV in each
scenario. Each policy picks a plan on the ladder (full, int8, int4, dropped
per block, full or int8 per KV cache) and we report the plan's held-out
perplexity, served in bf16, against the pruning-only rl agent (the
baseline: the same DQN trained for keep/drop only) in the same run; the
plans' predicted bytes against the budget; decision latency; and decode
tokens/s at batch 1 of the plans against dense bf16, with the bytes each
token reads and the machine's measured read bandwidth (decoding at small
batch is bound by reading the weights).

Goals (issue 14): every plan fits; precision-aware rl perplexity <= 1.05x dense
at 80% and <= 1.15x at 60% in every cell, and at 40% below what pruning-only
rl reaches at 60%; rl within 5% of search in every cell; rl decision p99
within 5 ms of CPU time; an int8 plan decodes at batch 1 >= 1.5x faster than full
bf16; bf16 dense perplexity within 1% of fp32.

Usage: python benchmarks/precision.py [--eval-windows 4] [--decode-repeats 3]
Writes precision.json, precision.md and precision.png to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from chat_workload import QUESTIONS
from model_speed import decode_rate
from policies import dump, latency_summary, perplexity_of, timed_decision
from policies import states as policy_states
from worker_speed import read_bandwidth

from elasticfleet.agent.corpus import build_corpus, token_windows
from elasticfleet.agent.perplexity import PerplexityEvaluator
from elasticfleet.agent.policy import (
    GreedyPolicy,
    Policy,
    PolicyState,
    SearchPolicy,
    StaticPolicy,
)
from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.agent.quality import ProfileQuality
from elasticfleet.agent.registry import make_policy
from elasticfleet.agent.rl.policy import PRUNING_AGENT
from elasticfleet.agent.rl.training import RAP_SCENARIOS
from elasticfleet.worker.model.generation import TextGenerator, chat_prompt, load_tokenizer
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import INT4, INT8, PruningPlan
from elasticfleet.worker.model.prepare import prepare_model

BUDGETS = (0.8, 0.6, 0.4)
DTYPE = "bfloat16"
BASELINE = "rl (pruning only)"
LADDER = ("rl", "static", "greedy", "search")
POLICIES = (BASELINE, *LADDER)
REPEATED = (BASELINE, "rl", "greedy", "static")  # timed many times; search once per cell


def offline_static(profile: ModelProfile, states: list[PolicyState]) -> StaticPolicy:
    """The load-blind ladder tuned offline: int8 everywhere (else int4) with
    the fewest dropped blocks whose one plan fits every cell."""
    blocks = profile.num_blocks
    for precision in (INT8, INT4):
        for count in range(blocks):
            policy = StaticPolicy(count / blocks, precision)
            if all(state.fits(policy.plan(profile)) for state in states):
                return policy
    raise SystemExit("no static ladder fits every cell")


def decode_speeds(
    model: ElasticLlama, tokenizer: Any, plans: dict[str, PruningPlan], repeats: int
) -> list[dict[str, Any]]:
    """Decode tokens/s at batch 1 under each plan, the bytes a token reads
    (the plan's weights and a short KV) and the bandwidth that achieves."""
    generator = TextGenerator(model, tokenizer)
    prompt = tokenizer.encode(chat_prompt(QUESTIONS[0]), add_special_tokens=False).ids
    bandwidth = read_bandwidth() / 1e9
    rows = []
    dense_rate = 0.0
    for name, plan in plans.items():
        model.apply_plan(plan)
        rate = decode_rate(generator, [prompt], repeats)
        dense_rate = dense_rate or rate
        bytes_per_token = predict_memory(model.config, plan, 1, len(prompt) + 32, DTYPE)
        achieved = bytes_per_token.total_bytes * rate / 1e9
        rows.append(
            {
                "plan": name,
                "levels": plan.level_counts(),
                "tokens_per_s": rate,
                "speedup_vs_dense_bf16": rate / dense_rate,
                "bytes_per_token": bytes_per_token.total_bytes,
                "achieved_gb_s": achieved,
                "read_bandwidth_gb_s": bandwidth,
                "share_of_bandwidth": achieved / bandwidth,
            }
        )
        print(rows[-1], flush=True)
    model.apply_plan(PruningPlan.dense(model.config.num_hidden_layers))
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    profile = ModelProfile.load(args.profile)
    if INT8 not in profile.level_costs:
        raise SystemExit(f"{args.profile} has no level costs: run `elasticfleet agent levels`")
    model_dir = prepare_model(progress=False)
    build_corpus(progress=False)
    tokenizer = load_tokenizer(model_dir)
    tokens = token_windows("evaluation", tokenizer, 256, args.eval_windows)
    layers = profile.config.num_hidden_layers
    fp32 = ElasticLlama.from_pretrained(model_dir)
    fp32_ppl = PerplexityEvaluator(fp32, tokens).evaluate(PruningPlan.dense(layers))
    del fp32
    model = ElasticLlama.from_pretrained(model_dir, dtype=torch.bfloat16)
    held_out = PerplexityEvaluator(model, tokens)
    dense_ppl = held_out.evaluate(PruningPlan.dense(layers))
    states = policy_states(profile, BUDGETS, DTYPE)
    static = offline_static(profile, [state for _, state in states])
    policies: dict[str, Policy] = {
        BASELINE: make_policy("rl", agent_path=PRUNING_AGENT),
        "rl": make_policy("rl"),
        "static": static,
        "greedy": GreedyPolicy(),
        "search": SearchPolicy(ProfileQuality(profile), beam_width=args.beam_width),
    }
    rows = []
    wall: dict[str, list[float]] = {name: [] for name in policies}
    cpu: dict[str, list[float]] = {name: [] for name in policies}
    for fraction, state in states:
        row: dict[str, Any] = {
            "batch": state.batch_size,
            "seq": state.seq_len,
            "budget_fraction": fraction,
            "budget_bytes": state.budget_bytes,
        }
        for name, policy in policies.items():
            repeats = args.latency_repeats if name in REPEATED else 1
            outcome, times, cpu_times = timed_decision(policy, state, repeats)
            wall[name] += times
            cpu[name] += cpu_times
            entry: dict[str, Any] = {"latency_ms": latency_summary(times)}
            if isinstance(outcome, PruningPlan):
                entry.update(
                    levels=outcome.levels(),
                    counts=outcome.level_counts(),
                    predicted_bytes=state.predicted_bytes(outcome),
                    fits=state.fits(outcome),
                    perplexity=held_out.evaluate(outcome),
                )
            else:
                entry["no_plan"] = outcome
            row[name] = entry
        rows.append(row)
        print(
            f"b={row['batch']} s={row['seq']} {fraction:.0%}: "
            + ", ".join(f"{n}={perplexity_of(row, n):.2f}" for n in policies),
            flush=True,
        )
    model.apply_plan(PruningPlan.dense(layers))
    plans = {"dense bf16": PruningPlan.dense(layers)}
    plans["all int8"] = PruningPlan.from_levels([INT8] * 2 * layers)
    plans["all int4"] = PruningPlan.from_levels([INT4] * 2 * layers)
    for fraction, state in states:
        if (state.batch_size, state.seq_len) == RAP_SCENARIOS[0]:
            plans[f"rl {fraction:.0%} @1x4096"] = policies["rl"].decide(state)
    decode = decode_speeds(model, tokenizer, plans, args.decode_repeats)
    results = {
        "dtype": DTYPE,
        "fp32_dense_perplexity": fp32_ppl,
        "dense_perplexity": dense_ppl,
        "eval_tokens": held_out.num_tokens,
        "static": {"ratio": static.ratio, "precision": static.precision},
        "latency_repeats": args.latency_repeats,
        "latency_ms": {name: latency_summary(times) for name, times in wall.items()},
        "cpu_time_ms": {name: latency_summary(times) for name, times in cpu.items()},
        "kernels": model.kernels.describe().splitlines(),
        "load_average": os.getloadavg(),
        "decode": decode,
        "rows": rows,
    }
    results["goals"] = goals(results)
    return results


def goals(results: dict[str, Any]) -> dict[str, Any]:
    rows, dense = results["rows"], results["dense_perplexity"]
    best = "rl"  # the precision-aware serving policy the goals are for
    by_scenario = {(r["batch"], r["seq"], r["budget_fraction"]): r for r in rows}
    plans = [row[n] for row in rows for n in POLICIES if "perplexity" in row[n]]
    int8 = next(d for d in results["decode"] if d["plan"] == "all int8")
    return {
        "policy": best,
        "all_plans_fit": all(p["fits"] for p in plans),
        "le_1.05x_dense_at_80pct": sum(
            perplexity_of(r, best) <= 1.05 * dense for r in rows if r["budget_fraction"] == 0.8
        ),
        "le_1.15x_dense_at_60pct": sum(
            perplexity_of(r, best) <= 1.15 * dense for r in rows if r["budget_fraction"] == 0.6
        ),
        "at_40pct_below_baseline_at_60pct": sum(
            perplexity_of(r, best)
            < perplexity_of(by_scenario[(r["batch"], r["seq"], 0.6)], BASELINE)
            for r in rows
            if r["budget_fraction"] == 0.4
        ),
        "within_5pct_of_search": sum(
            perplexity_of(r, best) <= 1.05 * perplexity_of(r, "search") for r in rows
        ),
        "cells": len(rows),
        "cells_per_budget": len(RAP_SCENARIOS),
        "cpu_time_p99_ms": results["cpu_time_ms"][best]["p99"],
        "int8_decode_speedup_vs_bf16": int8["speedup_vs_dense_bf16"],
        "bf16_vs_fp32_perplexity": dense / results["fp32_dense_perplexity"],
    }


def _cell(entry: dict[str, Any], dense: float) -> str:
    if "perplexity" not in entry:
        return "no plan"
    c = entry["counts"]
    blocks = f"{c[INT8]}/{c[INT4]}/{c['dropped']}/{c['kv_int8']}"
    return f"{entry['perplexity'] / dense:.3f}x ({blocks})"


def markdown(results: dict[str, Any]) -> str:
    g, dense = results["goals"], results["dense_perplexity"]
    per = g["cells_per_budget"]
    lines = [
        "# The precision ladder on SmolLM2-135M (bf16)",
        "",
        f"Held-out perplexity on {results['eval_tokens']} evaluation tokens, served in bf16 "
        f"(dense {dense:.3f}; fp32 dense {results['fp32_dense_perplexity']:.3f}). Each cell: "
        "perplexity over dense bf16, and the plan's blocks at int8 / int4 / dropped, then its "
        "KV caches at int8. Static: "
        f"{results['static']['ratio']:.1%} dropped, the rest {results['static']['precision']}, "
        "tuned offline to fit every cell. Search: beam over ladder steps scored by the profile "
        "estimate. rl (pruning only) is the same DQN trained for keep/drop alone.",
        "",
        "| batch x seq | budget | " + " | ".join(POLICIES) + " |",
        "|---|---|" + "---|" * len(POLICIES),
    ]
    for row in results["rows"]:
        cells = [_cell(row[name], dense) for name in POLICIES]
        lines.append(
            f"| {row['batch']} x {row['seq']} | {row['budget_fraction']:.0%} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        f"| goal ({g['policy']}) | measured |",
        "|---|---|",
        f"| every plan fits | {g['all_plans_fit']} |",
        f"| <= 1.05x dense at 80% in every cell | {g['le_1.05x_dense_at_80pct']}/{per} |",
        f"| <= 1.15x dense at 60% in every cell | {g['le_1.15x_dense_at_60pct']}/{per} |",
        f"| at 40% below pruning-only rl at 60% | {g['at_40pct_below_baseline_at_60pct']}/{per} |",
        f"| within 5% of search | {g['within_5pct_of_search']}/{g['cells']} |",
        f"| decision CPU time p99 <= 5 ms | {g['cpu_time_p99_ms']:.2f} ms |",
        f"| int8 decodes >= 1.5x full bf16 (batch 1) | {g['int8_decode_speedup_vs_bf16']:.2f}x |",
        f"| bf16 dense perplexity within 1% of fp32 | {g['bf16_vs_fp32_perplexity']:.4f}x |",
        "",
        "Decode at batch 1 (64 new tokens, median of runs), bytes read per token and the share "
        "of the machine's read bandwidth (a sum over 256 MB) that achieves:",
        "",
        "| plan | int8/int4/dropped | tokens/s | vs dense bf16 | MB/token | GB/s | of bandwidth |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in results["decode"]:
        c = d["levels"]
        lines.append(
            f"| {d['plan']} | {c[INT8]}/{c[INT4]}/{c['dropped']} | {d['tokens_per_s']:.1f} | "
            f"{d['speedup_vs_dense_bf16']:.2f}x | {d['bytes_per_token'] / 1e6:.1f} | "
            f"{d['achieved_gb_s']:.2f} | {d['share_of_bandwidth']:.0%} of "
            f"{d['read_bandwidth_gb_s']:.1f} |"
        )
    lines += [
        "",
        "Decision latency in ms over all cells, wall clock and this thread's CPU time (load "
        "average during the run "
        + ", ".join(f"{x:.1f}" for x in results["load_average"])
        + f" on {os.cpu_count()} CPUs):",
        "",
        "| policy | wall p50 | wall p99 | CPU p50 | CPU p99 |",
        "|---|---|---|---|---|",
    ]
    for name, w in results["latency_ms"].items():
        c = results["cpu_time_ms"][name]
        lines.append(
            f"| {name} | {w['p50']:.3f} | {w['p99']:.3f} | {c['p50']:.3f} | {c['p99']:.3f} |"
        )
    lines += ["", "Kernels chosen at load (bf16, batch-1 timings):", ""]
    lines += [f"- {line}" for line in results["kernels"]]
    lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Perplexity over dense per cell, by budget, for each policy."""
    dense = results["dense_perplexity"]
    figure, axes = plt.subplots(1, len(BUDGETS), figsize=(13, 4), sharey=True)
    width = 0.8 / len(POLICIES)
    for axis, fraction in zip(axes, BUDGETS, strict=True):
        rows = [r for r in results["rows"] if r["budget_fraction"] == fraction]
        labels = [f"{r['batch']}x{r['seq']}" for r in rows]
        for offset, name in enumerate(POLICIES):
            values = [min(perplexity_of(r, name) / dense, 20.0) for r in rows]
            xs = [i + width * (offset - (len(POLICIES) - 1) / 2) for i in range(len(rows))]
            axis.bar(xs, values, width=width, label=name)
        axis.set_yscale("log")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(rows)), labels, rotation=60, fontsize=7)
        axis.set_title(f"budget {fraction:.0%} of dense bf16")
    axes[0].set_ylabel("held-out perplexity / dense (capped at 20)")
    # Below the panels: inside one it would cover the 40% bars.
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=len(POLICIES), fontsize=8)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    parser.add_argument("--eval-windows", type=int, default=4, help="held-out windows of 256")
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument("--decode-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(dump(results))
    (args.out / "precision.md").write_text(markdown(results))
    plot(results, args.out / "precision.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
