"""Startup hook (run by ``genknowsub_fast_lm_eval.pth``): lets a plain ``lm_eval`` command find ``--model genknowsub``.

lm-eval 0.4.13 reads no entry points: a model it does not ship is only known once some code registers it. This
module is imported at interpreter start-up (one import, no third-party imports) and waits for ``lm_eval.models``
(which lm-eval imports to fill its model registry). Right after that module runs, it registers this distribution's
``lm_eval.models`` entry points as lazy placeholders ("module:Class" strings, loaded on first use). An lm-eval that
discovers entry points itself (it then has ``lm_eval.api.registry.load_plugins``) is left alone.

This file is installed at the top level of site-packages, next to the ``.pth`` file (pyproject.toml's data-files);
in the repository both live in ``site_hooks/``, outside the package, so that they are not also package data.
"""

import sys

_TARGET = "lm_eval.models"
_DISTRIBUTIONS = ("genknowsub-fast", "genknowsub_fast")


def register() -> list:
    """Register this distribution's ``lm_eval.models`` entry points in lm-eval's registry; returns the new names."""
    from importlib.metadata import entry_points

    from lm_eval.api import registry

    if hasattr(registry, "load_plugins"):  # lm-eval reads entry points itself
        return []
    added = []
    for ep in entry_points(group="lm_eval.models"):
        dist = getattr(ep, "dist", None)
        if dist is None or dist.metadata["Name"] not in _DISTRIBUTIONS or ep.name in registry.model_registry:
            continue
        registry.model_registry.register(ep.name, target=ep.value)
        added.append(ep.name)
    return added


class _Loader:
    """Runs the real loader, then :func:`register`."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def __getattr__(self, name):  # everything else: the real loader's
        return getattr(self._loader, name)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            register()
        except Exception as exc:  # noqa: BLE001 - a broken hook must not break lm-eval itself
            print(f"genknowsub_fast: lm-eval model not registered ({type(exc).__name__}: {exc})", file=sys.stderr)


class _Finder:
    """A meta path finder that only answers for ``lm_eval.models``, with the real spec and a wrapped loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # once; and the real finders below answer the lookup
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
