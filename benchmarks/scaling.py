"""Time per training epoch as the number of cells and of programs grows.

Run by hand (not part of the tests)::

    python benchmarks/scaling.py --cells 10000 50000 200000 --programs 16 32 64

Synthetic screens of 2,000 genes. Cells: one epoch (after a warm-up epoch on the smallest
data) at each size with 16 programs; programs: one epoch at ``--program-cells`` cells. The
table gives seconds per epoch (wall and CPU of this process, torch on ``--threads`` threads) and
CPU seconds per 1,000 cells, so linear growth shows as a constant.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pandas as pd
import scvi
import torch
from _common import EpochTimer, print_table, synthetic_screen

import gim_scvi


def epoch_seconds(adata, n_programs: int, batch_size: int) -> tuple[float, float]:
    timer = EpochTimer()
    model = gim_scvi.GIM(adata, n_programs=n_programs)
    model.train(max_epochs=1, batch_size=batch_size, enable_progress_bar=False, callbacks=[timer])
    return timer.seconds[0], timer.cpu_seconds[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument("--programs", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--program-cells", type=int, default=50_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    scvi.settings.seed = 0
    rows = []
    data = {}
    epoch_seconds(synthetic_screen(min(args.cells), args.n_genes), 16, args.batch_size)  # warm-up
    for n in args.cells:
        data[n] = synthetic_screen(n, args.n_genes)
        wall, cpu = epoch_seconds(data[n], 16, args.batch_size)
        rows.append(
            {"vary": "cells", "n_cells": data[n].n_obs, "n_programs": 16, "wall_s": wall}
            | {"cpu_s": cpu}
        )
        print(rows[-1], flush=True)
        if n != args.program_cells:
            del data[n]
    adata = data.get(args.program_cells) or synthetic_screen(args.program_cells, args.n_genes)
    for k in args.programs:
        wall, cpu = epoch_seconds(adata, k, args.batch_size)
        rows.append(
            {"vary": "programs", "n_cells": adata.n_obs, "n_programs": k, "wall_s": wall}
            | {"cpu_s": cpu}
        )
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table["cpu_s_per_1k_cells"] = table["cpu_s"] / table["n_cells"] * 1000
    table["threads"] = args.threads
    args.out.mkdir(parents=True, exist_ok=True)
    print_table(table, args.out / "scaling.csv")


if __name__ == "__main__":
    main()
