"""One training epoch on a sci-Plex-sized screen (~650,000 cells x 2,000 genes) from h5ad.

Run by hand (not part of the tests), in two steps so that the reading process starts clean::

    python benchmarks/scale.py write --path /tmp/sciplex_full.h5ad
    python benchmarks/scale.py train --path /tmp/sciplex_full.h5ad

``write`` simulates the screen with ``gim_scvi.data.synthetic_sciplex(cells_per_condition=280)``
(the real 187 compounds, three lines, four doses, sci-Plex-like library sizes; chunked,
never dense) and writes it. ``train`` reads it, featurises the compounds (Morgan bits, sparse),
sets up and trains GIM for one epoch, and reports wall time, peak resident memory and the
in-memory size of the sparse counts; the target is peak RSS <= 2 x counts + 2 GB.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import anndata as ad
import pandas as pd
import scvi
from _common import SCIPLEX_SETUP, EpochTimer, peak_rss_gb, print_table, sparse_gb

import gim_scvi


def write(path: Path, cells_per_condition: int, n_genes: int) -> None:
    start = time.perf_counter()
    adata = gim_scvi.data.synthetic_sciplex(
        cells_per_condition=cells_per_condition, n_genes=n_genes
    )
    print(f"simulated {adata.n_obs} x {adata.n_vars} in {time.perf_counter() - start:.0f} s")
    adata.write_h5ad(path)
    print(f"written {path} ({path.stat().st_size / 1024**3:.2f} GB on disk)")


def train(path: Path, batch_size: int, out: Path) -> None:
    t0 = time.perf_counter()
    adata = ad.read_h5ad(path)
    t_read = time.perf_counter() - t0
    counts_gb = sparse_gb(adata.X)
    rss_read = peak_rss_gb()
    gim_scvi.pp.featurize_smiles(
        adata, "smiles", method="morgan", control_key="control", sparse=True
    )
    gim_scvi.GIM.setup_anndata(adata, **SCIPLEX_SETUP)
    t_setup = time.perf_counter() - t0 - t_read
    model = gim_scvi.GIM(adata)
    timer = EpochTimer()
    model.train(
        max_epochs=1,
        batch_size=batch_size,
        split_key="split_ood",
        enable_progress_bar=False,
        callbacks=[timer],
    )
    row = {
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "nnz": adata.X.nnz,
        "counts_in_memory_gb": counts_gb,
        "read_s": t_read,
        "featurize_setup_s": t_setup,
        "epoch_s": timer.seconds[0],
        "epoch_cpu_s": timer.cpu_seconds[0],
        "total_s": time.perf_counter() - t0,
        "peak_rss_after_read_gb": rss_read,
        "peak_rss_gb": peak_rss_gb(),
        "target_rss_gb": 2 * counts_gb + 2,
    }
    out.mkdir(parents=True, exist_ok=True)
    print_table(pd.DataFrame([row]), out / "scale.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["write", "train"])
    parser.add_argument("--path", type=Path, default=Path("/tmp/sciplex_full.h5ad"))
    parser.add_argument("--cells-per-condition", type=int, default=280)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    scvi.settings.seed = 0
    if args.step == "write":
        write(args.path, args.cells_per_condition, args.n_genes)
    else:
        train(args.path, args.batch_size, args.out)


if __name__ == "__main__":
    main()
