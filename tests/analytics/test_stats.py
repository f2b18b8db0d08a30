"""Library statistics: prototype similarity, ΔW spectra, before/after GKS."""

import json
import warnings

import pytest
import torch

from genknowsub_fast import LoraLibrary, ModuleExperts
from genknowsub_fast.analytics import (
    compare_gks,
    delta_spectra,
    layer_index,
    library_stats,
    mean_off_diagonal,
    prototype_similarity,
)
from tests.tolerances import FLOAT64_ALGEBRA, FLOAT64_EXACT


@pytest.fixture(scope="module")
def lib(phi3_setup):
    return LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general, gks="param")


def test_similarity_matches_direct_computation(lib):
    stats = library_stats(lib)
    assert list(stats.modules) == list(lib.modules)
    for path, m in lib.modules.items():
        sim = stats.modules[path].similarity
        p = m.prototypes.double()
        p = p / p.norm(dim=1, keepdim=True)
        torch.testing.assert_close(sim, (p @ p.T).abs(), atol=FLOAT64_EXACT, rtol=0)
        assert torch.equal(sim, sim.T)
        assert torch.equal(sim.diagonal(), torch.ones(lib.num_experts, dtype=torch.float64))
        assert stats.modules[path].mean_similarity == pytest.approx(mean_off_diagonal(sim))


def test_zero_expert_gets_zero_row_and_column():
    protos = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.6, -0.8, 0.0]])
    sim = prototype_similarity(protos)
    assert torch.equal(sim[1], torch.zeros(3, dtype=torch.float64)) and torch.equal(sim[:, 1], sim[1])
    assert sim[0, 0] == 1 and sim[2, 2] == 1 and sim[0, 2] == pytest.approx(0.6)


@pytest.mark.parametrize("gks", ["param", "delta"])
def test_spectra_equal_svdvals_of_scaled_delta(phi3_setup, gks):
    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general, gks=gks)
    stats = library_stats(lib, top=None)
    for path, m in lib.modules.items():
        dw = m.scaling.double().view(-1, 1, 1) * (m.b.double() @ m.a.double())  # (E, d_out, d_in)
        want = torch.linalg.svdvals(dw)[:, : stats.modules[path].spectra.shape[1]]
        torch.testing.assert_close(stats.modules[path].spectra, want, **FLOAT64_ALGEBRA)


def test_spectra_of_mixed_ranks_and_zero_expert():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 10, generator=g, dtype=torch.float64)
    b = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    a[1, 2:] = 0  # rank 2, zero-padded
    b[1, :, 2:] = 0
    a[2] = 0  # ΔW = 0
    experts = ModuleExperts(a, b, torch.tensor([2.0, 0.5, 1.0]), torch.zeros(3, 10), torch.tensor([4, 2, 4]))
    sv = delta_spectra(experts, top=3)
    assert sv.shape == (3, 3)
    for e, s in enumerate((2.0, 0.5, 1.0)):
        torch.testing.assert_close(sv[e], torch.linalg.svdvals(s * b[e] @ a[e])[:3], **FLOAT64_ALGEBRA)
    assert sv[1, 2] == pytest.approx(0, abs=FLOAT64_EXACT) and torch.all(sv[2] == 0)


def test_compare_gks_before_and_after(phi3_setup, lib):
    cmp = compare_gks(phi3_setup.task, phi3_setup.general)
    assert cmp.before.gks is None and cmp.after.gks == "param"
    assert cmp.after.general_names == lib.general_names
    for path, m in cmp.after.modules.items():
        torch.testing.assert_close(m.similarity, library_stats(lib).modules[path].similarity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = LoraLibrary.from_adapters(phi3_setup.task)
    torch.testing.assert_close(cmp.before.modules[path].similarity, library_stats(plain).modules[path].similarity)
    # The synthetic tasks share the general adapters' mean; subtracting it makes the prototypes more distinct.
    assert cmp.after.mean_similarity < cmp.before.mean_similarity
    text = cmp.table()
    assert "before" in text and "after" in text and "all modules" in text
    json.dumps(cmp.to_dict())
    with pytest.raises(ValueError, match="general adapter"):
        compare_gks(phi3_setup.task, [])


def test_stats_table_and_dict(lib):
    stats = library_stats(lib, top=2)
    assert all(m.spectra.shape == (lib.num_experts, 2) for m in stats.modules.values())
    text = stats.table()
    assert "mean|cos|" in text and "model.layers.1.mlp.down_proj" in text
    d = json.loads(json.dumps(stats.to_dict()))
    assert d["expert_names"] == lib.expert_names and len(d["modules"]) == len(lib.modules)


def test_layer_index():
    assert layer_index("model.layers.17.mlp.down_proj") == 17
    assert layer_index("transformer.h.3.attn") == 3
    assert layer_index("lm_head") is None
