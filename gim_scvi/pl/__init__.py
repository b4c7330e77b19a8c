"""Plots (scanpy conventions: ``show=``, ``save=``, Axes returned when ``show=False``)."""

from gim_scvi.pl._plots import (
    causal_graph,
    dose_response,
    evaluation,
    predicted_vs_observed,
    programs,
    targets,
)

__all__ = [
    "causal_graph",
    "dose_response",
    "evaluation",
    "predicted_vs_observed",
    "programs",
    "targets",
]
