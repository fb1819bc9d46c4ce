"""AsymLoRA layers on the elastic model: exactness at init, head selection,
the router mixture, mixed batches, and adapters on dropped blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from elasticfleet.worker.adapters.format import AdapterSpec
from elasticfleet.worker.adapters.layer import (
    AdapterBatch,
    AdapterChoice,
    AdapterSet,
    AsymLoRA,
    RowRoute,
)
from elasticfleet.worker.adapters.names import ALL_MODULES
from elasticfleet.worker.adapters.weights import AdapterWeights
from elasticfleet.worker.model.accounting import account
from elasticfleet.worker.model.config import tiny_config
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.plan import PruningPlan

TASKS = ("code", "qa", "defs")


def make_spec(
    name: str = "multi", *, tasks: tuple[str, ...] = TASKS, router: bool = True
) -> AdapterSpec:
    return AdapterSpec(
        name=name,
        base_model="tiny",
        num_layers=tiny_config().num_hidden_layers,
        rank=4,
        alpha=8.0,
        modules=ALL_MODULES,
        tasks=tasks,
        router=router,
    )


def trained(spec: AdapterSpec, seed: int) -> AdapterSet:
    """A set whose B heads are random (as if trained), frozen."""
    adapters = AdapterSet.create(spec, tiny_config(), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for param in adapters.parameters():
        if param.abs().sum() == 0:  # the zero-initialised heads
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    return adapters.requires_grad_(False)


def logits(
    model: ElasticLlama, ids: torch.Tensor, batch: AdapterBatch | None = None
) -> torch.Tensor:
    out: torch.Tensor = model(ids, adapters=batch)
    return out


def test_untrained_adapter_is_exactly_the_base_model(
    tiny_model: ElasticLlama, tiny_windows: torch.Tensor
) -> None:
    adapters = AdapterSet.create(make_spec(), tiny_model.config, seed=0)
    ids = tiny_windows[:3]
    rows = [AdapterChoice("multi", "code"), AdapterChoice("multi", None), None]
    batch = AdapterBatch({"multi": adapters}, rows)
    assert torch.equal(logits(tiny_model, ids, batch), logits(tiny_model, ids))


def test_router_forced_one_hot_equals_plain_lora_on_that_head(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    mixed = trained(make_spec(), seed=3)
    head = 1

    # A plain LoRA: the same A and only head `head`'s B, in task mode.
    plain = AdapterWeights(
        make_spec("plain", tasks=("only",), router=False),
        {
            name.replace(f".B.{TASKS[head]}", ".B.only"): tensor
            for name, tensor in mixed.weights().tensors.items()
            if ".B." not in name or name.endswith(f".B.{TASKS[head]}")
            if not name.endswith(".router")
        },
    )
    single = AdapterSet.from_weights(plain, plain_model.config)

    def one_hot(self: AsymLoRA, x: torch.Tensor) -> torch.Tensor:
        weights = torch.zeros(*x.shape[:-1], len(self.tasks))
        weights[..., head] = 1.0
        return weights

    monkeypatch.setattr(AsymLoRA, "mixture", one_hot)
    ids = tiny_windows[:2]
    routed = logits(plain_model, ids, AdapterBatch.single(mixed, 2, None))
    expected = logits(plain_model, ids, AdapterBatch.single(single, 2, "only"))
    torch.testing.assert_close(routed, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(routed, logits(plain_model, ids), atol=1e-3)


def test_heads_and_mixture_match_the_lora_formulas() -> None:
    torch.manual_seed(0)
    lora = AsymLoRA(8, 6, 2, ("a", "b"), router=True)
    lora.B.data.normal_()
    x = torch.randn(3, 5, 8)
    a, b = lora.head("a"), lora.head("b")  # [out, rank]
    # Rows 0 and 2 on head b, row 1 on head a.
    one_hot = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]], [[0.0, 1.0]]])
    route = RowRoute(mix=one_hot, router_rows=torch.tensor([], dtype=torch.long))
    delta = lora.delta(x, route)
    torch.testing.assert_close(delta[0], x[0] @ lora.A.T @ b.T)
    torch.testing.assert_close(delta[1], x[1] @ lora.A.T @ a.T)
    out = torch.randn(3, 5, 6)
    torch.testing.assert_close(lora.add_delta(out, x, route, 0.5), out + 0.5 * delta)
    # Router rows: the router-weighted sum of the heads' outputs.
    routed = RowRoute(mix=torch.zeros(3, 1, 2), router_rows=torch.tensor([0, 2]))
    mixed = lora.delta(x, routed)
    weights = lora.mixture(x)
    per_head = torch.stack([x @ lora.A.T @ h.T for h in (a, b)], dim=-2)
    expected = (weights[..., None] * per_head).sum(-2)
    torch.testing.assert_close(mixed[[0, 2]], expected[[0, 2]])
    assert torch.equal(mixed[1], torch.zeros(5, 6))


def test_mixed_batch_equals_each_row_alone(
    tiny_model: ElasticLlama, tiny_windows: torch.Tensor
) -> None:
    sets = {"multi": trained(make_spec(), seed=5), "other": trained(make_spec("other"), seed=7)}
    rows = [
        AdapterChoice("multi", "code"),
        AdapterChoice("multi", "qa"),
        None,
        AdapterChoice("other", None),
        AdapterChoice("multi", None),
        AdapterChoice("other", "defs"),
    ]
    ids = tiny_windows[: len(rows), :12]
    lengths = torch.tensor([12, 7, 9, 12, 5, 10])
    batch = AdapterBatch(sets, rows)
    cache = tiny_model.new_cache(len(rows), 16)
    prefill = tiny_model(ids, cache, input_lengths=lengths, adapters=batch)
    step_ids = tiny_windows[: len(rows), 12:13]
    step = tiny_model(step_ids, cache, adapters=batch)
    for index, choice in enumerate(rows):
        alone = AdapterBatch(sets, [choice])
        own_cache = tiny_model.new_cache(1, 16)
        n = int(lengths[index])
        own = tiny_model(ids[index : index + 1, :n], own_cache, adapters=alone)
        torch.testing.assert_close(prefill[index, :n], own[0], atol=2e-5, rtol=0)
        own_step = tiny_model(step_ids[index : index + 1], own_cache, adapters=alone)
        torch.testing.assert_close(step[index], own_step[0], atol=2e-5, rtol=0)
    # Rows on different heads really differ from the base.
    base = tiny_model(ids[:1])
    assert not torch.allclose(prefill[0], base[0], atol=1e-3)


def test_adapters_on_dropped_blocks_are_neither_loaded_nor_computed(
    plain_model: ElasticLlama, tiny_windows: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = trained(make_spec(), seed=11).weights()
    plan = PruningPlan.from_dropped(4, attention=[1], ffn=[2, 3])
    adapters = AdapterSet.from_weights(full, plain_model.config, plan=plan)
    held = {key for key in adapters.lora}
    assert "1_q_proj" not in held and "2_down_proj" not in held
    assert "0_q_proj" in held and "1_gate_proj" in held
    assert len(held) == 3 * 4 + 2 * 3  # 3 kept attention blocks x 4 + 2 kept FFNs x 3
    assert adapters.nbytes < AdapterSet.from_weights(full, plain_model.config).nbytes

    computed: list[tuple[int, str]] = []
    original = AdapterBatch.apply

    def spy(
        self: AdapterBatch, layer: int, module: str, x: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        computed.append((layer, module))
        return original(self, layer, module, x, out)

    monkeypatch.setattr(AdapterBatch, "apply", spy)
    plain_model.apply_plan(plan)
    plain_model(tiny_windows[:1], adapters=AdapterBatch.single(adapters, 1, "qa"))
    assert (1, "q_proj") not in computed and (3, "up_proj") not in computed
    assert len(computed) == len(held)

    # Restoring a block: its adapter modules come back from the weights.
    adapters.add(full, plan=PruningPlan.dense(4))
    assert len(adapters.lora) == 4 * 7
    adapters.retain(plan)
    assert {key for key in adapters.lora} == held


def test_partial_heads_and_choices_are_validated(plain_model: ElasticLlama) -> None:
    spec = make_spec()
    full = trained(spec, seed=2).weights()
    only_code = AdapterWeights(
        spec,
        {n: t for n, t in full.tensors.items() if ".B." not in n or n.endswith(".B.code")},
    )
    adapters = AdapterSet.from_weights(only_code, plain_model.config)
    assert adapters.has_task("code") and not adapters.has_task("qa")
    assert not adapters.has_router
    sets = {"multi": adapters}
    AdapterBatch(sets, [AdapterChoice("multi", "code")])
    with pytest.raises(KeyError, match="without task 'qa'"):
        AdapterBatch(sets, [AdapterChoice("multi", "qa")])
    with pytest.raises(ValueError, match="has no task 'poetry'; its tasks are code, qa, defs"):
        AdapterBatch(sets, [AdapterChoice("multi", "poetry")])
    with pytest.raises(KeyError, match="adapter 'nope' is not loaded"):
        AdapterBatch(sets, [AdapterChoice("nope", "code")])
    with pytest.raises(KeyError, match="without its router"):
        AdapterBatch(sets, [AdapterChoice("multi", None)])
    # Loading another task's heads later merges them in.
    adapters.add(
        AdapterWeights(
            spec, {n: t for n, t in full.tensors.items() if ".B.qa" in n or n.endswith(".A")}
        )
    )
    assert adapters.has_task("qa") and adapters.has_task("code") and not adapters.has_task("defs")
    AdapterBatch(sets, [AdapterChoice("multi", "qa"), AdapterChoice("multi", "code")])
    merged = adapters.weights().tensors
    assert torch.equal(merged["layers.2.up_proj.B.qa"], full.tensors["layers.2.up_proj.B.qa"])
    assert torch.equal(merged["layers.2.up_proj.B.code"], full.tensors["layers.2.up_proj.B.code"])
    no_router = AdapterSet.create(make_spec("flat", router=False), plain_model.config)
    with pytest.raises(ValueError, match="has no router; name one of its tasks"):
        AdapterBatch({"flat": no_router}, [AdapterChoice("flat", None)])
    bad = AdapterWeights(spec, dict(full.tensors))
    bad.tensors["layers.0.q_proj.A"] = torch.zeros(3, 64)
    with pytest.raises(
        ValueError, match=r"layers.0.q_proj.A has shape \[3, 64\], expected \[4, 64\]"
    ):
        AdapterSet.from_weights(bad, plain_model.config)


def test_weights_round_trip_through_files_and_parts(tmp_path: Path) -> None:
    spec = make_spec()
    weights = trained(spec, seed=4).weights()
    loaded = AdapterWeights.load(weights.save(tmp_path / "a"))
    assert loaded.spec == spec
    assert all(torch.equal(loaded.tensors[n], t) for n, t in weights.tensors.items())
    parts = weights.split()
    assert sorted(parts) == sorted(spec.part_names())
    assert set(parts["B/qa/2"]) == {
        f"layers.1.{m}.B.qa" for m in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    joined = AdapterWeights.join(spec, parts.values())
    assert set(joined.tensors) == set(weights.tensors)
    plan = PruningPlan.from_dropped(4, attention=[0], ffn=[])
    needed = spec.parts_for_plan(plan, ["qa"], router=False)
    assert "A/0" not in needed and "B/qa/1" in needed and not any("code" in n for n in needed)
    assert len(spec.parts_for_plan(plan, [], router=True)) == 7 * 5


def test_spec_and_files_reject_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="task name 'Bad Task' is invalid"):
        make_spec(tasks=("Bad Task",))
    with pytest.raises(ValueError, match="task names repeat"):
        make_spec(tasks=("a", "a"))
    with pytest.raises(ValueError, match="unknown module 'lm_head'"):
        AdapterSpec("x", "tiny", 4, 4, 8.0, ("lm_head",), ("a",))
    with pytest.raises(FileNotFoundError, match=r"adapter\.json is missing"):
        AdapterWeights.load(tmp_path)
    incomplete = AdapterWeights(make_spec(), {})
    with pytest.raises(ValueError, match="lacks"):
        incomplete.save(tmp_path / "x")


def test_accountant_counts_shared_adapter_tensors_once(plain_model: ElasticLlama) -> None:
    weights = trained(make_spec(), seed=6).weights()
    adapters = AdapterSet.from_weights(weights, plain_model.config)
    only_cache = account(plain_model, adapters=weights.tensors.values()).adapter_bytes
    assert only_cache == weights.nbytes
    report = account(plain_model, adapters=[*weights.tensors.values(), *adapters.parameters()])
    # A and the routers share the cache's storage; the stacked heads are a copy.
    stacked = sum(
        m.B.numel() * m.B.element_size() for m in adapters.modules() if isinstance(m, AsymLoRA)
    )
    assert report.adapter_bytes == only_cache + stacked
    assert report.total_bytes == report.weight_bytes + report.adapter_bytes
