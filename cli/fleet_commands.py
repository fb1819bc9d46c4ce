"""`elasticfleet fleet ...`: a fleet on this machine, without Kubernetes.

`fleet demo` runs the local fleet demo (elasticfleet.demo.fleet):
real workers on simulated devices, planned by the real control loop through
a squeeze, a relief and a crash. It exits 0 when every phase did what it
showed, 1 when one did not (the message says which), 2 on bad arguments,
130 when interrupted (Ctrl-C); the workers are stopped however it ends.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from elasticfleet.agent.registry import ADAPTIVE_POLICIES
from elasticfleet.cli.options import Commands, command_group

# What a shell reports for a command that SIGINT ended.
EXIT_INTERRUPTED = 130


def register(commands: Commands) -> None:
    """Add `fleet demo`."""
    group = command_group(commands, "fleet", "a fleet on this machine (no Kubernetes)")
    demo = group.add_parser(
        "demo",
        help="workers on simulated devices, planned by the real control loop through a "
        "squeeze, a relief and a crash",
    )
    demo.add_argument(
        "--model", type=Path, help="model directory (default: the prepared SmolLM2 cache)"
    )
    demo.add_argument("--cache-dir", type=Path, help="cache root for the default model")
    demo.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    demo.add_argument(
        "--policy",
        default="rl",
        help=f"the fleet's policy: {' or '.join(ADAPTIVE_POLICIES)} (default: rl, the "
        "committed agent; both step down the precision ladder, quantizing before they drop)",
    )
    demo.add_argument(
        "--squeeze",
        type=float,
        default=0.8,
        help="the squeezed worker's budget as a share of the dense weights, between 0.5 "
        "and 1 (default 0.8)",
    )
    demo.add_argument("--prompt", default="Why is the sky blue?", help="what the workers answer")
    demo.add_argument(
        "--max-new-tokens", type=int, default=24, help="tokens per answer (default 24)"
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("fleet-demo"),
        help="folder for the record, the plot and the worker logs (default ./fleet-demo)",
    )
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from elasticfleet.demo.fleet import DemoError, DemoOptions, run_demo
    from elasticfleet.operator.control import profile_for_model
    from elasticfleet.worker.model.prepare import model_dir, prepare_model
    from elasticfleet.worker.serving.process import WorkerStartError

    # The flags are checked before a first run spends minutes preparing the model.
    options = DemoOptions(
        model_dir=args.model or model_dir(args.cache_dir),
        out=args.out,
        workers=args.workers,
        policy=args.policy,
        squeeze_ratio=args.squeeze,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
    )
    profile = profile_for_model(options.model_dir.name)  # SpecError (exit 2) if none
    if args.model is None:
        prepare_model(args.cache_dir, progress=False)
    try:
        run_demo(options, profile, say=lambda line: print(line, flush=True))
    except (DemoError, WorkerStartError, ValueError) as error:
        print(f"elasticfleet: the demo failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("elasticfleet: interrupted; the workers are stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
