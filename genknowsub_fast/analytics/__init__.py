"""Routing analytics: how distinct a library's experts are (:mod:`.stats`, needs only a library), how a patched model
routes tokens (:mod:`.routing`), plots of both (:mod:`.plots`, needs matplotlib) and the ``inspect`` command
(:mod:`.cli`)."""

from .common import layer_index, module_kind
from .routing import ModuleRouting, RoutingRecorder, RoutingStats, record_routing
from .stats import (
    GksComparison,
    LibraryStats,
    ModuleStats,
    compare_gks,
    delta_spectra,
    library_stats,
    mean_off_diagonal,
    prototype_similarity,
)

__all__ = [
    "GksComparison",
    "LibraryStats",
    "ModuleRouting",
    "ModuleStats",
    "RoutingRecorder",
    "RoutingStats",
    "compare_gks",
    "delta_spectra",
    "layer_index",
    "library_stats",
    "mean_off_diagonal",
    "module_kind",
    "prototype_similarity",
    "record_routing",
]
