"""Linear maps, MLPs or both in the generator ensemble: each scored on a saved model.

Reruns the second training stage of a saved model (seen fits and the generator ensemble; the
graph is kept) with ``--members`` members of each kind (``--layers``, default linear maps and
one-layer MLPs), then, for each kind alone and all members together: the neighbour mixture
chosen on the validation drugs, and the DEG-R² at the highest dose on the validation and
held-out drugs. Also says which candidate :meth:`gim_scvi.GIM.select_ensemble_members`
keeps. A saved model trained with other members (older defaults) is fine: only its joint
stage is used::

    python benchmarks/ensemble_kinds.py --model DIR --data FILE.h5ad --sciplex \
        --features both --tag both30_s0

Writes ``ensemble_kinds_<tag>.csv`` (one row per candidate) and
``ensemble_kinds_<tag>_conditions.csv`` (each held-out condition at the highest dose, every
candidate with its chosen mixture and the baselines).
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
from gim_scvi.module import GeneratorEnsemble


def refit_with_kinds(model, train_idx: np.ndarray, n_members: int, layers: tuple[int, ...]):
    """A fresh ensemble with these kinds of member, fitted by the second stage."""
    module = model.module
    kwargs = module._generator_kwargs["generator"]
    if module.feature_projection is not None:
        kwargs = {**kwargs, "n_features": module.feature_projection.shape[1]}
    module.generator = GeneratorEnsemble(n_members, n_layers=layers, **kwargs)
    module.ensemble_fitted.fill_(False)
    module.neighbour_weight.zero_()
    model._refit_generator(train_idx, model.train_params_.get("generator_refit_steps", 600), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--members", type=int, default=5, help="members of each kind")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    adata, model, kwargs = load(args)
    scvi.settings.seed = 0
    split = adata.obs[kwargs["split_key"]].astype(str).to_numpy()
    refit_with_kinds(model, np.flatnonzero(split == "train"), args.members, tuple(args.layers))
    ensemble = model.module.generator
    members = model.select_ensemble_members(
        split_key=kwargs["split_key"], validation_split="valid"
    )
    print(members.round(3).to_string())
    chosen_layers = members.loc[members["chosen"], "member_layers"].item()
    rows, conditions = [], []
    for _, candidate in members.iterrows():
        layers = candidate["member_layers"]
        ensemble.set_active_kinds([int(v) for v in layers.split("+")])
        mixture = model.select_neighbour_mixture(
            split_key=kwargs["split_key"], validation_split="valid"
        )
        mix = mixture.loc[mixture["chosen"]].iloc[0]
        baselines = ("control_mean", "mean_shift", "nearest_drug", "ridge")
        scores = gim_scvi.tl.evaluate(
            model, adata, baselines=baselines if layers == chosen_layers else (), **kwargs
        )
        top = scores[scores["dose"] == scores["dose"].max()].copy()
        top.loc[top["method"] == "GIM", "method"] = f"GIM_{layers}"
        conditions.append(top)
        rows.append(
            {
                "member_layers": layers,
                "chosen": layers == chosen_layers,
                "validation_r2_deg_alone": candidate["r2_deg"],
                "neighbour_weight": mix["weight"],
                "neighbour_temperature": mix["temperature"],
                "validation_r2_deg": mix["r2_deg"],
                "heldout_r2_deg": top.loc[top["method"] == f"GIM_{layers}", "r2_deg"].mean(),
            }
        )
        print(rows[-1])
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"ensemble_kinds_{args.tag}.csv", index=False)
    pd.concat(conditions).to_csv(out / f"ensemble_kinds_{args.tag}_conditions.csv", index=False)
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
