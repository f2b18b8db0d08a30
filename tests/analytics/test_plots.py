"""PNG plots: files are written, and a missing matplotlib is a clear error naming the `plot` extra."""

import sys

import pytest
import torch

from genknowsub_fast import LoraLibrary, patch_model, patched_layers
from genknowsub_fast.analytics import compare_gks, library_stats, plots, record_routing

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG


@pytest.fixture(scope="module")
def lib(phi3_setup):
    return LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)


def test_similarity_plots(phi3_setup, lib, tmp_path):
    cmp = compare_gks(phi3_setup.task, phi3_setup.general)
    both = plots.plot_similarity(cmp.after, tmp_path / "both.png", cmp.before)
    after = plots.plot_similarity(library_stats(lib), tmp_path / "sub" / "after.png", kind="qkv_proj")
    assert _is_png(both) and _is_png(after)


def test_routing_plots(phi3_setup, lib, tmp_path):
    model = patch_model(phi3_setup.fresh(), lib)
    with torch.no_grad(), record_routing(model, lib.expert_names) as stats:
        model(phi3_setup.ids)
    assert _is_png(plots.plot_expert_usage(stats, tmp_path / "usage.png"))
    assert _is_png(plots.plot_routing_entropy(stats, tmp_path / "entropy.png"))
    empty = type(stats)()
    with pytest.raises(ValueError, match="no routing recorded"):
        plots.plot_expert_usage(empty, tmp_path / "x.png")


def test_write_demo_plots(phi3_setup, lib, tmp_path):
    model = patch_model(phi3_setup.fresh(), lib)
    paths = plots.write_demo_plots(lib, model, tmp_path, phi3_setup.task, phi3_setup.general, tokens=16)
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["expert_usage.png", "prototype_similarity.png", "routing_entropy.png", "routing_gks.png"]
    assert all(_is_png(p) for p in paths)
    assert all(layer.recorder is None for layer in patched_layers(model).values())


def test_missing_matplotlib_names_the_plot_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"genknowsub-fast\[plot\]"):
        plots._pyplot()
