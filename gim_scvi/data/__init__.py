"""Data sets: synthetic screens with ground truth."""

from gim_scvi.data._synthetic import random_dag, synthetic

__all__ = ["random_dag", "synthetic"]
