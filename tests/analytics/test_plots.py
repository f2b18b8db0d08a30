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


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plot functions draw, kept (still open) for inspection."""
    import matplotlib.pyplot as plt

    kept = []

    def keep(fig, path):
        kept.append(fig)
        fig.savefig(path)
        return str(path)

    monkeypatch.setattr(plots, "_save", keep)
    yield kept
    for fig in kept:
        plt.close(fig)


def test_similarity_heatmap_masks_the_diagonal(phi3_setup, figures, tmp_path):
    """the 1.0 diagonal set the colour scale, squeezing off-diagonal values of 0.06-0.23 into one dark
    colour. The diagonal is masked and the scale ends at the largest off-diagonal value."""
    cmp = compare_gks(phi3_setup.task, phi3_setup.general)
    plots.plot_similarity(cmp.after, tmp_path / "s.png", cmp.before)
    images = [im for ax in figures[0].axes for im in ax.get_images()]
    assert len(images) == 2
    e = len(cmp.after.expert_names)
    off = ~torch.eye(e, dtype=torch.bool)
    largest = max(float(s.mean_similarity_matrix()[off].max()) for s in (cmp.before, cmp.after))
    for im in images:
        data = im.get_array()
        assert data.mask.tolist() == (~off).tolist(), "only the diagonal is masked"
        assert im.norm.vmax == pytest.approx(largest) and largest < 0.9


def test_entropy_lines_are_distinguishable(phi3_setup, lib, figures, tmp_path):
    """every module kind was drawn with the same marker and line style at the same x, so one line could
    hide another exactly. Each kind now has its own marker and line style, and its own x offset."""
    model = patch_model(phi3_setup.fresh(), lib)
    with torch.no_grad(), record_routing(model, lib.expert_names) as stats:
        model(phi3_setup.ids)
    plots.plot_routing_entropy(stats, tmp_path / "e.png")
    for ax in figures[0].axes:
        lines = [ln for ln in ax.get_lines() if ln.get_label() in stats.kinds]
        assert len(lines) == len(stats.kinds) == 4
        assert len({(ln.get_marker(), ln.get_linestyle()) for ln in lines}) == 4
        assert len({tuple(ln.get_xdata()) for ln in lines}) == 4


@pytest.mark.parametrize("note", ["phi2 tiny", " — random tokens, random model"])
def test_title_note_goes_on_its_own_line(phi3_setup, lib, figures, tmp_path, note):
    """the note was glued to the title ("top-2)phi2 tiny") unless the caller added a separator."""
    model = patch_model(phi3_setup.fresh(), lib, top_k=2)
    with torch.no_grad(), record_routing(model, lib.expert_names) as stats:
        model(phi3_setup.ids)
    plots.plot_routing_entropy(stats, tmp_path / "e.png", note)
    plots.plot_expert_usage(stats, tmp_path / "u.png", note)
    plots.plot_gks_routing(stats, stats, tmp_path / "g.png", note)
    clean = note.strip(" —")
    for fig in figures:
        title = fig._suptitle.get_text()
        assert title.endswith(f"top-2)\n{clean}"), title


def test_readme_shows_how_to_plot_your_own_model(phi3_setup, lib, tmp_path, monkeypatch):
    """plotting the routing of one's own model was undocumented. The README's example runs as written
    (with a tiny model standing in for yours) and writes the plots it names."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Plotting the routing of your own model", 1)
    assert len(section) == 2, "README has no 'Plotting the routing of your own model' section"
    code = re.search(r"```python\n(.*?)```", section[1], re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ids = phi3_setup.ids
    namespace = {"model": phi3_setup.fresh(), "lib": lib, "batches": [{"input_ids": ids}, {"input_ids": ids[:, :5]}]}
    exec(compile(code, "README.md", "exec"), namespace)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written and all(_is_png(tmp_path / name) for name in written), written
    assert {"expert_usage.png", "routing_entropy.png", "prototype_similarity.png"} <= set(written)
