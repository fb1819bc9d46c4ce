"""What the operator does at work, run where torch cannot be imported: the
command line as far as `operator run --help`, the kopf handlers' import, a few
decisions of the default policy (rl) and, given a store, an AdapterSet check.

Run as a script: `python without_torch.py [REDIS_URL ADAPTER SPEC_JSON]`
prints a JSON report. tests/operator/test_without_torch.py runs it on the
host, where torch is installed and `sys.modules["torch"] = None` makes every
`import torch` fail; tests/images runs it in the operator image, which has no
torch at all. Nothing here may import elasticfleet before `report` has
blocked torch, so the tests import only `STATES` and `decisions` from it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from typing import Any

#: (batch, sequence, budget share of the dense model's bytes there) for the
#: rl decisions: light, medium and heavy load.
STATES = ((1, 4096, 0.8), (4, 2048, 0.6), (16, 2048, 0.5))


def decisions() -> list[list[str]]:
    """The committed rl agent's plans for STATES on the shipped model: each
    block's level, then each KV cache's."""
    from elasticfleet.agent.policy import PolicyState
    from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
    from elasticfleet.agent.registry import make_policy
    from elasticfleet.worker.model.memory import predict_memory

    profile = ModelProfile.load(DEFAULT_PROFILE)
    policy = make_policy("rl")
    plans = []
    for batch, seq, share in STATES:
        dense = predict_memory(profile.config, None, batch, seq, profile.dtype).total_bytes
        state = PolicyState(int(dense * share), batch, seq, profile)
        plan = policy.decide(state)
        plans.append(plan.levels() + plan.kv_levels())
    return plans


def report(argv: list[str]) -> dict[str, Any]:
    """Block torch, then do the operator's work; what happened, as JSON values."""
    installed = importlib.util.find_spec("torch") is not None
    sys.modules["torch"] = None  # type: ignore[assignment]  # import torch: ImportError

    from elasticfleet.cli import main

    shown = io.StringIO()
    with contextlib.redirect_stdout(shown), contextlib.suppress(SystemExit):
        main(["operator", "run", "--help"])
    import elasticfleet.operator.handlers  # noqa: F401 (what `operator run` loads)

    result: dict[str, Any] = {
        "torch_installed": installed,
        "run_help": shown.getvalue(),
        "plans": decisions(),
    }
    if argv:
        from elasticfleet.operator.adapters import check_adapter_set
        from elasticfleet.worker.adapters.store import AdapterStore

        url, name, spec = argv
        store = AdapterStore.from_url(url)
        check = check_adapter_set(store, name, json.loads(spec))
        store.close()
        result["adapter_check"] = {"ready": check.ready, "reason": check.reason}
    loaded = [m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m] is not None]
    result["torch_modules"] = loaded
    return result


if __name__ == "__main__":
    json.dump(report(sys.argv[1:]), sys.stdout)
