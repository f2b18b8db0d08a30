"""Expert names from adapter directories, and the checks on a directory given as an adapter.

Hugging Face Trainer (which the original GenKnowSub code trains with) saves an adapter as ``<run>/checkpoint-<N>``:
``cluster0_batch16/checkpoint-17``, ``cluster1_batch16/checkpoint-17``, ``wiki_langen/checkpoint-17``, ... Naming an
expert after the last path component would give all of them the name ``checkpoint-17``. The default names are
therefore made by two rules, applied to each list of adapters (task, general, added) on its own:

1. a directory called ``checkpoint-<N>`` stands for its training run: it is named after the run directory
   (``cluster0_batch16/checkpoint-17`` -> ``cluster0_batch16``), unless another adapter of the list is in the same
   run directory (two checkpoints of one run keep the ``checkpoint-<N>`` part: ``run/checkpoint-10``);
2. a name is the last path component left by rule 1; adapters of the list that would share a name get as many more
   trailing components, joined by ``/``, as it takes to tell them apart (``en/wiki/checkpoint-17`` and
   ``de/wiki/checkpoint-17`` -> ``en/wiki`` and ``de/wiki``).

Paths are made absolute first (``.`` inside a run directory is named like the run directory's path), never resolved
through symbolic links, so a name is the path you gave. The names depend only on the list of paths, in any order: the
same directories give the same names on every run, and an adapter's name changes only when one added to its list
would otherwise share it. ``names`` / ``general_names`` / ``add_names`` override them.

A training run directory given instead of one of its checkpoints is refused, listing the checkpoints it holds (highest
step first): the latest checkpoint is not necessarily the one to use (``load_best_model_at_end`` keeps the best one,
which may be older), so the choice is left to the user. A run directory that holds an adapter itself (what
``trainer.save_model()`` writes at the end of training) is an adapter directory like any other.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from . import file_checks as checks

_CHECKPOINT = re.compile(r"checkpoint-(?P<step>\d+)")
ADAPTER_CONFIG = "adapter_config.json"

# Per list of adapters: (what the names are called in messages, the Python argument, the command-line option).
NAME_ARGUMENTS = {
    "task": ("expert names", "names", "--names"),
    "general": ("general adapter names", "general_names", "--general-names"),
    "added": ("added adapter names", "add_names", "--add-names"),
}


def _parts(path: str | os.PathLike) -> list[str]:
    """The components of ``path`` made absolute (normalised, links not resolved)."""
    absolute = os.path.abspath(os.fspath(path))
    return [p for p in re.split(r"[\\/]", absolute) if p and not p.endswith(":")]


def _is_checkpoint(parts: Sequence[str]) -> bool:
    return len(parts) > 1 and _CHECKPOINT.fullmatch(parts[-1]) is not None


def default_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The default expert names of one list of adapter directories (rules in the module docstring)."""
    parts = [_parts(p) for p in paths]
    runs = [ps[:-1] if _is_checkpoint(ps) else ps for ps in parts]
    # Rule 1: a checkpoint is named after its run unless another adapter of the list stands for the same run.
    cores = [
        runs[i] if sum(r == runs[i] for r in runs) == 1 else parts[i]
        for i in range(len(parts))
    ]  # fmt: skip
    # A checkpoint that keeps its checkpoint-<N> part (rule 1) is named with its run: "run/checkpoint-10".
    depth = [2 if c is ps and _is_checkpoint(ps) else 1 for c, ps in zip(cores, parts, strict=True)]
    while True:
        names = ["/".join(c[-d:]) for c, d in zip(cores, depth, strict=True)]
        grown = False
        for i, name in enumerate(names):
            if names.count(name) > 1 and depth[i] < len(cores[i]):
                depth[i] += 1
                grown = True
        if not grown:
            return names


def adapter_names(
    paths: Sequence[str | os.PathLike], given: Sequence[str] | None, kind: str
) -> list[str]:
    """The names of one list of adapters (``kind``: ``"task"``, ``"general"`` or ``"added"``): ``given`` when not
    None, else :func:`default_names`. ValueError for a count that does not match or for duplicates, naming the
    argument (and the command-line option) that sets these names."""
    what, argument, option = NAME_ARGUMENTS[kind]
    if given is None:
        names = default_names(paths)
        hint = f"; pass {argument}=[...] (command line: {option}) to name the {kind} adapters"
    else:
        if isinstance(given, (str, bytes)):
            raise ValueError(f"{argument} must be a list of names, one per {kind} adapter, got the string {given!r}")
        names = list(given)
        if len(names) != len(paths):
            raise ValueError(
                f"{len(names)} {argument} (command line: {option}) given for {len(paths)} {kind} adapters"
            )
        what, hint = f"{argument} (command line: {option})", ""
    try:
        return checks.check_names(names, what, allow_empty=kind != "task")
    except ValueError as exc:
        raise ValueError(f"{exc}{hint}") from None


def trainer_checkpoints(path: str | os.PathLike) -> list[str]:
    """The ``checkpoint-<N>`` subdirectories of ``path`` (Trainer's layout), highest step first."""
    try:
        entries = os.listdir(path)
    except OSError:
        return []
    found = []
    for name in entries:
        m = _CHECKPOINT.fullmatch(name)
        if m is not None and os.path.isdir(os.path.join(path, name)):
            found.append((int(m["step"]), name))
    return [name for _, name in sorted(found, reverse=True)]


def missing_config_message(path: str | os.PathLike) -> str:
    """Why ``path`` (a directory without ``adapter_config.json``) is not an adapter: a training run directory is
    named as such, with its checkpoints (highest step first) and the one that would be used as an example."""
    path = os.fspath(path)
    base = f"adapter {path!r} has no {ADAPTER_CONFIG}"
    found = trainer_checkpoints(path)
    if not found:
        return base
    shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    adapters = [c for c in found if os.path.isfile(os.path.join(path, c, ADAPTER_CONFIG))]
    if not adapters:
        return f"{base}; it holds Trainer checkpoints ({shown}) but none of them has an {ADAPTER_CONFIG} either"
    example = os.path.join(path, adapters[0])
    return (
        f"{base}: it is a training run directory holding Trainer checkpoints ({shown}, highest step first); pass "
        f"the checkpoint to use, e.g. {example!r}"
    )


def check_adapter_dirs(paths: Sequence[str | os.PathLike]) -> None:
    """ValueError unless every path is a directory holding ``adapter_config.json`` (checked before anything is
    read; a training run directory is named as such, with its checkpoints)."""
    for p in paths:
        if not os.path.isdir(p):
            raise ValueError(f"adapter path {os.fspath(p)!r} does not exist or is not a directory")
        if not os.path.isfile(os.path.join(p, ADAPTER_CONFIG)):
            raise ValueError(missing_config_message(p))


__all__ = [
    "NAME_ARGUMENTS",
    "adapter_names",
    "check_adapter_dirs",
    "default_names",
    "missing_config_message",
    "trainer_checkpoints",
]
