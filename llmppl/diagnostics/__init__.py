"""Diagnostics of a ``Result``: arviz export, particle genealogy, plots and an HTML report.

``to_arviz(result | [results]) -> arviz.InferenceData``; ``genealogy(result) ->
networkx.DiGraph`` with ``distinct_ancestors`` / ``coalescence_time``;
``plot(result, path=None) -> matplotlib Figure``; ``write_report(result, path)``.
"""

from .arviz_io import to_arviz
from .genealogy import coalescence_time, distinct_ancestors, genealogy
from .plots import plot
from .report import render_report, write_report

__all__ = ["to_arviz", "genealogy", "distinct_ancestors", "coalescence_time", "plot",
           "write_report", "render_report"]
