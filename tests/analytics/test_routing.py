"""Routing capture on a patched model through the public recorder hook."""

import json
import math

import pytest
import torch

from genknowsub_fast import LoraLibrary, patch_model, patched_layers, reference
from genknowsub_fast.analytics import record_routing
from tests.tolerances import FLOAT64_EXACT, FP32_SAME_MATH


@pytest.fixture(scope="module")
def lib(phi3_setup):
    return LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general, gks="param")


def test_routing_counts_match_direct_routing(phi3_setup, lib):
    model = patch_model(phi3_setup.fresh(), lib, top_k=3)
    seen = {}
    handles = [
        layer.module.register_forward_pre_hook(lambda _m, args, p=layer.name: seen.__setitem__(p, args[0]))
        for layer in patched_layers(model).values()
    ]
    with torch.no_grad(), record_routing(model, lib.expert_names) as stats:
        model(phi3_setup.ids)
    for h in handles:
        h.remove()
    tokens = phi3_setup.ids.numel()
    assert set(stats.modules) == set(lib.modules)
    for path, m in stats.modules.items():
        assert m.tokens == tokens
        assert int(m.counts.sum()) == tokens * 3 and int(m.top1_counts.sum()) == tokens
        x = seen[path].reshape(-1, seen[path].shape[-1])
        w, idx = reference.route(x, lib.modules[path].prototypes, 3, 1.0)
        w = w.double()
        assert torch.equal(m.counts, torch.bincount(idx.flatten(), minlength=lib.num_experts))
        assert m.mean_top1_weight == pytest.approx(float(w[:, 0].mean()), rel=FP32_SAME_MATH["rtol"])
        h = -(w * w.log()).sum(-1).mean()
        assert m.mean_entropy == pytest.approx(float(h), rel=FP32_SAME_MATH["rtol"])
        assert 0 <= m.mean_entropy <= math.log(3) + FLOAT64_EXACT
        torch.testing.assert_close(m.usage.sum(), torch.tensor(1.0, dtype=torch.float64))
    layers, usage = stats.usage_matrix("qkv_proj")
    assert layers == [0, 1] and usage.shape == (2, lib.num_experts)
    assert "tokens" in stats.table()
    json.dumps(stats.to_dict())


def test_table_columns_tell_the_experts_apart_and_line_up():
    """Default names ("expert_0", ...) used to be cut to 7 characters ("expert_") and the usage columns sat 8
    characters right of their headings."""
    from genknowsub_fast.analytics.routing import ModuleRouting, RoutingStats

    stats = RoutingStats()
    path = "model.layers.0.mlp.down_proj"
    stats.modules[path] = ModuleRouting(path, 2, 1.0, torch.tensor([2, 1, 1]), torch.tensor([2, 0, 0]), 2, 1.2, 1.3)
    lines = stats.table().splitlines()
    header, row = lines[1], lines[2]
    names = header.split()[-3:]
    assert len(set(names)) == 3 and all(n.startswith("expert") for n in names)
    for name, value in zip(names, ["50.0", "25.0", "25.0"]):
        assert header.index(name) + len(name) == row.index(value, header.index(name)) + len(value)  # right-aligned


def test_recording_leaves_outputs_unchanged(phi3_setup, lib):
    model = patch_model(phi3_setup.fresh(), lib, top_k=2)
    with torch.no_grad():
        off = model(phi3_setup.ids).logits
        with record_routing(model) as stats:
            on = model(phi3_setup.ids).logits
            model(phi3_setup.ids[:, :5])  # accumulates
        after = model(phi3_setup.ids).logits
    assert torch.equal(off, on) and torch.equal(off, after)
    assert all(layer.recorder is None for layer in patched_layers(model).values())
    m = next(iter(stats.modules.values()))
    assert m.tokens == phi3_setup.ids.numel() + 2 * 5
    assert stats.names(lib.num_experts) == [f"expert_{i}" for i in range(lib.num_experts)]


def test_record_routing_errors(phi3_setup, lib):
    with pytest.raises(ValueError, match="patched"), record_routing(phi3_setup.fresh()):
        pass
    model = patch_model(phi3_setup.fresh(), lib)
    with record_routing(model), pytest.raises(ValueError, match="already"), record_routing(model):
        pass
    with pytest.raises(RuntimeError), record_routing(model):
        raise RuntimeError("boom")
    assert all(layer.recorder is None for layer in patched_layers(model).values())


def test_continuing_a_recording_with_other_routing_options_is_refused(phi3_setup, lib):
    """re-patching with another top_k and passing the old stats on mixed two routings' counts (the
    entropy / log k column then read 1.36). Continuing with the same options still accumulates."""
    from genknowsub_fast import unpatch_model

    model = patch_model(phi3_setup.fresh(), lib, top_k=2)
    with torch.no_grad(), record_routing(model) as stats:
        model(phi3_setup.ids)
    with torch.no_grad(), record_routing(model, stats=stats):
        model(phi3_setup.ids)
    assert next(iter(stats.modules.values())).tokens == 2 * phi3_setup.ids.numel()
    for options in ({"top_k": 3}, {"top_k": 2, "temperature": 0.5}):
        patch_model(unpatch_model(model), lib, **options)
        with pytest.raises(ValueError, match="start a new recording"), record_routing(model, stats=stats):
            pass
    assert all(m.top_k == 2 and m.temperature == 1.0 for m in stats.modules.values())
    assert all(layer.recorder is None for layer in patched_layers(model).values())


def test_only_the_recording_thread_is_counted(phi3_setup, lib):
    """while one thread recorded, another thread running the same model had its tokens counted too."""
    import threading

    model = patch_model(phi3_setup.fresh(), lib, top_k=2)
    other_ids = phi3_setup.ids[:, :7]
    with torch.no_grad(), record_routing(model) as stats:
        worker = threading.Thread(target=lambda: model(other_ids))
        worker.start()
        worker.join()
        model(phi3_setup.ids)
    assert {m.tokens for m in stats.modules.values()} == {phi3_setup.ids.numel()}
