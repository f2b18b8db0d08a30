"""The ``genknowsub-fast`` command line.

- :mod:`.main`: the parser, the ``build`` and ``info`` subcommands, one-line errors and exit codes;
- :mod:`.args`: argument types and the adapter options shared by ``build`` and ``inspect``;
- :mod:`.demo`, :mod:`.inspect_command`, :mod:`.eval_command`: the ``demo``, ``inspect`` and ``eval`` subcommands.
"""

from .main import main

__all__ = ["main"]
