"""Predicting a whole sci-Plex-sized screen: 187 drugs x 4 doses x 3 lines x 200 cells.

Run by hand (not part of the tests)::

    python benchmarks/predict_speed.py

Trains a GIM briefly on a small synthetic sci-Plex (the real 187 compounds, Morgan bits, 2,000
genes; the weights do not matter for the timing), then streams the predictions with
``GIM.predict_iter`` and reduces each chunk to condition means, as one would for a screen.
It first predicts a quarter of the conditions, then all of them (expected values only): the
peak memory of the second run is the test that memory does not grow with the number of
conditions. A third run also draws counts from the likelihood (``sample_counts=True``, the
``predict`` default), which costs one negative-binomial draw per cell and gene.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
from _common import SCIPLEX_SETUP, peak_rss_gb, print_table

import gim_scvi


def trained_model(n_genes: int):
    adata = gim_scvi.data.synthetic_sciplex(
        cells_per_condition=2, control_cells_per_line=1000, n_genes=n_genes
    )
    gim_scvi.pp.featurize_smiles(adata, "smiles", method="morgan", control_key="control")
    gim_scvi.GIM.setup_anndata(adata, **SCIPLEX_SETUP)
    model = gim_scvi.GIM(adata)
    model.train(max_epochs=1, enable_progress_bar=False)
    return model, adata


def predict_screen(
    model, adata, n_drugs: int, n_cells: int, chunk: int, sample_counts: bool
) -> dict:
    table = gim_scvi.data.sciplex3_compounds()
    names = table["name"].to_numpy()[:n_drugs]
    features = gim_scvi.pp.smiles_to_features(
        table["smiles"].tolist()[:n_drugs], params=adata.uns["drug_features"]
    )
    doses = np.array([10.0, 100.0, 1000.0, 10000.0])
    feats = np.repeat(features, len(doses), axis=0)
    dose = np.tile(doses, n_drugs)
    conditions = [f"{n} | {d:g}" for n in names for d in doses]
    start, cpu_start = time.perf_counter(), time.process_time()
    n_obs, means = 0, []
    for pred in model.predict_iter(
        features=feats,
        doses=dose,
        conditions=conditions,
        adata=adata,
        n_cells=n_cells,
        conditions_per_chunk=chunk,
        sample_counts=sample_counts,
    ):
        n_obs += pred.n_obs
        expected = pd.DataFrame(pred.layers["expected"]).groupby(
            pred.obs["condition"].astype(str).to_numpy()
        )
        means.append(expected.mean())
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return {
        "sample_counts": sample_counts,
        "cpu_seconds": cpu,
        "n_conditions": len(conditions) * len(model.cell_lines),
        "n_cells_predicted": n_obs,
        "seconds": seconds,
        "peak_rss_gb": peak_rss_gb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--n-cells", type=int, default=200, help="per condition and line")
    parser.add_argument("--chunk", type=int, default=32, help="conditions per chunk")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    scvi.settings.seed = 0
    model, adata = trained_model(args.n_genes)
    before = peak_rss_gb()
    rows = []
    for n_drugs, sample_counts in ((47, False), (187, False), (187, True)):
        row = predict_screen(model, adata, n_drugs, args.n_cells, args.chunk, sample_counts)
        row["peak_rss_gb_before_predicting"] = before
        rows.append(row)
        print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    print_table(pd.DataFrame(rows), args.out / "predict_speed.csv")


if __name__ == "__main__":
    main()
