"""Speed of the elastic model, measured against Hugging Face transformers.

Three measurements, one run, same weights and threads:
1. greedy generation of 64 new tokens at batch 1 and 8: our TextGenerator vs
   transformers' LlamaForCausalLM.generate (goal: ours >= 1.2x theirs);
2. decode tokens/s under plans keeping about 75% and 50% of the dense decode
   FLOPs, against the ideal speed-up the FLOPs ratio promises (goal: >= 0.9x);
3. plan switching: p50 time to drop a quarter of the blocks (goal <= 20 ms)
   and to restore them (goal <= 200 ms).

Usage: python benchmarks/model_speed.py [--repeats N] [--out benchmarks/results]
Writes model_speed.json and model_speed.md. Runs alternate between the two
implementations and report medians, because these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from chat_workload import QUESTIONS, hf_greedy
from transformers import LlamaForCausalLM

from elasticfleet.worker.model.generation import (
    SamplingParams,
    TextGenerator,
    chat_prompt,
    load_tokenizer,
)
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.memory import decode_flops
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.model.prepare import prepare_model

NEW_TOKENS = 64
# Deep-first drops that keep about 75% and 50% of the dense decode FLOPs.
PRUNED_PLANS = {
    "75%": {"attention": [21, 23, 25, 27], "ffn": [18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28]},
    "50%": {
        "attention": [10, 12, 14, 16, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29],
        "ffn": list(range(8, 29)),
    },
}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ours_generate(generator: TextGenerator, prompts: list[list[int]]) -> Callable[[], object]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return lambda: generator.generate_ids(prompts, params)


def hf_generate(model: LlamaForCausalLM, prompts: list[list[int]]) -> Callable[[], object]:
    return lambda: hf_greedy(model, prompts, NEW_TOKENS)


def versus_transformers(
    model_dir: Path, generator: TextGenerator, prompts: list[list[int]], repeats: int
) -> list[dict[str, Any]]:
    hf = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)  # in eval mode
    rows = []
    for batch in (1, 8):
        batch_prompts = prompts[:batch]
        ours, theirs = [], []
        for _ in range(repeats):
            ours.append(timed(ours_generate(generator, batch_prompts)))
            theirs.append(timed(hf_generate(hf, batch_prompts)))
        tokens = batch * NEW_TOKENS
        ours_tps = tokens / statistics.median(ours)
        hf_tps = tokens / statistics.median(theirs)
        rows.append(
            {
                "batch": batch,
                "ours_tokens_per_s": ours_tps,
                "transformers_tokens_per_s": hf_tps,
                "ratio": ours_tps / hf_tps,
                "goal": 1.2,
            }
        )
        print(rows[-1], flush=True)
    return rows


def decode_rate(generator: TextGenerator, prompts: list[list[int]], repeats: int) -> float:
    """Decode-only tokens/s at batch 8: total minus a prefill-only run."""
    full = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    first = SamplingParams(max_new_tokens=1, ignore_eos=True)
    rates = []
    for _ in range(repeats):
        total = timed(lambda: generator.generate_ids(prompts, full))
        prefill = timed(lambda: generator.generate_ids(prompts, first))
        rates.append(len(prompts) * (NEW_TOKENS - 1) / (total - prefill))
    return statistics.median(rates)


def pruned_speed(
    generator: TextGenerator, prompts: list[list[int]], repeats: int
) -> list[dict[str, Any]]:
    model = generator.model
    config = model.config
    context = max(len(p) for p in prompts) + NEW_TOKENS // 2
    dense_plan = PruningPlan.dense(config.num_hidden_layers)
    model.apply_plan(dense_plan)
    dense_rate = decode_rate(generator, prompts, repeats)
    rows = []
    for name, drops in PRUNED_PLANS.items():
        plan = PruningPlan.from_dropped(config.num_hidden_layers, **drops)
        flops_ratio = decode_flops(config, plan, context) / decode_flops(config, None, context)
        model.apply_plan(plan)
        rate = decode_rate(generator, prompts, repeats)
        speedup = rate / dense_rate
        rows.append(
            {
                "plan": name,
                "blocks_kept": plan.kept_blocks,
                "flops_ratio": flops_ratio,
                "dense_tokens_per_s": dense_rate,
                "tokens_per_s": rate,
                "speedup": speedup,
                "ideal_speedup": 1 / flops_ratio,
                "fraction_of_ideal": speedup * flops_ratio,
                "goal": 0.9,
            }
        )
        print(rows[-1], flush=True)
    model.apply_plan(dense_plan)
    return rows


def plan_switching(model: ElasticLlama, repeats: int) -> dict[str, Any]:
    layers = model.config.num_hidden_layers
    dense = PruningPlan.dense(layers)
    # The deepest quarter of the 2L blocks, in forward order.
    blocks = 2 * layers
    plan = PruningPlan.from_mask([i < blocks - blocks // 4 for i in range(blocks)])
    model.apply_plan(dense)
    drop_ms, restore_ms = [], []
    for _ in range(repeats):
        drop_ms.append(1000 * timed(lambda: model.apply_plan(plan)))
        restore_ms.append(1000 * timed(lambda: model.apply_plan(dense)))
    result = {
        "blocks_dropped": 2 * layers - plan.kept_blocks,
        "drop_p50_ms": statistics.median(drop_ms),
        "restore_p50_ms": statistics.median(restore_ms),
        "drop_goal_ms": 20,
        "restore_goal_ms": 200,
    }
    print(result, flush=True)
    return result


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Model speed",
        "",
        f"torch threads: {results['threads']}; command: `python benchmarks/model_speed.py`",
        "",
        "## Greedy generation, 64 new tokens: elasticfleet vs transformers",
        "",
        "| batch | ours tok/s | transformers tok/s | ratio | goal |",
        "|---|---|---|---|---|",
    ]
    for r in results["versus_transformers"]:
        lines.append(
            f"| {r['batch']} | {r['ours_tokens_per_s']:.1f} | "
            f"{r['transformers_tokens_per_s']:.1f} | {r['ratio']:.2f}x | >= {r['goal']}x |"
        )
    lines += [
        "",
        "## Pruned decode speed (batch 8)",
        "",
        "| plan | blocks kept | FLOPs ratio | tok/s | dense tok/s | speed-up | ideal | "
        "fraction of ideal | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["pruned"]:
        lines.append(
            f"| {r['plan']} | {r['blocks_kept']}/60 | {r['flops_ratio']:.3f} | "
            f"{r['tokens_per_s']:.1f} | {r['dense_tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['ideal_speedup']:.2f}x | {r['fraction_of_ideal']:.2f} | >= {r['goal']} |"
        )
    s = results["plan_switching"]
    lines += [
        "",
        "## Plan switching",
        "",
        "| blocks dropped | drop p50 | restore p50 | goals |",
        "|---|---|---|---|",
        f"| {s['blocks_dropped']} | {s['drop_p50_ms']:.2f} ms | {s['restore_p50_ms']:.1f} ms | "
        f"<= {s['drop_goal_ms']} ms, <= {s['restore_goal_ms']} ms |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--switch-repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    model_dir = prepare_model(progress=False)
    model = ElasticLlama.from_pretrained(model_dir)
    generator = TextGenerator(model, load_tokenizer(model_dir))
    prompts = [generator.encode(chat_prompt(q)) for q in QUESTIONS[:8]]
    results: dict[str, Any] = {"threads": torch.get_num_threads()}
    results["versus_transformers"] = versus_transformers(
        model_dir, generator, prompts, args.repeats
    )
    results["pruned"] = pruned_speed(generator, prompts, args.repeats)
    results["plan_switching"] = plan_switching(model, args.switch_repeats)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "model_speed.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
