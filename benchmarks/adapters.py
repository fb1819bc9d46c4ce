"""AsymLoRA quality and mixed-task inference speed on SmolLM2-135M-Instruct.

Quality: the same step budget, data and seed for four layouts over three
tasks from the offline corpus (code, qa, definitions): AsymLoRA (one A,
three B heads, rank 8), one shared LoRA with as many trainable parameters,
three separate rank-8 LoRAs, and the HydraLoRA router. Held-out perplexity
per task. Goals: AsymLoRA beats the shared LoRA on average and comes within
2% of the separate LoRAs.

Speed: a batch of 12 rows, 4 per task, each row on its own task's adapter,
greedy decoding with a KV cache: elasticfleet's AsymLoRA against peft's
mixed-adapter batches (three ordinary LoRA adapters, `adapter_names`) on the
same weights, and against the base model with no adapter. Goals: at least
1.3x peft's throughput, at most 25% overhead over the base model. Before
timing, both are checked to compute the same logits.

    .venv/bin/python benchmarks/adapters.py            # both parts
    .venv/bin/python benchmarks/adapters.py --part speed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from elasticfleet.agent.tasks import corpus_tasks
from elasticfleet.worker.adapters.format import AdapterSpec
from elasticfleet.worker.adapters.layer import (
    AdapterBatch,
    AdapterChoice,
    AdapterSet,
    tensor_prefix,
)
from elasticfleet.worker.adapters.names import ALL_MODULES
from elasticfleet.worker.adapters.training import (
    LAYOUTS,
    AdapterTrainingConfig,
    TaskData,
    evaluate,
    train_adapters,
)
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.prepare import MODEL_NAME, prepare_model

TASKS = ("code", "qa", "definitions")
RESULTS = Path(__file__).parent / "results"


# -- quality ------------------------------------------------------------------


def task_data(model_dir: Path, window: int, train: int, held_out: int) -> list[TaskData]:
    return corpus_tasks(model_dir, TASKS, window, train, held_out)


def quality(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    data = task_data(model_dir, args.window, args.train_windows, args.eval_windows)
    model = ElasticLlama.from_pretrained(model_dir, packed=False)
    rows: dict[str, Any] = {
        "base": {
            "perplexity": evaluate(model, data, {}, dict.fromkeys(TASKS)),
            "parameters": 0,
        }
    }
    for layout in LAYOUTS:
        config = AdapterTrainingConfig(
            layout=layout,
            rank=8,
            alpha=16.0,
            steps=args.steps,
            windows_per_task=args.windows_per_task,
            learning_rate=args.learning_rate,
            seed=args.seed,
        )
        result = train_adapters(model, data, config, base_model=MODEL_NAME)
        rows[layout] = {
            "perplexity": result.eval_perplexity,
            "parameters": result.trainable_parameters,
            "seconds": result.seconds,
            "losses": result.losses,
        }
        print(layout, rows[layout]["perplexity"], flush=True)
    for row in rows.values():
        row["mean_perplexity"] = statistics.fmean(row["perplexity"].values())
    asym, shared, separate = rows["asym"], rows["shared"], rows["separate"]
    return {
        "steps": args.steps,
        "tokens_per_step": len(TASKS) * args.windows_per_task * args.window,
        "eval_tokens_per_task": args.eval_windows * args.window,
        "layouts": rows,
        "goals": {
            "asym_beats_shared": asym["mean_perplexity"] < shared["mean_perplexity"],
            "asym_vs_separate": asym["mean_perplexity"] / separate["mean_perplexity"],
            "asym_within_2pct_of_separate": asym["mean_perplexity"]
            <= 1.02 * separate["mean_perplexity"],
            "asym_params_vs_separate": asym["parameters"] / separate["parameters"],
        },
    }


# -- speed --------------------------------------------------------------------


def random_asym(model: ElasticLlama, seed: int) -> AdapterSet:
    """A rank-8 three-task set with random (nonzero) heads."""
    spec = AdapterSpec(
        "bench", MODEL_NAME, model.config.num_hidden_layers, 8, 16.0, ALL_MODULES, TASKS
    )
    adapters = AdapterSet.create(spec, model.config, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for name, param in adapters.named_parameters():
        if name.endswith(".B"):
            param.data = torch.randn(param.shape, generator=generator) * 0.01
    return adapters.requires_grad_(False)


def peft_twin(hf: LlamaForCausalLM, adapters: AdapterSet) -> PeftModel:
    """peft with one ordinary LoRA adapter per task, each holding our shared A
    and that task's B, so both compute the same function."""
    spec = adapters.spec
    assert spec.alpha == int(spec.alpha), "peft takes an integer lora_alpha"
    config = LoraConfig(r=spec.rank, lora_alpha=int(spec.alpha), target_modules=list(spec.modules))
    peft: PeftModel = get_peft_model(hf, config, adapter_name=spec.tasks[0])
    for task in spec.tasks[1:]:
        peft.add_adapter(task, config)
    weights = adapters.weights().tensors
    for name, module in peft.named_modules():
        if not hasattr(module, "lora_A") or "layers." not in name:
            continue
        layer = int(name.split("layers.")[1].split(".")[0])
        prefix = tensor_prefix(layer, name.rsplit(".", 1)[1])
        for task in spec.tasks:
            module.lora_A[task].weight.data = weights[f"{prefix}.A"].clone()
            module.lora_B[task].weight.data = weights[f"{prefix}.B.{task}"].clone()
    return peft.eval()


def ours_decode(
    model: ElasticLlama, prompts: torch.Tensor, batch: AdapterBatch | None, steps: int
) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            cache = model.new_cache(len(prompts), prompts.shape[1] + steps)
            logits = model(prompts, cache, last_only=True, adapters=batch)
            token = logits[:, -1].argmax(-1, keepdim=True)
            out = [token]
            for _ in range(steps - 1):
                token = model(token, cache, adapters=batch)[:, -1].argmax(-1, keepdim=True)
                out.append(token)
        return torch.cat(out, 1)

    return run


def peft_decode(
    peft: PeftModel, prompts: torch.Tensor, names: Sequence[str], steps: int
) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            result = peft(input_ids=prompts, use_cache=True, adapter_names=list(names))
            cache = result.cache
            token = result.logits[:, -1].argmax(-1, keepdim=True)
            out = [token]
            for _ in range(steps - 1):
                result = peft(
                    input_ids=token, cache=cache, use_cache=True, adapter_names=list(names)
                )
                cache = result.cache
                token = result.logits[:, -1].argmax(-1, keepdim=True)
                out.append(token)
        return torch.cat(out, 1)

    return run


def speed(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    per_task = args.batch // len(TASKS)
    data = task_data(model_dir, args.prompt_tokens, 0, per_task)
    prompts = torch.cat([task.evaluation[:, : args.prompt_tokens] for task in data])
    names = [task for task in TASKS for _ in range(per_task)]
    model = ElasticLlama.from_pretrained(model_dir)  # packed: the serving layout
    adapters = random_asym(model, args.seed)
    batch = AdapterBatch({"bench": adapters}, [AdapterChoice("bench", t) for t in names])
    hf = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    peft = peft_twin(hf, adapters)

    with torch.inference_mode():
        ours_logits = model(prompts, adapters=batch)
        peft_logits = peft(input_ids=prompts, adapter_names=names).logits
        base_logits = model(prompts)
    agreement = float((ours_logits - peft_logits).abs().max())
    adapter_effect = float((ours_logits - base_logits).abs().max())
    print(f"max |ours - peft| logits: {agreement:.2e} (adapter effect {adapter_effect:.2e})")
    if agreement > 2e-3:
        raise SystemExit(f"ours and peft disagree by {agreement:.2e}: not the same function")

    runs = {
        "ours_asym": ours_decode(model, prompts, batch, args.new_tokens),
        "ours_base": ours_decode(model, prompts, None, args.new_tokens),
        "peft_mixed": peft_decode(peft, prompts, names, args.new_tokens),
    }
    # Wall time, and this process's CPU time: on a shared machine the
    # second is the steadier measure of the work each run does.
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):  # interleaved, so drift hits all alike
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    tokens = len(prompts) * args.new_tokens
    rate = {name: tokens / statistics.median(t) for name, t in wall.items()}
    cpu_rate = {name: tokens / statistics.median(t) for name, t in cpu.items()}
    print(rate, cpu_rate, flush=True)
    return {
        "load_average": [load_before, os.getloadavg()[0]],
        "tokens_per_cpu_s": cpu_rate,
        "cpu_goals": {
            "vs_peft": cpu_rate["ours_asym"] / cpu_rate["peft_mixed"],
            "overhead_vs_base": cpu_rate["ours_base"] / cpu_rate["ours_asym"] - 1,
        },
        "batch": len(prompts),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "max_logit_difference_vs_peft": agreement,
        "max_adapter_effect_on_logits": adapter_effect,
        "tokens_per_s": rate,
        "goals": {
            "vs_peft": rate["ours_asym"] / rate["peft_mixed"],
            "vs_peft_met": rate["ours_asym"] >= 1.3 * rate["peft_mixed"],
            "overhead_vs_base": rate["ours_base"] / rate["ours_asym"] - 1,
            "overhead_met": rate["ours_base"] / rate["ours_asym"] - 1 <= 0.25,
        },
    }


# -- report -------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Adapters", "", "command: `.venv/bin/python benchmarks/adapters.py`", ""]
    if "quality" in results:
        q = results["quality"]
        lines += [
            f"## Quality: {q['steps']} steps of {q['tokens_per_step']} tokens, same data and "
            f"seed; held-out perplexity ({q['eval_tokens_per_task']} tokens per task)",
            "",
            "| layout | " + " | ".join(TASKS) + " | mean | trainable parameters |",
            "|---" * (len(TASKS) + 3) + "|",
        ]
        for name, row in q["layouts"].items():
            cells = " | ".join(f"{row['perplexity'][t]:.3f}" for t in TASKS)
            lines.append(
                f"| {name} | {cells} | {row['mean_perplexity']:.3f} | {row['parameters']:,} |"
            )
        g = q["goals"]
        lines += [
            "",
            f"- AsymLoRA beats the equal-size shared LoRA on average: {g['asym_beats_shared']}",
            f"- AsymLoRA / separate LoRAs mean perplexity: {g['asym_vs_separate']:.4f} "
            f"(goal <= 1.02: {g['asym_within_2pct_of_separate']}), with "
            f"{g['asym_params_vs_separate']:.2f}x their parameters",
            "",
        ]
    if "speed" in results:
        s = results["speed"]
        rate = s["tokens_per_s"]
        g, c = s["goals"], s["cpu_goals"]
        lines += [
            f"## Mixed-task decoding: batch {s['batch']} (3 tasks), {s['prompt_tokens']}-token "
            f"prompts, {s['new_tokens']} new tokens, median of {s['repeats']}, "
            f"{s['threads']} threads",
            "",
            f"load average {s['load_average'][0]:.1f} before, {s['load_average'][1]:.1f} after",
            "",
            "| run | tokens/s (wall) | tokens per CPU-second |",
            "|---|---|---|",
            *(
                f"| {name} | {value:.1f} | {s['tokens_per_cpu_s'][name]:.1f} |"
                for name, value in rate.items()
            ),
            "",
            f"- ours / peft: {g['vs_peft']:.2f}x wall, {c['vs_peft']:.2f}x CPU time "
            f"(goal >= 1.3x: {g['vs_peft_met']})",
            f"- overhead over the base model: {100 * g['overhead_vs_base']:.1f}% wall, "
            f"{100 * c['overhead_vs_base']:.1f}% CPU time (goal <= 25%: {g['overhead_met']})",
            f"- logits agree with peft's to {s['max_logit_difference_vs_peft']:.1e} "
            f"(the adapters move them by up to {s['max_adapter_effect_on_logits']:.1e})",
            "",
        ]
    return "\n".join(lines)


def plot(quality_results: dict[str, Any], path: Path) -> None:
    """Training loss curves of the layouts (smoothed over 5 steps)."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, row in quality_results["layouts"].items():
        losses = row.get("losses")
        if not losses:
            continue
        smooth = [statistics.fmean(losses[max(0, i - 4) : i + 1]) for i in range(len(losses))]
        axis.plot(smooth, label=f"{name} ({row['mean_perplexity']:.2f})")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (5-step mean)")
    axis.set_title("Adapter layouts on SmolLM2-135M: loss (held-out mean perplexity)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("quality", "speed", "all"), default="all")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--windows-per-task", type=int, default=2)
    parser.add_argument("--train-windows", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    model_dir = prepare_model(progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / "adapters.json"
    results: dict[str, Any] = json.loads(out_json.read_text()) if out_json.exists() else {}
    if args.part in ("speed", "all"):
        results["speed"] = speed(model_dir, args)
    if args.part in ("quality", "all"):
        results["quality"] = quality(model_dir, args)
        plot(results["quality"], args.out / "adapters.png")
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "adapters.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
