"""Shared pieces of the benchmark scripts (run by hand, not part of the tests)."""

from __future__ import annotations

import resource
import time

import lightning.pytorch as pl
import numpy as np
import pandas as pd

import gim_scvi

SETUP = dict(
    features_key="drug_features",
    control_key="control",
    dose_key="dose",
    perturbation_key="condition",
    cell_line_key="cell_line",
)
# the canonical schema of gim_scvi.data.read_sciplex3 / synthetic_sciplex
SCIPLEX_SETUP = {**SETUP, "dose_key": "dose_nM"}


class EpochTimer(pl.Callback):
    """Wall-clock and CPU seconds (this process, all threads) of each training epoch.

    On a shared machine the wall time also measures the other processes; with one torch
    thread the CPU time measures only this work, so ratios of CPU times are the robust ones.
    """

    def __init__(self):
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._start = (0.0, 0.0)

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self._start[0])
        self.cpu_seconds.append(time.process_time() - self._start[1])


def synthetic_screen(n_cells: int, n_genes: int, seed: int = 0, **kwargs):
    """The default synthetic screen resized to about ``n_cells`` cells, set up for GIM."""
    n_conditions = 48 * 4 * 3
    controls = 900 * 3
    per_condition = max(1, round((n_cells - controls) / n_conditions))
    adata = gim_scvi.data.synthetic(
        n_genes=n_genes, cells_per_condition=per_condition, seed=seed, **kwargs
    )
    gim_scvi.GIM.setup_anndata(adata, **SETUP)
    return adata


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (GB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def sparse_gb(x) -> float:
    """In-memory size of a CSR/CSC matrix (data + indices + indptr), GB."""
    return (x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / 1024**3


def print_table(frame: pd.DataFrame, path) -> None:
    """Print a table and write it as CSV."""
    with pd.option_context("display.width", 140, "display.max_columns", 20):
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    frame.to_csv(path, index=False)
    print(f"written: {path}")


def median_epoch(timer: EpochTimer) -> tuple[float, float]:
    """Median wall and CPU epoch time, leaving out the first epoch when there are several."""
    skip = 1 if len(timer.seconds) > 1 else 0
    return float(np.median(timer.seconds[skip:])), float(np.median(timer.cpu_seconds[skip:]))
