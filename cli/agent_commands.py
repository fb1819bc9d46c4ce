"""`elasticfleet agent ...`: the offline half of the agent.

`agent profile` measures block importance (GSI and a proxy) into the model
profile the policies read; it checkpoints and resumes. `agent levels` adds
each block's measured cost at int8 and int4, and each layer's at int8 KV,
to that profile. `agent train` trains the RL policy's network from a
profile, for the precision ladder or (`--pruning-only`) keep/drop alone.
None runs in the operator.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from elasticfleet.cli.options import Commands, cache_dir_option, command_group, no_progress_option


def register(commands: Commands) -> None:
    """Add `agent profile | levels | train`."""
    group = command_group(commands, "agent", "block profiling and pruning policies")
    profile = group.add_parser(
        "profile",
        help="measure block importance (GSI and a proxy) on calibration text; resumable",
    )
    cache_dir_option(profile)
    profile.add_argument(
        "--out", type=Path, help="profile file (default: the shipped model's committed profile)"
    )
    profile.add_argument("--windows", type=int, default=4, help="calibration windows")
    profile.add_argument("--window-length", type=int, default=256, help="tokens per window")
    profile.add_argument("--max-steps", type=int, help="stop after this many GSI steps")
    profile.add_argument("--time-limit", type=float, help="stop after this many seconds")
    no_progress_option(profile)
    profile.set_defaults(handler=_profile)

    levels = group.add_parser(
        "levels",
        help="measure each block's cost at int8 and int4 into the profile (about 5 min)",
    )
    cache_dir_option(levels)
    levels.add_argument(
        "--profile", type=Path, help="profile file to add to (default: the committed one)"
    )
    levels.add_argument("--windows", type=int, default=4, help="calibration windows")
    levels.add_argument("--window-length", type=int, default=256, help="tokens per window")
    no_progress_option(levels)
    levels.set_defaults(handler=_levels)

    train = group.add_parser("train", help="train the RAP DQN agent on the precision ladder")
    cache_dir_option(train)
    train.add_argument("--profile", type=Path, help="model profile (default: the committed one)")
    train.add_argument(
        "--out",
        type=Path,
        help="checkpoint (default: the committed agent, or the pruning-only one with "
        "--pruning-only)",
    )
    train.add_argument(
        "--pruning-only",
        action="store_true",
        help="train for keep/drop only, ignoring the profile's level costs (the baseline)",
    )
    train.add_argument(
        "--quality",
        choices=["profile", "perplexity"],
        default="profile",
        help="reward from the profile's importance estimate (fast) or measured perplexity",
    )
    train.add_argument("--windows", type=int, default=2, help="perplexity windows (x256)")
    train.add_argument("--episodes", type=int, help="default: TrainingConfig's")
    train.add_argument("--time-limit", type=float, help="stop after this many seconds")
    train.add_argument("--seed", type=int, default=0)
    no_progress_option(train)
    train.set_defaults(handler=_train)


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


def _levels(args: argparse.Namespace) -> int:
    import dataclasses

    from elasticfleet.agent.corpus import token_windows
    from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
    from elasticfleet.agent.profiling import measure_level_costs
    from elasticfleet.worker.model.generation import load_tokenizer
    from elasticfleet.worker.model.llama import ElasticLlama
    from elasticfleet.worker.model.prepare import prepare_model

    progress = not args.no_progress
    out = args.profile or DEFAULT_PROFILE
    profile = ModelProfile.load(out)
    path = prepare_model(args.cache_dir, progress=progress)
    tokens = token_windows(
        "calibration",
        load_tokenizer(path),
        args.window_length,
        args.windows,
        cache_root=args.cache_dir,
    )
    costs = measure_level_costs(ElasticLlama.from_pretrained(path), tokens, progress=progress)
    meta = profile.meta | {"levels_command": " ".join(["elasticfleet", *sys.argv[1:]])}
    dataclasses.replace(profile, level_costs=profile.level_costs | costs, meta=meta).save(out)
    print(
        f"{out}: int8 and int4 costs of {profile.num_blocks} blocks, "
        f"int8 KV costs of {profile.config.num_hidden_layers} layers"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    import dataclasses
    from collections.abc import Callable

    from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
    from elasticfleet.agent.quality import ProfileQuality
    from elasticfleet.agent.rl.policy import DEFAULT_AGENT, PRUNING_AGENT
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
    config = TrainingConfig(
        time_limit_s=args.time_limit, seed=args.seed, pruning_only=args.pruning_only
    )
    if args.episodes is not None:
        config = dataclasses.replace(config, episodes=args.episodes)
    policy, stats = train_agent(profile, quality, config, progress=not args.no_progress)
    out = args.out or (PRUNING_AGENT if args.pruning_only else DEFAULT_AGENT)
    meta = {**stats, "quality": args.quality, "seed": args.seed}
    meta["command"] = " ".join(["elasticfleet", *sys.argv[1:]])
    policy.save(out, meta=meta)
    print(f"{out}: {stats['episodes']:.0f} episodes in {stats['seconds']:.0f} s")
    return 0
