"""``genknowsub-fast inspect LIB.safetensors``: expert similarity, ΔW spectra and (on request) routing of a library.

Registered as a subcommand by :mod:`genknowsub_fast.cli` (``add_arguments`` and ``run``).

The similarity and spectra come from the library alone. Routing needs a model and inputs, and no model hub is
reachable here, so routing is measured only when ``--model`` asks for it: ``--model SIZE`` (or ``auto``, the size
that fits the library) builds a *randomly initialised* Phi-3 of :data:`genknowsub_fast.synthetic.PHI3_SIZES` and
patches it. What that costs is printed first, and a model that does not fit in the memory left is refused before it
is built. Text from ``--text-file`` becomes token ids by a byte-level mapping (each UTF-8 byte ``b`` → id
``b mod vocab``), not a real tokenizer; without a text file the ids are random. Those routing figures therefore show
how the library's prototypes split the hidden states of a random model, which helps compare libraries (e.g. with and
without GenKnowSub) but is not the routing of the real base model on real text; the output says so. For that, patch
your own model and use :func:`genknowsub_fast.record_routing` and :mod:`genknowsub_fast.analytics.plots` (README,
"Plotting the routing of your own model").

Every argument is checked before any work: numbers while parsing, paths and the library next, then the model's cost.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

from .args import adapter_options, add_adapter_options, positive_float, positive_int

_NO_MODEL = "none"
_HONEST_NOTE = (
    "note: routing of a randomly initialised model on {inputs}: it shows how the library's prototypes split a random "
    "model's hidden states (useful to compare libraries, e.g. with and without GenKnowSub), not how your base model "
    "routes real text; for that, patch your own model and use genknowsub_fast.record_routing (README, 'Plotting the "
    "routing of your own model')"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``genknowsub-fast inspect``."""
    from ..testing import PHI3_SIZES

    p.add_argument("library", help="library file written by `build` or LoraLibrary.save")
    p.add_argument(
        "--model",
        choices=("auto", _NO_MODEL, *PHI3_SIZES),
        default=_NO_MODEL,
        help="measure routing through a RANDOM synthetic Phi-3 of this size (auto: the size that fits the library); "
        "default none: no model is built and no routing measured (the output says what --model would cost)",
    )
    p.add_argument("--text-file", default=None, help="text whose UTF-8 bytes become token ids (byte mod vocab)")
    p.add_argument("--tokens", type=positive_int, default=256, help="number of tokens routed (default 256)")
    p.add_argument(
        "--top-k", type=positive_int, default=None, help="experts per token (default: the library's, else min(3, E))"
    )
    p.add_argument(
        "--temperature", type=positive_float, default=None, help="router temperature (default: the library's, else 1)"
    )
    p.add_argument("--task", nargs="+", default=None, metavar="DIR", help="task adapters, for a before/after GKS view")
    p.add_argument("--general", nargs="+", default=None, metavar="DIR", help="general adapters subtracted by GKS")
    add_adapter_options(p)
    p.add_argument("--out", default=None, metavar="DIR", help="directory for the PNG plots and stats.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the random model and the random tokens")


def _meta_phi3(size: str):
    """A Phi-3 of ``size`` on the meta device: module names and shapes, no memory (0.1 s for phi3-mini)."""
    import torch
    from transformers import Phi3ForCausalLM

    from ..testing import phi3_config

    with torch.device("meta"):
        return Phi3ForCausalLM(phi3_config(size))


def _misfit(lib, size: str) -> str | None:
    """Why the library's modules do not fit a synthetic Phi-3 of ``size`` (None when every one is there, same shape)."""
    from ..patching import layer_shape

    named = dict(_meta_phi3(size).named_modules())
    for path, m in lib.modules.items():
        module = named.get(path)
        if module is None:
            return f"it has no module {path!r}"
        d_in, d_out = layer_shape(module)
        if (d_in, d_out) != (m.d_in, m.d_out):
            return f"its {path} is {d_in}→{d_out}, the library's experts there are {m.d_in}→{m.d_out}"
    return None


def _pick_size(lib) -> str | None:
    """The smallest synthetic Phi-3 size every module of the library fits, or None."""
    from ..testing import PHI3_SIZES

    return next((size for size in PHI3_SIZES if _misfit(lib, size) is None), None)


def _token_ids(args, vocab: int):
    import torch

    if args.text_file is None:
        gen = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, vocab, (1, args.tokens), generator=gen), f"{args.tokens} random token ids"
    with open(args.text_file, "rb") as f:
        data = f.read()
    ids = torch.tensor(list(data[: args.tokens]), dtype=torch.int64) % vocab
    return ids[None], f"{ids.numel()} bytes of {os.path.basename(args.text_file)} (byte mod {vocab}; no tokenizer)"


def _check_inputs(args) -> None:
    """The checks that need neither the library nor a model."""
    if (args.task is None) != (args.general is None):
        raise ValueError("--task and --general go together (both are needed for the before/after GKS view)")
    for d in (args.task or []) + (args.general or []):
        if not os.path.isdir(d):
            raise ValueError(f"adapter directory {d!r} does not exist")
    if args.text_file is not None:
        if not os.path.isfile(args.text_file):
            raise ValueError(f"text file {args.text_file!r} does not exist")
        if os.path.getsize(args.text_file) == 0:
            raise ValueError(f"text file {args.text_file!r} is empty")
        if args.model == _NO_MODEL:
            raise ValueError("--text-file is routed through a model: add --model auto (or a size)")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} exists and is not a directory")
    if args.out is not None:
        try:
            from ..analytics import plots

            plots._pyplot()
        except ImportError as exc:  # reported like any other bad input: one line, exit code 2
            raise ValueError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    """Run ``genknowsub-fast inspect``; returns the exit code."""
    import torch

    from ..analytics.routing import record_routing
    from ..analytics.stats import compare_gks, library_stats
    from ..library import LoraLibrary
    from ..paths import check_output_dir
    from ..testing import check_phi3_fits

    # Everything is checked before any work: arguments, the library file, the model's fit and cost, the output dir.
    _check_inputs(args)
    lib = LoraLibrary.load(args.library)
    options = lib.routing_options(args.top_k, args.temperature)
    size = cost = None
    if args.model == "auto":
        size = _pick_size(lib)
        if size is None:
            raise ValueError(
                "--model auto: no synthetic Phi-3 size fits this library's modules; routing can be measured on your "
                "own model with genknowsub_fast.record_routing (README, 'Plotting the routing of your own model')"
            )
    elif args.model != _NO_MODEL:
        size = args.model
        why = _misfit(lib, size)
        if why is not None:
            raise ValueError(
                f"--model {size}: the library does not fit a Phi-3 '{size}' ({why}): adapters for another base "
                "model? (--model auto picks the size that fits)"
            )
    if size is not None:
        cost = check_phi3_fits(size, copies=2 if args.task is not None else 1)  # routing without GKS copies it
    if args.out is not None:
        check_output_dir(args.out, "--out")
    print(repr(lib))

    comparison = None
    if args.task is not None:
        comparison = compare_gks(args.task, args.general, gks=lib.gks or "param", **adapter_options(args))
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
    inputs = "byte-mapped text" if args.text_file else "random token ids"
    if size is None:
        fits = _pick_size(lib)
        if fits is None:
            print(
                "\nrouting not measured: no synthetic Phi-3 fits this library; measure it on your own model with "
                "genknowsub_fast.record_routing (README, 'Plotting the routing of your own model')"
            )
        else:
            print(
                f"\nrouting not measured (no --model): --model auto would build a {check_phi3_fits(fits)} and route "
                f"{args.tokens} random token ids through it; a random model's routing is not your base model's"
            )
    else:
        from ..patching import patch_model
        from ..testing import make_phi3

        print(f"\nbuilding a {cost}")
        model = make_phi3(size, seed=args.seed)
        ids, what = _token_ids(args, model.config.vocab_size)
        patch_model(model, lib, options.top_k, options.temperature, options.mixing)
        with warnings.catch_warnings(), torch.no_grad(), record_routing(model, lib.expert_names) as routing:
            warnings.simplefilter("ignore")
            model(ids)
        print(f"routing of {what} through a random Phi-3 '{size}' (top-{options.top_k}):")
        print(routing.table())
        if comparison is not None:
            from ..analytics.plots import routing_without_gks

            routing_before = routing_without_gks(model, comparison.before_library, ids)
            print("\nsame tokens, experts without GenKnowSub → with it (mean over modules):")
            for attr, label in (("mean_entropy", "routing entropy (nats)"), ("mean_top1_weight", "top-1 weight")):
                b, a = (_mean_attr(r, attr) for r in (routing_before, routing))
                print(f"  {label:<23} {b:.4f} → {a:.4f} ({a - b:+.4f})")
        print("\n" + _HONEST_NOTE.format(inputs=inputs))

    if args.out is not None:
        from ..analytics import plots

        written = [
            plots.plot_similarity(
                after,
                os.path.join(args.out, "prototype_similarity.png"),
                comparison.before if comparison is not None else None,
            )
        ]
        if routing is not None:
            note = f"random Phi-3 '{size}', {inputs}"
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
                    "routing_inputs": None if routing is None else f"random Phi-3 '{size}', {inputs}",
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
