"""How fingerprint bits are scaled before the generator ensemble, on a saved sci-Plex model.

The model standardises every feature column with its training standard deviation, so a bit
set in one training drug becomes an input of ~13. This rescales the binary columns of
``module.feature_std`` and runs the second training stage again (seen fits, ensemble,
neighbour choice on the validation drugs; the graph refit is kept), then scores the held-out
drugs at their highest dose next to ridge and the nearest drug::

    python benchmarks/feature_scaling.py --model DIR --data FILE.h5ad --sciplex \
        --features both --tag both30_s0

Variants: ``base`` (as trained), ``bits1`` (binary columns centred, not scaled), ``bitspool``
(one scale for all varying binary columns, the root mean square of their standard
deviations, which keeps the block's total variance). Only the second stage sees the change;
the joint stage trained with per-column standardisation. Writes
``feature_scaling_<tag>.csv``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
import torch
from neighbour_selection import add_data_arguments, load

import gim_scvi

VARIANTS = ("base", "bits1", "bitspool")


def binary_scales(std: torch.Tensor, seen: torch.Tensor, variant: str) -> torch.Tensor:
    """``std`` with the binary columns of ``seen`` rescaled as ``variant`` says."""
    std = std.clone()
    binary = ((seen == 0) | (seen == 1)).all(0)
    varying = binary & (seen.std(0) > 0)
    if variant == "bits1":
        std[binary] = 1.0
    elif variant == "bitspool":
        std[varying] = torch.sqrt((std[varying] ** 2).mean())
    return std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    adata, model, kwargs = load(args)
    module = model.module
    split = adata.obs[kwargs["split_key"]].astype(str).to_numpy()
    train_idx = np.flatnonzero(split == "train")
    trained = {k: v.clone() for k, v in module.state_dict().items()}
    rows = []
    for variant in VARIANTS:
        module.load_state_dict(trained)
        module.feature_std.copy_(
            binary_scales(trained["feature_std"], module.seen_features, variant)
        )
        scvi.settings.seed = 0
        model._refit_generator(train_idx, 600, None, None)
        model.select_neighbour_mixture(split_key=kwargs["split_key"], validation_split="valid")
        baselines = ("ridge", "nearest_drug") if not rows else ()
        scores = gim_scvi.tl.evaluate(model, adata, baselines=baselines, **kwargs)
        top = scores[scores["dose"] == scores["dose"].max()]
        for method, group in top.groupby("method"):
            rows.append(
                {
                    "data": args.tag,
                    "method": f"GIM[{variant}]" if method == "GIM" else method,
                    "neighbour_weight": float(module.neighbour_weight),
                    "r2_deg": group["r2_deg"].mean(),
                    "median": group["r2_deg"].median(),
                    "pearson": group["pearson_delta_deg"].mean(),
                    "energy": group["energy_distance"].mean(),
                }
            )
        print(pd.DataFrame(rows).to_string(index=False, float_format="%.3f"), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / f"feature_scaling_{args.tag}.csv", index=False)


if __name__ == "__main__":
    main()
