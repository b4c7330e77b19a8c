"""The second stage's graph refit on the default synthetic screen: settings side by side.

Run by hand (not part of the tests)::

    python benchmarks/graph_refit.py --seeds 0 1 --epochs 60

Trains GIM once per seed with ``graph_refit=False`` (the jointly learned graph, saved), then
reruns the second stage on that one trained model for each setting of the graph refit in
``SETTINGS`` (``None``: no refit, the jointly learned graph; otherwise the keyword arguments of
:func:`gim_scvi.model._refit.refit_graph`), so every row shares the same encoder and decoder.
Writes ``graph_refit.csv``: per seed and setting, target and graph recovery
(:func:`gim_scvi.tl.ground_truth_recovery`) and GIM's mean DEG-R², Pearson Δ DEG and energy
distance on the held-out drugs at the highest dose.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
from _common import SETUP, print_table

import gim_scvi

SETTINGS: dict[str, dict | None] = {
    "none (joint graph)": None,
    "L1 0.003": {"l1": 0.003},
    "L1 0.01 (default)": {"l1": 0.01},
    "L1 0.03": {"l1": 0.03},
}
RECOVERY = ("target_auroc", "target_auroc_own_cells", "target_auroc_test", "graph_auroc")
METRICS = ("r2_deg", "pearson_delta_deg", "energy_distance")


def screen(seed: int):
    adata = gim_scvi.data.synthetic(seed=seed)
    gim_scvi.GIM.setup_anndata(adata, **SETUP)
    return adata


def train_joint(seed: int, epochs: int, folder: Path) -> None:
    """One training with the jointly learned graph kept, saved to ``folder``."""
    scvi.settings.seed = seed
    model = gim_scvi.GIM(screen(seed))
    model.train(
        max_epochs=epochs,
        split_key="split",
        validation_split="valid",
        enable_progress_bar=False,
        graph_refit=False,
    )
    model.save(folder, overwrite=True)


def score(seed: int, folder: Path, name: str, setting: dict | None) -> dict:
    """Second stage with one graph-refit setting on the saved model, then its scores."""
    scvi.settings.seed = seed
    adata = screen(seed)
    model = gim_scvi.GIM.load(folder, adata=adata)
    if setting is not None:
        train = np.flatnonzero(adata.obs["split"].to_numpy() == "train")
        graph = setting | {"threshold": 0.05}  # train()'s defaults: graph_threshold, steps
        model._refit_generator(train, 600, None, graph)
    recovery = gim_scvi.tl.ground_truth_recovery(model, adata)
    scores = gim_scvi.tl.evaluate(model, adata, split_key="split", heldout="test", baselines=())
    top = scores[scores["dose"] == scores["dose"].max()]
    return {
        "seed": seed,
        "setting": name,
        "edges": int((model.get_causal_graph().to_numpy() != 0).sum()),
        **{key: recovery[key] for key in RECOVERY},
        **{key: float(top[key].mean()) for key in METRICS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            folder = Path(tmp) / f"model_s{seed}"
            train_joint(seed, args.epochs, folder)
            for name, setting in SETTINGS.items():
                rows.append(score(seed, folder, name, setting))
                print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print_table(pd.DataFrame(rows), out / "graph_refit.csv")


if __name__ == "__main__":
    main()
