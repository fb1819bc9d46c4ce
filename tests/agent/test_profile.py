"""Model profiles on the tiny model: byte figures, Greedy Sequential
Importance (including resumption and limits), the one-pass proxy, and the
profile file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from elasticfleet.agent import profiling as profile_module
from elasticfleet.agent.perplexity import PerplexityEvaluator
from elasticfleet.agent.profile import ModelProfile, block_bytes, block_name
from elasticfleet.agent.profiling import block_proxy_scores, checkpoint_path, profile_model
from elasticfleet.worker.model.config import ModelConfig, llama2_7b_config, tiny_config
from elasticfleet.worker.model.llama import DecoderLayer, ElasticLlama, ForwardContext
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import PruningPlan

BLOCKS = 8  # the tiny model's 4 layers


def fresh_profile(model_dir: Path, tokens: torch.Tensor, out: Path, **options: Any) -> ModelProfile:
    """Profile a freshly loaded tiny model, as a new process would."""
    return profile_model(
        ElasticLlama.from_pretrained(model_dir), tokens, out_path=out, progress=False, **options
    )


def drop(blocks: list[int] | tuple[int, ...]) -> PruningPlan:
    return PruningPlan.without_blocks(BLOCKS // 2, blocks)


@pytest.fixture(scope="module")
def full_profile(
    tiny_model_dir: Path, tiny_windows: torch.Tensor, tmp_path_factory: pytest.TempPathFactory
) -> ModelProfile:
    """An uninterrupted, complete GSI run."""
    model = ElasticLlama.from_pretrained(tiny_model_dir, packed=False)
    out = tmp_path_factory.mktemp("full") / "profile.json"
    return profile_model(model, tiny_windows, out_path=out, progress=False, seed=5)


# -- byte figures ---------------------------------------------------------------


@pytest.mark.parametrize("config", [tiny_config(), llama2_7b_config()], ids=["tiny", "llama2-7b"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_block_bytes_agree_with_the_memory_model(config: ModelConfig, dtype: str) -> None:
    weights, kv = block_bytes(config, dtype)
    layers = config.num_hidden_layers
    assert len(weights) == len(kv) == 2 * layers
    assert all(kv[b] == 0 for b in range(1, 2 * layers, 2))
    dense = predict_memory(config, None, 3, 100, dtype)
    for dropped in ([0], [1], [2, 5], [0, 1, 2 * layers - 1]):
        plan = PruningPlan.without_blocks(layers, dropped)
        pruned = predict_memory(config, plan, 3, 100, dtype)
        assert dense.weight_bytes - pruned.weight_bytes == sum(weights[b] for b in dropped)
        assert dense.kv_bytes - pruned.kv_bytes == sum(kv[b] for b in dropped) * 3 * 100


def test_block_names() -> None:
    assert [block_name(b) for b in range(4)] == ["attn 0", "ffn 0", "attn 1", "ffn 1"]


# -- Greedy Sequential Importance ---------------------------------------------------


def test_gsi_order_is_greedy(
    full_profile: ModelProfile, plain_model: ElasticLlama, tiny_windows: torch.Tensor
) -> None:
    order = full_profile.gsi_order
    assert len(order) == BLOCKS - 1  # never drops the last block
    assert len(set(order)) == len(order) and set(order) <= set(range(BLOCKS))
    assert full_profile.complete and full_profile.meta["complete"] is True
    assert full_profile.meta["stopped_by"] == "complete"
    assert full_profile.meta["gsi_evaluations"] == sum(range(2, BLOCKS + 1))
    evaluator = PerplexityEvaluator(plain_model, tiny_windows)
    assert full_profile.dense_perplexity == evaluator.evaluate(PruningPlan.dense(4))
    singles = {b: evaluator.evaluate(drop([b])) for b in range(BLOCKS)}
    assert full_profile.gsi_perplexity[0] == singles[order[0]] == min(singles.values())
    for step in range(1, len(order)):
        removed = order[:step]
        candidates = {
            b: evaluator.evaluate(drop([*removed, b])) for b in range(BLOCKS) if b not in removed
        }
        assert full_profile.gsi_perplexity[step] == candidates[order[step]]
        assert candidates[order[step]] == min(candidates.values())


def test_profile_records_what_it_measured(
    full_profile: ModelProfile, tiny_windows: torch.Tensor
) -> None:
    assert full_profile.eval_tokens == tiny_windows.numel()
    assert full_profile.dtype == "float32"
    assert full_profile.config == tiny_config()
    assert (full_profile.block_weight_bytes, full_profile.block_kv_bytes_per_token) == (
        block_bytes(tiny_config(), "float32")
    )
    meta = full_profile.meta
    assert meta["seed"] == 5
    assert meta["windows"] == 6 and meta["window_tokens"] == 24
    assert meta["timings"]["gsi_s"] > 0
    assert meta["resumed_from_step"] == 0


def test_complete_run_saves_profile_and_removes_checkpoint(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor, tmp_path: Path
) -> None:
    out = tmp_path / "nested" / "profile.json"
    original = PruningPlan.from_dropped(4, ffn=[1])
    plain_model.apply_plan(original)
    profile = profile_model(plain_model, tiny_windows, out_path=out, progress=False)
    assert ModelProfile.load(out) == profile
    assert not checkpoint_path(out).exists()
    assert plain_model.plan == original  # handed back as it came


def test_max_steps_then_resume_matches_an_uninterrupted_run(
    tiny_model_dir: Path, tiny_windows: torch.Tensor, tmp_path: Path
) -> None:
    straight = fresh_profile(tiny_model_dir, tiny_windows, tmp_path / "straight.json", max_steps=4)
    out = tmp_path / "resumed.json"
    first = fresh_profile(tiny_model_dir, tiny_windows, out, max_steps=2)
    assert first.meta["complete"] is False and first.meta["stopped_by"] == "max_steps"
    assert ModelProfile.load(out).gsi_order == first.gsi_order == straight.gsi_order[:2]
    assert checkpoint_path(out).exists()
    resumed = fresh_profile(tiny_model_dir, tiny_windows, out, max_steps=4)
    assert resumed.gsi_order == straight.gsi_order
    assert resumed.gsi_perplexity == straight.gsi_perplexity
    assert resumed.proxy_scores == straight.proxy_scores
    assert resumed.meta["resumed_from_step"] == 2
    # Steps 1-2 were not re-measured: 8 + 7 + 6 + 5 evaluations over both runs.
    assert resumed.meta["gsi_evaluations"] == straight.meta["gsi_evaluations"] == 26
    assert checkpoint_path(out).exists()  # still incomplete


def test_interrupted_step_resumes_from_its_measured_candidates(
    tiny_model_dir: Path,
    tiny_windows: torch.Tensor,
    full_profile: ModelProfile,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "profile.json"
    model = ElasticLlama.from_pretrained(tiny_model_dir)
    real_evaluate = PerplexityEvaluator.evaluate
    calls = [0]

    def interrupted(self: PerplexityEvaluator, plan: PruningPlan) -> float:
        calls[0] += 1
        if calls[0] == 12:  # the dense plan, step 1's 8 candidates, 3 of step 2's
            raise KeyboardInterrupt
        return real_evaluate(self, plan)

    monkeypatch.setattr(PerplexityEvaluator, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        profile_model(model, tiny_windows, out_path=out, progress=False)
    assert model.plan == PruningPlan.dense(4)
    saved = json.loads(checkpoint_path(out).read_text())
    assert len(saved["gsi_order"]) == 1 and len(saved["pending"]) == 2
    monkeypatch.setattr(PerplexityEvaluator, "evaluate", real_evaluate)
    resumed = profile_model(model, tiny_windows, out_path=out, progress=False)
    assert resumed.gsi_order == full_profile.gsi_order
    assert resumed.gsi_perplexity == full_profile.gsi_perplexity
    assert resumed.meta["gsi_evaluations"] == full_profile.meta["gsi_evaluations"]


def test_time_limit_stops_cleanly_and_resumes(
    tiny_model_dir: Path,
    tiny_windows: torch.Tensor,
    full_profile: ModelProfile,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ticks = iter(range(10_000))
    monkeypatch.setattr(profile_module, "_clock", lambda: float(next(ticks)))
    out = tmp_path / "profile.json"
    model = ElasticLlama.from_pretrained(tiny_model_dir)
    # The clock reads 0 at the start, then 1, 2, ... before each evaluation:
    # 10 evaluations fit (step 1's 8, then 2 of step 2's 7).
    limited = profile_model(model, tiny_windows, out_path=out, time_limit_s=10.5, progress=False)
    assert limited.gsi_order == full_profile.gsi_order[:1]
    assert limited.meta["complete"] is False and limited.meta["stopped_by"] == "time_limit"
    assert limited.meta["gsi_evaluations"] == 10
    assert model.plan == PruningPlan.dense(4)
    assert ModelProfile.load(out) == limited
    resumed = profile_model(model, tiny_windows, out_path=out, progress=False)
    assert resumed.gsi_order == full_profile.gsi_order
    assert resumed.meta["gsi_evaluations"] == full_profile.meta["gsi_evaluations"]


def test_zero_time_limit_gives_a_proxy_only_profile(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor, tmp_path: Path
) -> None:
    profile = profile_model(
        plain_model, tiny_windows, out_path=tmp_path / "p.json", time_limit_s=0, progress=False
    )
    assert profile.gsi_order == () and profile.gsi_perplexity == ()
    assert profile.importance_rank() == list(profile.proxy_order)
    assert profile.meta["stopped_by"] == "time_limit"


def test_checkpoint_for_other_tokens_is_not_resumed(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor, tmp_path: Path
) -> None:
    out = tmp_path / "profile.json"
    profile_model(plain_model, tiny_windows, out_path=out, max_steps=1, progress=False)
    other = profile_model(plain_model, tiny_windows[:4], out_path=out, max_steps=1, progress=False)
    assert other.meta["resumed_from_step"] == 0
    assert other.meta["gsi_evaluations"] == BLOCKS


def test_corrupt_checkpoint_is_reported(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor, tmp_path: Path
) -> None:
    out = tmp_path / "profile.json"
    checkpoint_path(out).write_text("{not json")
    with pytest.raises(ValueError, match=r"unreadable GSI checkpoint.*delete it"):
        profile_model(plain_model, tiny_windows, out_path=out, progress=False)


def test_checkpoint_path_sits_next_to_the_profile(tmp_path: Path) -> None:
    assert checkpoint_path(tmp_path / "smol.json") == tmp_path / "smol.checkpoint.json"
    assert checkpoint_path(tmp_path / "smol") == tmp_path / "smol.checkpoint.json"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_steps": -1}, "max_steps must be a non-negative integer"),
        ({"time_limit_s": -1.0}, "time_limit_s must be non-negative"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_invalid_arguments_are_rejected(
    plain_model: ElasticLlama,
    tiny_windows: torch.Tensor,
    tmp_path: Path,
    arguments: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        profile_model(plain_model, tiny_windows, out_path=tmp_path / "p.json", **arguments)


def test_model_without_weights_file_is_rejected(tiny_windows: torch.Tensor, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loaded from disk"):
        profile_model(ElasticLlama(tiny_config()), tiny_windows, out_path=tmp_path / "p.json")


# -- the one-pass proxy -----------------------------------------------------------


def reference_proxy(model: ElasticLlama, tokens: torch.Tensor) -> list[float]:
    """The proxy recomputed from each decoder layer's own inputs: the layer's
    arguments give h_in and the forward context, from which both blocks'
    residual outputs follow."""
    sums = [0.0] * BLOCKS

    def hook(layer: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        assert isinstance(layer, DecoderLayer)
        assert layer.input_layernorm and layer.self_attn and layer.mlp
        assert layer.post_attention_layernorm
        h, ctx, index = args
        assert isinstance(ctx, ForwardContext)
        middle = h + layer.self_attn(layer.input_layernorm(h), ctx, index)
        after = middle + layer.mlp(layer.post_attention_layernorm(middle), ctx, index)
        torch.testing.assert_close(after, output)
        for block, (before, then) in enumerate(((h, middle), (middle, after))):
            cos = torch.nn.functional.cosine_similarity(before, then, dim=-1)
            sums[2 * index + block] += float(cos.double().sum())

    handles = [layer.register_forward_hook(hook) for layer in model.model.layers]
    with torch.inference_mode():
        model(tokens)
    for handle in handles:
        handle.remove()
    return [1.0 - total / tokens.numel() for total in sums]


def test_proxy_scores_match_a_reference(
    tiny_model: ElasticLlama, tiny_windows: torch.Tensor
) -> None:
    scores = block_proxy_scores(tiny_model, tiny_windows, batch_size=4)
    assert len(scores) == BLOCKS
    assert all(0.0 <= score <= 2.0 for score in scores)
    assert list(scores) == pytest.approx(reference_proxy(tiny_model, tiny_windows), abs=1e-5)
    # Every hook is gone afterwards.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_model.modules())


def test_proxy_runs_on_the_dense_model(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor
) -> None:
    dense_scores = block_proxy_scores(plain_model, tiny_windows)
    plain_model.apply_plan(PruningPlan.from_dropped(4, attention=[2], ffn=[0]))
    assert block_proxy_scores(plain_model, tiny_windows) == dense_scores
    assert plain_model.plan == PruningPlan.dense(4)


def test_profile_proxy_order(full_profile: ModelProfile) -> None:
    order, scores = full_profile.proxy_order, full_profile.proxy_scores
    assert sorted(order) == list(range(BLOCKS))
    assert all(0.0 <= s <= 2.0 for s in scores)
    assert [scores[b] for b in order] == sorted(scores)


def test_proxy_tokens_are_used_for_the_proxy(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor, tmp_path: Path
) -> None:
    proxy = tiny_windows[:2, :10]
    profile = profile_model(
        plain_model,
        tiny_windows,
        out_path=tmp_path / "p.json",
        max_steps=0,
        proxy_tokens=proxy,
        progress=False,
    )
    assert profile.proxy_scores == block_proxy_scores(plain_model, proxy)
    assert profile.meta["proxy_tokens"] == 20


# -- the profile file -----------------------------------------------------------------


def test_importance_rank(full_profile: ModelProfile) -> None:
    rank = full_profile.importance_rank()
    assert sorted(rank) == list(range(BLOCKS))
    assert rank[: BLOCKS - 1] == list(full_profile.gsi_order)
    partial = profile_from(full_profile.to_dict(), gsi_order=[5, 2], gsi_perplexity=[3.0, 4.0])
    rest = [b for b in full_profile.proxy_order if b not in (5, 2)]
    assert partial.importance_rank() == [5, 2, *rest]


def test_save_load_round_trip(full_profile: ModelProfile, tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    full_profile.save(path)
    loaded = ModelProfile.load(path)
    assert loaded == full_profile
    raw = json.loads(path.read_text())
    assert list(raw) == sorted(raw)
    assert raw["config"] == tiny_config().to_hf_dict()
    assert path.stat().st_size < 20_000


def profile_from(raw: dict[str, Any], **changes: Any) -> ModelProfile:
    return ModelProfile.from_dict({**raw, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"gsi_perplexity": [2.0]}, "gsi_perplexity has 1 entries but gsi_order has 7"),
        ({"gsi_order": list(range(8)), "gsi_perplexity": [2.0] * 8}, "at most 7"),
        ({"gsi_order": [0, 9], "gsi_perplexity": [2.0, 3.0]}, "block 9, out of range"),
        ({"gsi_order": [3, 3], "gsi_perplexity": [2.0, 3.0]}, "lists block 3 twice"),
        ({"block_weight_bytes": [4] * 7}, r"block_weight_bytes has 7 entries.*needs 8"),
        ({"block_kv_bytes_per_token": [0] * 8}, "disagrees with the memory model"),
        ({"proxy_order": [0, 1, 2]}, "proxy_order has 3 entries"),
        ({"proxy_scores": [0.5] * 7 + [2.5]}, r"proxy_scores\[7\] must lie in \[0, 2\]"),
        ({"proxy_scores": [0.5] * 9}, "proxy_scores has 9 entries"),
        ({"dense_perplexity": 0.5}, "dense_perplexity must be a perplexity"),
        ({"eval_tokens": 0}, "eval_tokens must be a positive integer"),
        ({"eval_tokens": "many"}, "eval_tokens must be an integer"),
        ({"gsi_order": "0,1"}, "gsi_order must be a list of integers"),
        ({"dtype": "float7"}, "unknown dtype"),
        ({"config": {"vocab_size": 5}}, "not a valid model config"),
        ({"version": 2}, "version 2 is not supported"),
        ({"format": "something"}, "not a model profile"),
        ({"extra": 1}, "unknown field"),
        ({"meta": []}, "meta must be a JSON object"),
    ],
)
def test_load_rejects_malformed_files(
    full_profile: ModelProfile, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**full_profile.to_dict(), **changes}))
    with pytest.raises(ValueError, match=message) as raised:
        ModelProfile.load(path)
    assert str(path) in str(raised.value)


def test_load_rejects_missing_fields_and_bad_json(
    full_profile: ModelProfile, tmp_path: Path
) -> None:
    raw = full_profile.to_dict()
    del raw["proxy_scores"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"lacks field.*proxy_scores"):
        ModelProfile.load(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelProfile.load(path)


def test_infinite_step_perplexity_is_allowed(full_profile: ModelProfile) -> None:
    raw = full_profile.to_dict()
    values = [*full_profile.gsi_perplexity[:-1], math.inf]
    assert profile_from(raw, gsi_perplexity=values).gsi_perplexity[-1] == math.inf
    with pytest.raises(ValueError, match="perplexity"):
        profile_from(raw, gsi_perplexity=[*values[:-1], math.nan])


@pytest.mark.real_model
def test_real_proxy_profile(real_model_dir: Path, tmp_path: Path) -> None:
    """A proxy-only profile of SmolLM2 (a full GSI run takes hours): the
    memory figures are SmolLM2's and the proxy ranks all 60 blocks."""
    from pydoc_data.topics import topics

    from elasticfleet.worker.model.generation import load_tokenizer

    ids = load_tokenizer(real_model_dir).encode(topics["exprlists"] + topics["lambda"]).ids
    tokens = torch.tensor([ids[:48], ids[48:96]])
    model = ElasticLlama.from_pretrained(real_model_dir)
    profile = profile_model(
        model, tokens, out_path=tmp_path / "smol.json", time_limit_s=0, progress=False
    )
    assert profile.model_name == real_model_dir.name
    assert len(profile.proxy_order) == 60 and sorted(profile.proxy_order) == list(range(60))
    # q, o: 576 x 576; k, v: 576 x 192; plus the norm, in float32.
    assert profile.block_weight_bytes[0] == (2 * 576 * 576 + 2 * 576 * 192 + 576) * 4
    assert profile.block_weight_bytes[1] == (3 * 576 * 1536 + 576) * 4
    assert profile.block_kv_bytes_per_token[:2] == (1536, 0)
    assert 2.0 < profile.dense_perplexity < 200.0
    assert ModelProfile.load(tmp_path / "smol.json") == profile
