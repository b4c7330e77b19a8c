"""Tools: write results into AnnData, score predictions."""

from gim_scvi.tl._annotate import annotate
from gim_scvi.tl._compare import compare
from gim_scvi.tl._evaluate import evaluate, ground_truth_recovery, lognorm, summarize
from gim_scvi.tl._metrics import (
    graph_recovery,
    match_programs,
    pearson_delta,
    r2_score_means,
    target_recovery,
)

__all__ = [
    "annotate",
    "compare",
    "evaluate",
    "graph_recovery",
    "ground_truth_recovery",
    "lognorm",
    "match_programs",
    "pearson_delta",
    "r2_score_means",
    "summarize",
    "target_recovery",
]
