"""Data sets: synthetic screens with ground truth, sci-Plex 3 reading and splits."""

from gim_scvi.data._compounds import match_compounds, normalize_name, sciplex3_compounds
from gim_scvi.data._sciplex import (
    SCIPLEX3_OOD_DRUGS,
    detect_sciplex3_schema,
    read_sciplex3,
    sciplex3_degs,
    sciplex3_ood_split,
    synthetic_sciplex,
)
from gim_scvi.data._splits import dose_holdout_split
from gim_scvi.data._synthetic import random_dag, simulate_screen, synthetic

__all__ = [
    "SCIPLEX3_OOD_DRUGS",
    "detect_sciplex3_schema",
    "dose_holdout_split",
    "match_compounds",
    "normalize_name",
    "random_dag",
    "read_sciplex3",
    "sciplex3_compounds",
    "sciplex3_degs",
    "sciplex3_ood_split",
    "simulate_screen",
    "synthetic",
    "synthetic_sciplex",
]
