"""Seconds per training epoch of GIM next to scVI on the same cells, genes and batches.

Run by hand (not part of the tests)::

    python benchmarks/train_speed.py --n-cells 50000 --n-genes 2000 --rounds 2

scVI (``scvi.model.SCVI``) gets the same latent size as GIM's programs, the same batch size and
the same cells and genes (cell line as its batch covariate), once with its default ZINB
likelihood and once with GIM's NB. The models are trained in alternation, ``--rounds`` times,
so that load from other processes hits all of them alike. Torch runs on ``--threads`` threads
(default 1) and each epoch is timed in wall-clock and in CPU seconds of this process: on a shared
machine the CPU-time ratio is the one to trust. The table gives the median epoch times of each
model and their ratios to scVI (ZINB and NB).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
import torch
from _common import EpochTimer, median_epoch, print_table, synthetic_screen

import gim_scvi


def train_once(
    name: str, adata, n_latent: int, epochs: int, batch_size: int
) -> tuple[float, float]:
    timer = EpochTimer()
    common = dict(
        max_epochs=epochs,
        batch_size=batch_size,
        enable_progress_bar=False,
        callbacks=[timer],
    )
    if name == "GIM":
        model = gim_scvi.GIM(adata, n_programs=n_latent)
        model.train(**common)
    else:
        likelihood = "zinb" if name == "scVI (zinb)" else "nb"
        model = scvi.model.SCVI(adata, n_latent=n_latent, gene_likelihood=likelihood)
        model.train(train_size=1.0, **common)
    return median_epoch(timer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-cells", type=int, default=50_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--n-latent", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="per model and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    scvi.settings.seed = 0

    adata = synthetic_screen(args.n_cells, args.n_genes)
    scvi_adata = adata.copy()
    scvi.model.SCVI.setup_anndata(scvi_adata, batch_key="cell_line")
    print(f"data: {adata.n_obs} cells x {adata.n_vars} genes", flush=True)
    names = ["scVI (zinb)", "scVI (nb)", "GIM"]
    rows = []
    for round_ in range(args.rounds):
        for name in names:
            data = adata if name == "GIM" else scvi_adata
            start = time.perf_counter()
            wall, cpu = train_once(name, data, args.n_latent, args.epochs, args.batch_size)
            rows.append({"round": round_, "method": name, "wall_s": wall, "cpu_s": cpu})
            print(
                f"round {round_} {name}: {wall:.1f} s/epoch wall, {cpu:.1f} s CPU "
                f"({time.perf_counter() - start:.0f} s in all)",
                flush=True,
            )
    runs = pd.DataFrame(rows)
    table = runs.groupby("method", sort=False)[["wall_s", "cpu_s"]].median().reset_index()
    for ref in ("scVI (zinb)", "scVI (nb)"):
        base = table.loc[table["method"] == ref, "cpu_s"].iloc[0]
        table[f"cpu_ratio_to_{ref.split()[1][1:-1]}"] = table["cpu_s"] / base
    # ratio per round too, as a check that the noise of a shared machine did not decide it
    per_round = runs.pivot(index="round", columns="method", values="cpu_s")
    spread = (per_round["GIM"] / per_round["scVI (zinb)"]).to_numpy()
    table["n_cells"], table["n_genes"] = adata.n_obs, adata.n_vars
    table["batch_size"], table["n_latent"] = args.batch_size, args.n_latent
    table["threads"] = args.threads
    args.out.mkdir(parents=True, exist_ok=True)
    print_table(table, args.out / "train_speed.csv")
    print("GIM / scVI (zinb) CPU time per round:", np.round(spread, 2))


if __name__ == "__main__":
    main()
