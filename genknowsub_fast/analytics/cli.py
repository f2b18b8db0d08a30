"""``genknowsub-fast inspect LIB.safetensors``: expert similarity, ΔW spectra and routing of a library.

Registered as a subcommand by :mod:`genknowsub_fast.cli` (``add_arguments`` and ``run``).

What runs the routing: no model hub is reachable here, so ``--model`` builds a *randomly initialised* Phi-3 of one of
:data:`genknowsub_fast.synthetic.PHI3_SIZES` (``auto``: the size whose hidden size and layer count fit the library)
and patches it with the library. Text from ``--text-file`` becomes token ids by a byte-level mapping (each UTF-8 byte
``b`` → id ``b mod vocab``), not by a real tokenizer; without a text file the ids are random. The routing figures
therefore show how the library's prototypes split the hidden states of a random model, which is useful to compare
libraries (e.g. with and without GenKnowSub) but is not the routing of the real base model on real text.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

_NO_MODEL = "none"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``genknowsub-fast inspect``."""
    from ..synthetic import PHI3_SIZES

    p.add_argument("library", help="library file written by `build` or LoraLibrary.save")
    p.add_argument(
        "--model",
        choices=("auto", _NO_MODEL, *PHI3_SIZES),
        default="auto",
        help="random synthetic Phi-3 to route tokens through (auto: the size matching the library; none: no routing)",
    )
    p.add_argument("--text-file", default=None, help="text whose UTF-8 bytes become token ids (byte mod vocab)")
    p.add_argument("--tokens", type=int, default=256, help="number of tokens routed (default 256)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default: the library's, else 3)")
    p.add_argument("--temperature", type=float, default=None, help="router temperature (default: the library's)")
    p.add_argument("--task", nargs="+", default=None, metavar="DIR", help="task adapters, for a before/after GKS view")
    p.add_argument("--general", nargs="+", default=None, metavar="DIR", help="general adapters subtracted by GKS")
    p.add_argument("--out", default=None, metavar="DIR", help="directory for the PNG plots and stats.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the random model and the random tokens")


def _pick_size(lib) -> str | None:
    """The synthetic Phi-3 size whose hidden size and module paths fit the library, or None."""
    from ..synthetic import PHI3_SIZES
    from .common import layer_index

    layers = [layer_index(p) for p in lib.modules]
    n_layers = max((x for x in layers if x is not None), default=-1) + 1
    d_ins = {p.rsplit(".", 1)[-1]: m.d_in for p, m in lib.modules.items()}
    hidden = d_ins.get("qkv_proj", d_ins.get("o_proj", d_ins.get("gate_up_proj")))
    for name, (h, inter, n, _heads, _vocab) in PHI3_SIZES.items():
        if hidden == h and n_layers <= n and d_ins.get("down_proj", inter) == inter:
            return name
    return None


def _token_ids(args, vocab: int):
    import torch

    if args.tokens < 1:
        raise ValueError(f"--tokens must be ≥ 1, got {args.tokens}")
    if args.text_file is None:
        gen = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, vocab, (1, args.tokens), generator=gen), f"{args.tokens} random token ids"
    if not os.path.isfile(args.text_file):
        raise ValueError(f"text file {args.text_file!r} does not exist")
    with open(args.text_file, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError(f"text file {args.text_file!r} is empty")
    ids = torch.tensor(list(data[: args.tokens]), dtype=torch.int64) % vocab
    return ids[None], f"{ids.numel()} bytes of {os.path.basename(args.text_file)} (byte mod {vocab}; no tokenizer)"


def run(args: argparse.Namespace) -> int:
    """Run ``genknowsub-fast inspect``; returns the exit code."""
    import torch

    from ..library import LoraLibrary
    from .routing import record_routing
    from .stats import compare_gks, library_stats

    lib = LoraLibrary.load(args.library)
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} exists and is not a directory")
    if (args.task is None) != (args.general is None):
        raise ValueError("--task and --general go together (both are needed for the before/after GKS view)")
    if args.text_file is not None and not os.path.isfile(args.text_file):
        raise ValueError(f"text file {args.text_file!r} does not exist")
    print(repr(lib))

    comparison = None
    if args.task is not None:
        comparison = compare_gks(args.task, args.general, gks=lib.gks or "param")
        after = comparison.after
        if after.expert_names != lib.expert_names:
            raise ValueError(f"--task adapters are {after.expert_names}, the library has {lib.expert_names}")
        print("\n" + comparison.table())
    else:
        after = library_stats(lib)
        print("\n" + after.table())
        if lib.gks:
            print(
                "(the library file keeps only the experts after GenKnowSub; pass --task and --general to compare "
                "with the experts before it)"
            )

    routing = routing_before = None
    size = _pick_size(lib) if args.model == "auto" else args.model
    if args.model == "auto" and size is None:
        print("\nno synthetic Phi-3 size matches this library's modules: routing not measured (use --model SIZE)")
    elif size != _NO_MODEL:
        from ..patching import patch_model
        from ..synthetic import make_phi3

        model = make_phi3(size, seed=args.seed)
        ids, what = _token_ids(args, model.config.vocab_size)
        top_k = args.top_k if args.top_k is not None else min(int(lib.routing.get("top_k", 3)), lib.num_experts)
        patch_model(model, lib, top_k=top_k, temperature=args.temperature)
        with warnings.catch_warnings(), torch.no_grad(), record_routing(model, lib.expert_names) as routing:
            warnings.simplefilter("ignore")
            model(ids)
        print(f"\nrouting of {what} through a random Phi-3 '{size}' (top-{top_k}):")
        print(routing.table())
        if comparison is not None:
            from .plots import routing_without_gks

            routing_before = routing_without_gks(model, comparison.before_library, ids)
            print("\nsame tokens, experts without GenKnowSub → with it (mean over modules):")
            for attr, label in (("mean_entropy", "routing entropy (nats)"), ("mean_top1_weight", "top-1 weight")):
                b, a = (_mean_attr(r, attr) for r in (routing_before, routing))
                print(f"  {label:<23} {b:.4f} → {a:.4f} ({a - b:+.4f})")

    if args.out is not None:
        try:
            from . import plots

            plots._pyplot()
        except ImportError as exc:  # reported like any other bad input: one line, exit code 2
            raise ValueError(str(exc)) from exc
        os.makedirs(args.out, exist_ok=True)
        written = [
            plots.plot_similarity(
                after,
                os.path.join(args.out, "prototype_similarity.png"),
                comparison.before if comparison is not None else None,
            )
        ]
        if routing is not None:
            note = " — random model, " + ("byte-mapped text" if args.text_file else "random tokens")
            written.append(plots.plot_expert_usage(routing, os.path.join(args.out, "expert_usage.png"), note))
            written.append(plots.plot_routing_entropy(routing, os.path.join(args.out, "routing_entropy.png"), note))
            if routing_before is not None:
                gks_png = os.path.join(args.out, "routing_gks.png")
                written.append(plots.plot_gks_routing(routing_before, routing, gks_png, note))
        stats_path = os.path.join(args.out, "stats.json")
        with open(stats_path, "w") as f:
            json.dump(
                {
                    "library": comparison.to_dict() if comparison is not None else after.to_dict(),
                    "routing": routing.to_dict() if routing is not None else None,
                    "routing_without_gks": routing_before.to_dict() if routing_before is not None else None,
                },
                f,
            )
        written.append(stats_path)
        if comparison is None and lib.gks:
            print("\nprototype_similarity.png shows the experts after GenKnowSub only (no pre-GKS adapters given)")
        print("\nwrote " + ", ".join(written))
    return 0


def _mean_attr(stats, attr: str) -> float:
    vals = [getattr(m, attr) for m in stats.modules.values() if m.tokens]
    return sum(vals) / len(vals) if vals else float("nan")
