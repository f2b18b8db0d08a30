"""PNG plots of routing analytics (matplotlib, Agg backend; install with ``pip install 'genknowsub-fast[plot]'``).

- :func:`plot_similarity`: prototype |cos| heatmaps, averaged over modules, after GenKnowSub (and before, if known);
- :func:`plot_expert_usage`: share of the selections per expert, layers × experts, one panel per module kind;
- :func:`plot_routing_entropy`: mean routing entropy and mean top-1 weight per layer, one line per module kind;
- :func:`plot_gks_routing`: the same two figures without vs with GenKnowSub, per module kind;
- :func:`write_demo_plots`: all three for the demo's library and patched model.

Each routing plot takes a ``title_note`` (what was routed, e.g. ``"my eval set"``), shown on its own line under the
title. matplotlib is imported only when a plot is drawn. README, "Plotting the routing of your own model", shows
how to plot the routing of your own model.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence

import torch

from ..patching import patch_model, patched_layers, unpatch_model
from .routing import RoutingStats, record_routing
from .stats import GksComparison, LibraryStats, compare_gks, library_stats

__all__ = [
    "plot_expert_usage",
    "plot_gks_routing",
    "plot_routing_entropy",
    "plot_similarity",
    "routing_without_gks",
    "write_demo_plots",
]


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", "-.", ":")


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "plots need matplotlib: install the 'plot' extra (pip install 'genknowsub-fast[plot]')"
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _title(main: str, note: str = "") -> str:
    """The figure title, with the caller's note on a line of its own (never glued to the main title)."""
    note = note.strip().lstrip("—-–,;: ").strip()
    return f"{main}\n{note}" if note else main


def _expert_ticks(ax, names: Sequence[str], x: bool = True, y: bool = True) -> None:
    pos = list(range(len(names)))
    rotate = max((len(n) for n in names), default=0) > 3
    if x:
        ax.set_xticks(pos)
        ax.set_xticklabels(names, rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    if y:
        ax.set_yticks(pos)
        ax.set_yticklabels(names, fontsize=8)


def plot_similarity(
    after: LibraryStats, path: str | os.PathLike, before: LibraryStats | None = None, kind: str | None = None
) -> str:
    """Heatmap(s) of the prototype |cos| matrix averaged over the library's modules (or the modules named ``kind``).

    With ``before`` (the same experts without GenKnowSub, e.g. from :func:`genknowsub_fast.analytics.compare_gks`)
    the two heatmaps sit side by side on one colour scale; without it only "after" is drawn and the title says why.
    The diagonal (|cos| = 1 of every prototype with itself) is masked and drawn grey, so that the colour scale spans
    the off-diagonal values only (with it, off-diagonal values of 0.06-0.23 all got one dark colour).
    """
    plt = _pyplot()
    panels = [("before GenKnowSub", before), ("after GenKnowSub", after)] if before is not None else []
    if not panels:
        label = "after GenKnowSub" if after.gks else "no GenKnowSub"
        panels = [(label, after)]
    names = after.expert_names
    e = len(names)
    cell = 0.5 if e <= 12 else max(0.18, 6.0 / e)
    side = max(3.2, cell * e + 1.4)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(side * len(panels) + 1.4, side + 1.0), squeeze=False, layout="constrained"
    )
    import numpy as np

    mats = [stats.mean_similarity_matrix(kind).numpy() for _, stats in panels]
    off_diag = ~np.eye(e, dtype=bool)
    vmax = max((float(m[off_diag].max()) for m in mats if e > 1), default=1.0) or 1.0
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    im = None
    for i_ax, (ax, (label, stats), mat) in enumerate(zip(axes[0], panels, mats)):
        im = ax.imshow(np.ma.masked_array(mat, mask=~off_diag), vmin=0.0, vmax=vmax, cmap=cmap)
        _expert_ticks(ax, names if e <= 40 else [""] * e, y=i_ax == 0)
        if i_ax:
            ax.set_yticks(list(range(e)) if e <= 40 else [])
            ax.set_yticklabels([])
        else:
            ax.set_ylabel("expert")
        ax.set_xlabel("expert")
        off = stats.mean_similarity if kind is None else _mean_off(mat)
        ax.set_title(f"{label}\nmean off-diagonal |cos| = {off:.3f}", fontsize=10)
        if e <= 12:
            for i in range(e):
                for j in range(e):
                    if i == j:
                        continue
                    colour = "black" if mat[i, j] > 0.6 * vmax else "white"
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="|cos| between prototypes (diagonal = 1, grey)")
    scope = f"{kind} modules" if kind else f"all {len(after.modules)} modules"
    title = f"Arrow prototype similarity (mean over {scope})"
    if before is None and after.gks:
        title += "\n(pre-GenKnowSub adapters unknown: 'after' only)"
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _mean_off(mat) -> float:
    e = mat.shape[0]
    return float((mat.sum() - mat.trace()) / (e * (e - 1))) if e > 1 else float("nan")


def plot_expert_usage(stats: RoutingStats, path: str | os.PathLike, title_note: str = "") -> str:
    """Heatmaps of the selection share per expert (x) and layer (y), one panel per module kind, shared colour bar."""
    plt = _pyplot()
    kinds = stats.kinds
    if not kinds:
        raise ValueError("no routing recorded: run the model inside record_routing(model) first")
    e = next(iter(stats.modules.values())).counts.numel()
    names = stats.names(e)
    mats = [stats.usage_matrix(k) for k in kinds]
    n_layers = max(len(layers) for layers, _ in mats)
    vmax = max(float(m.max()) for _, m in mats) or 1.0
    width = max(2.6, 0.42 * e + 1.0)
    height = max(2.4, 0.28 * n_layers + 1.6)
    cols = min(len(kinds), 4)
    rows = math.ceil(len(kinds) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols + 1.2, height * rows + 0.8), squeeze=False, layout="constrained"
    )
    im = None
    for i_ax, (ax, kind, (layers, mat)) in enumerate(zip(axes.flat, kinds, mats)):
        im = ax.imshow(mat.numpy(), vmin=0.0, vmax=vmax, cmap="magma", aspect="auto")
        _expert_ticks(ax, names if e <= 40 else [""] * e, y=False)
        step = max(1, len(layers) // 16)
        ax.set_yticks(list(range(0, len(layers), step)))
        ax.set_yticklabels([str(layers[i]) for i in range(0, len(layers), step)], fontsize=8)
        ax.set_xlabel("expert")
        if i_ax % cols == 0:
            ax.set_ylabel("layer")
        ax.set_title(kind, fontsize=10)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    fig.colorbar(im, ax=list(axes.flat), shrink=0.8, label="share of top-k selections")
    tokens = next(iter(stats.modules.values())).tokens
    k = next(iter(stats.modules.values())).top_k
    fig.suptitle(_title(f"Expert usage per layer ({tokens} tokens, top-{k})", title_note), fontsize=11)
    return _save(fig, path)


def plot_routing_entropy(stats: RoutingStats, path: str | os.PathLike, title_note: str = "") -> str:
    """Mean routing entropy (left) and mean top-1 weight (right) per layer, one line per module kind.

    Module kinds often route alike, so each line has its own colour, line style and hollow marker of its own size,
    and the kinds are shifted slightly apart along the layer axis: a line lying on another stays visible.
    """
    plt = _pyplot()
    if not stats.modules:
        raise ValueError("no routing recorded: run the model inside record_routing(model) first")
    k = next(iter(stats.modules.values())).top_k
    fig, (ax_h, ax_w) = plt.subplots(1, 2, figsize=(10, 4.0), layout="constrained")
    kinds = stats.kinds
    for i, kind in enumerate(kinds):
        layers, h = stats.per_layer("mean_entropy", kind)
        _, w = stats.per_layer("mean_top1_weight", kind)
        shift = 0.08 * (i - (len(kinds) - 1) / 2)
        xs = [(-1 if layer is None else layer) + shift for layer in layers]
        style = {
            "marker": _MARKERS[i % len(_MARKERS)],
            "markersize": 9 - 1.5 * (i % 4),
            "markerfacecolor": "none",
            "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
            "linewidth": 1.4,
            "label": kind,
        }
        ax_h.plot(xs, h, **style)
        ax_w.plot(xs, w, **style)
    if k > 1:
        ax_h.axhline(math.log(k), color="grey", ls=(0, (6, 3)), lw=1)
    ax_w.axhline(1.0 / k, color="grey", ls=(0, (6, 3)), lw=1, label=f"uniform weights (log {k} / 1/{k})")
    for ax, ylabel, title in (
        (ax_h, "entropy of the k weights (nats)", "Routing entropy (lower = more decisive)"),
        (ax_w, "mean top-1 weight", "Weight of the first expert"),
    ):
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.margins(y=0.1)
    # One legend below both panels, outside the data, so that it never covers a line.
    fig.legend(*ax_w.get_legend_handles_labels(), loc="outside lower center", ncols=min(len(kinds) + 1, 5), fontsize=8)
    fig.suptitle(_title(f"Routing decisiveness per layer (top-{k})", title_note), fontsize=11)
    return _save(fig, path)


def plot_gks_routing(before: RoutingStats, after: RoutingStats, path: str | os.PathLike, title_note: str = "") -> str:
    """Bars per module kind: mean routing entropy and mean top-1 weight without and with GenKnowSub."""
    plt = _pyplot()
    if not before.modules or not after.modules:
        raise ValueError("no routing recorded: run the model inside record_routing(model) first")
    kinds = after.kinds
    k = next(iter(after.modules.values())).top_k
    fig, (ax_h, ax_w) = plt.subplots(1, 2, figsize=(max(9.0, 1.2 * len(kinds) * 2 + 1), 4.0), layout="constrained")
    xs = list(range(len(kinds)))
    width = 0.38
    for ax, attr, ylabel, ref, ref_label in (
        (ax_h, "mean_entropy", "entropy of the k weights (nats)", math.log(k) if k > 1 else None, f"log {k}"),
        (ax_w, "mean_top1_weight", "mean top-1 weight", 1.0 / k, f"1/{k}"),
    ):
        top = ref or 0.0
        for shift, (label, stats, colour) in zip(
            (-width / 2, width / 2), (("before GKS", before, "tab:grey"), ("after GKS", after, "tab:blue"))
        ):
            vals: list[float] = []
            for kind in kinds:
                _, per_layer = stats.per_layer(attr, kind)
                vals.append(sum(per_layer) / len(per_layer) if per_layer else float("nan"))
            bars = ax.bar([x + shift for x in xs], vals, width, label=label, color=colour)
            ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
            top = max([top, *[v for v in vals if v == v]])
        if ref is not None:
            ax.axhline(ref, color="black", ls="--", lw=1, label=f"{ref_label} (uniform)")
        ax.set_xticks(xs)
        ax.set_xticklabels(kinds, fontsize=8, rotation=30 if len(kinds) > 4 else 0)
        ax.set_xlabel("module (mean over layers)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.3 * top)
        ax.legend(fontsize=7, loc="upper center", ncols=3)
        ax.grid(axis="y", alpha=0.3)
    ax_h.set_title("Routing entropy (lower = more decisive)", fontsize=10)
    ax_w.set_title("Weight of the first expert", fontsize=10)
    fig.suptitle(_title(f"Routing without vs with GenKnowSub (top-{k})", title_note), fontsize=11)
    return _save(fig, path)


def write_demo_plots(
    lib,
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    task_dirs: Sequence[str | os.PathLike] | None = None,
    general_dirs: Sequence[str | os.PathLike] | None = None,
    tokens: int = 128,
    seed: int = 0,
) -> list[str]:
    """Write the similarity (before/after GenKnowSub when ``general_dirs`` are given), usage and entropy plots, and
    with ``general_dirs`` the routing of the same tokens without vs with GenKnowSub (``routing_gks.png``).

    ``model`` is patched with ``lib``; its routing is recorded on ``tokens`` random token ids (the demo's models are
    random, so there is no text to feed). Returns the paths written.
    """
    out_dir = os.fspath(out_dir)
    paths = []
    cmp: GksComparison | None = None
    if task_dirs and general_dirs:
        cmp = compare_gks(task_dirs, general_dirs, gks=lib.gks or "param")
        paths.append(plot_similarity(cmp.after, os.path.join(out_dir, "prototype_similarity.png"), cmp.before))
    else:
        paths.append(plot_similarity(library_stats(lib), os.path.join(out_dir, "prototype_similarity.png")))
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(min(3, vocab - 1), vocab, (1, tokens), generator=gen)
        ids = ids.to(next(model.parameters()).device)
        with torch.no_grad(), record_routing(model, lib.expert_names) as stats:
            model(ids)
        note = "random tokens, random model"
        paths.append(plot_expert_usage(stats, os.path.join(out_dir, "expert_usage.png"), note))
        paths.append(plot_routing_entropy(stats, os.path.join(out_dir, "routing_entropy.png"), note))
        if cmp is not None:
            before = routing_without_gks(model, cmp.before_library, ids)
            paths.append(plot_gks_routing(before, stats, os.path.join(out_dir, "routing_gks.png"), note))
    return paths


def routing_without_gks(model: torch.nn.Module, before_library, ids: torch.Tensor) -> RoutingStats:
    """Routing of ``ids`` through a copy of the patched ``model`` re-patched with ``before_library`` (same top-k and
    temperature); ``model`` itself is not touched."""
    layer = next(iter(patched_layers(model).values()))
    other = unpatch_model(copy.deepcopy(model))
    patch_model(other, before_library, **layer.options)
    with torch.no_grad(), record_routing(other, before_library.expert_names) as stats:
        other(ids)
    return stats
