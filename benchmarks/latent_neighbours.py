"""Unseen drugs predicted from their most similar training drugs in the learned latent model.

A diagnosis of where GIM's generator loses to the nearest-drug baseline (issue #4), not a
feature. Run by hand on a saved model and the AnnData it was trained on::

    python benchmarks/latent_neighbours.py --model DIR --data FILE.h5ad \
        --split-key split_ood --heldout ood --degs pooled_doses --tag sciplex_synthetic

or, for a model of the default synthetic screen, regenerate its data instead of reading it::

    python benchmarks/latent_neighbours.py --model DIR --synthetic-seed 0 --tag synthetic_s0

On the trained model (encoder, decoder and graph fixed), each training drug gets its own
intervention per cell line (targets, shifts, dose response), fitted with the refit's loss on
the encoded residuals of its cells: ``dense`` (no target prior: every program free) or
``sparse`` (the model's target prior). An unseen drug's intervention distribution is then the
mixture of the training drugs' ones, weighted by ``softmax(similarity / tau)`` (Tanimoto on
binary features, negative Euclidean distance over its median otherwise), optionally mixed
half and half with the generator ensemble. Every candidate is scored with
:func:`gim_scvi.tl.evaluate` on the held-out drugs next to the ensemble and the baselines, and
also by 5-fold cross-validation over the training drugs on a decoded proxy (DEG-R² of the
decoded mean cell of each held-out training context), to see whether the choice could be
made without the test drugs. Writes ``latent_neighbours_<tag>.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import gim_scvi
from gim_scvi.model._refit import (
    ContextResiduals,
    _member_loss,
    context_residuals,
    refit_generator,
)
from gim_scvi.module._generator import InterventionGenerator, InterventionParams

BASELINES = ("control_mean", "mean_shift", "nearest_drug", "ridge")
# name: (per-drug fit, tau, top-k neighbours, weight of the neighbours against the ensemble)
CANDIDATES = {
    "GIM": (None, None, None, 0.0),
    "neighbours_dense_k1": ("dense", 0.01, 1, 1.0),
    "neighbours_dense_tau0.02": ("dense", 0.02, None, 1.0),
    "neighbours_dense_tau0.05": ("dense", 0.05, None, 1.0),
    "neighbours_dense_tau0.02+GIM": ("dense", 0.02, None, 0.5),
    "neighbours_sparse_tau0.02": ("sparse", 0.02, None, 1.0),
}


class DrugInterventions(nn.Module):
    """Free intervention parameters for each (training drug, cell line)."""

    dose_response = staticmethod(InterventionGenerator.dose_response)

    def __init__(self, rows: np.ndarray, n_cell_lines: int, n_programs: int):
        super().__init__()
        self.register_buffer("rows", torch.as_tensor(rows, dtype=torch.float32))
        self.table = nn.Parameter(torch.randn(len(rows), n_cell_lines, 4, n_programs) * 0.01)
        self.drug = None  # drug of each fitted context, set by fit_drug_interventions

    def index(self, features: torch.Tensor) -> torch.Tensor:
        """Row of ``rows`` equal to each row of raw ``features`` (-1 if none)."""
        distance = torch.cdist(
            features.float(), self.rows, compute_mode="donot_use_mm_for_euclid_dist"
        )
        closest = distance.min(dim=1)
        return torch.where(closest.values < 1e-6, closest.indices, -1)

    def params(self, drug: torch.Tensor, cell_line: torch.Tensor) -> InterventionParams:
        out = self.table[drug, cell_line.view(-1)]
        slope = F.softplus(out[:, 3] + 1.0) + 0.1
        return InterventionParams(out[:, 0], out[:, 1], out[:, 2], slope, None)

    def forward(self, features: torch.Tensor, cell_line: torch.Tensor) -> InterventionParams:
        return self.params(self.drug, cell_line)  # the fitted contexts, in order


def fit_drug_interventions(
    module, contexts: ContextResiduals, dense: bool, n_steps: int = 1500, seed: int = 0
) -> DrugInterventions:
    """Each training drug's own intervention, fitted with the refit's loss (Adam, full batch)."""
    rows, drug = np.unique(contexts.features, axis=0, return_inverse=True)
    torch.manual_seed(seed)
    fitted = DrugInterventions(rows, module.n_cell_lines, contexts.mean.shape[1])
    fitted.drug = torch.as_tensor(drug.reshape(-1))
    as_tensor = lambda v, dtype=torch.float32: torch.as_tensor(v, dtype=dtype)  # noqa: E731
    data = (
        None,
        module.standardise_log_dose(None if contexts.dose is None else as_tensor(contexts.dose)),
        as_tensor(contexts.cell_line, torch.long),
        as_tensor(contexts.mean),
        as_tensor(contexts.second_moment),
        as_tensor(contexts.n_cells),
        module.log_exogenous_scale.detach().clone(),
    )
    kl_weight = module.target_kl_weight
    module.target_kl_weight = 0.0 if dense else kl_weight
    optimizer = torch.optim.Adam(fitted.parameters(), lr=0.03)
    try:
        for _ in range(n_steps):
            loss = _member_loss(module, fitted, *data, 0.5)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        module.target_kl_weight = kl_weight
    return fitted


def neighbour_weights(features: torch.Tensor, rows: torch.Tensor, tau: float, k: int | None):
    """``softmax(similarity / tau)`` over the training drugs (only the top ``k`` if given)."""
    sim = torch.as_tensor(gim_scvi.tl._baselines.similarity(features.numpy(), rows.numpy()))
    if not np.isin(features.numpy(), (0.0, 1.0)).all():  # distances: scale-free
        sim = sim / (-sim).median(dim=1, keepdim=True).values.clamp(min=1e-9)
    if k is not None:
        kth = sim.topk(k, dim=1).values[:, -1:]
        sim = torch.where(sim >= kth, sim, torch.full_like(sim, -torch.inf))
    return torch.softmax(sim.float() / tau, dim=1)


def drug_intervention(module, fitted, drug, cell_line, dose, mode) -> dict:
    """Intervention of the fitted drugs ``drug`` (row indices) in ``cell_line`` at ``dose``."""
    params = fitted.params(drug, cell_line)
    probs = torch.sigmoid(params.target_logits)
    targets = (probs > 0.5).to(probs.dtype) if mode == "map" else probs
    response = fitted.dose_response(params, module.standardise_log_dose(dose))
    return {
        "shift": targets * response * params.shift,
        "target_probs": probs,
        "targets": targets,
        "dose_response": response,
    }


def neighbour_intervention(module, fitted, features, dose, cell_line, mode, tau, k):
    """Mixture of the training drugs' interventions (expected values, like ``mode="mean"``)."""
    weights = neighbour_weights(features, fitted.rows, tau, k)
    n, n_drugs = weights.shape
    out = drug_intervention(
        module,
        fitted,
        torch.arange(n_drugs).repeat(n),
        cell_line.repeat_interleave(n_drugs, 0),
        None if dose is None else dose.repeat_interleave(n_drugs, 0),
        mode,
    )
    return {key: (weights[..., None] * v.view(n, n_drugs, -1)).sum(1) for key, v in out.items()}


@contextlib.contextmanager
def replacing_rows(module, rows, replace):
    """Within the block, the rows picked by ``rows(features)`` get ``replace(out, ...)``.

    ``replace(out, features, dose, cell_line, mode)`` sees those rows only (``out`` is the
    model's own intervention for them) and returns the fields it sets.
    """
    original = module.intervention

    def intervention(features, dose, cell_line, mode="relaxed", generator=None):
        out = original(features, dose, cell_line, mode, generator)
        picked = rows(features)
        if mode == "relaxed" or not picked.any():
            return out
        d = None if dose is None else dose[picked]
        new = replace(
            {k: v[picked] for k, v in out.items() if k != "target_kl" and v is not None},
            features[picked],
            d,
            cell_line[picked],
            mode,
        )
        out = dict(out)
        for key, value in new.items():
            out[key] = out[key].clone()
            out[key][picked] = value
        return out

    module.intervention = intervention
    try:
        yield
    finally:
        del module.intervention


def replacing_unseen(module, replace):
    """:func:`replacing_rows` for the perturbations unseen in training."""
    return replacing_rows(module, lambda features: ~module.seen_rows(features), replace)


def mixed_with_neighbours(module, fitted, tau, k, weight):
    """``weight`` x the neighbours' mixture + (1 - weight) x the ensemble."""

    def replace(out, features, dose, cell_line, mode):
        nb = neighbour_intervention(module, fitted, features, dose, cell_line, mode, tau, k)
        return {key: weight * v + (1 - weight) * out[key] for key, v in nb.items()}

    return replace


def scaled_shift(factor: float):
    """The ensemble's expected shift times ``factor`` (is it too small?)."""
    return lambda out, *_: {"shift": factor * out["shift"]}


def own_encoded_shift(contexts: ContextResiduals):
    """The held-out context's own mean encoded residual: what a perfect generator would give."""
    table = {
        (row.tobytes(), float(d), int(c)): m
        for row, d, c, m in zip(
            contexts.features.astype(np.float32),
            contexts.dose[:, 0] if contexts.dose is not None else np.zeros(len(contexts.mean)),
            contexts.cell_line[:, 0],
            contexts.mean,
            strict=True,
        )
    }

    def replace(out, features, dose, cell_line, mode):
        doses = dose[:, 0].numpy() if dose is not None else np.zeros(len(features))
        rows = [
            table.get((f.tobytes(), float(d), int(c)))
            for f, d, c in zip(features.numpy(), doses, cell_line[:, 0].numpy(), strict=True)
        ]
        shift = [
            r if r is not None else o for r, o in zip(rows, out["shift"].numpy(), strict=True)
        ]
        return {"shift": torch.as_tensor(np.stack(shift), dtype=out["shift"].dtype)}

    return replace


def decoded_profiles(module, contexts: ContextResiduals, residual: np.ndarray) -> np.ndarray:
    """log1p(1e4 x expression share) of each context's mean cell under a residual shift."""
    with torch.no_grad():
        inverse = torch.linalg.inv(module.scm.system_matrix().double())
        line = torch.as_tensor(contexts.cell_line).view(-1)
        basal = torch.as_tensor(contexts.basal_mean).double()[line]
        z = (basal + torch.as_tensor(residual).double()) @ inverse
        logits = module.decoder.logits(z.float(), line[:, None], torch.zeros_like(line)[:, None])
        return torch.log1p(1e4 * torch.softmax(logits, -1)).double().numpy()


def decoded_deg_r2(module, contexts: ContextResiduals, shift: np.ndarray, n_degs=50):
    """Per context: R² of the decoded prediction on the decoded observation's top DEGs."""
    observed = decoded_profiles(module, contexts, contexts.mean)
    control = decoded_profiles(module, contexts, np.zeros_like(contexts.mean))
    predicted = decoded_profiles(module, contexts, shift)
    degs = np.argsort(-np.abs(observed - control), axis=1)[:, :n_degs]
    o = np.take_along_axis(observed, degs, 1)
    p = np.take_along_axis(predicted, degs, 1)
    return 1 - ((o - p) ** 2).sum(1) / ((o - o.mean(1, keepdims=True)) ** 2).sum(1)


def subset(contexts: ContextResiduals, rows: np.ndarray) -> ContextResiduals:
    dose = None if contexts.dose is None else contexts.dose[rows]
    return ContextResiduals(
        contexts.features[rows],
        dose,
        contexts.cell_line[rows],
        contexts.mean[rows],
        contexts.second_moment[rows],
        contexts.n_cells[rows],
        contexts.basal_mean,
        contexts.exogenous_sd,
    )


def candidate_shifts(module, fits, contexts: ContextResiduals) -> dict[str, np.ndarray]:
    """Every candidate's expected shift for the given contexts."""
    features = torch.as_tensor(contexts.features, dtype=torch.float32)
    dose = None if contexts.dose is None else torch.as_tensor(contexts.dose, dtype=torch.float32)
    line = torch.as_tensor(contexts.cell_line)
    with torch.no_grad():
        ensemble = module._generated_intervention(
            module.generator, features, dose, line, "mean", None
        )["shift"].numpy()
        out = {}
        for name, (kind, tau, k, weight) in CANDIDATES.items():
            if kind is None:
                out[name] = ensemble
                continue
            nb = neighbour_intervention(module, fits[kind], features, dose, line, "mean", tau, k)
            out[name] = weight * nb["shift"].numpy() + (1 - weight) * ensemble
    return out


def cross_validated_proxy(module, contexts: ContextResiduals, n_folds=5, seed=0) -> pd.DataFrame:
    """Decoded DEG-R² of each candidate on training drugs held out fold by fold."""
    _, drug = np.unique(contexts.features, axis=0, return_inverse=True)
    drug = drug.reshape(-1)
    fold = np.random.default_rng(seed).permutation(drug.max() + 1) % n_folds
    scores = []
    for k in range(n_folds):
        held = fold[drug] == k
        fit, held_out = subset(contexts, ~held), subset(contexts, held)
        refit_generator(module, fit)
        fits = {
            kind: fit_drug_interventions(module, fit, kind == "dense")
            for kind in ("dense", "sparse")
        }
        top = held_out.dose is None or held_out.dose[:, 0] == held_out.dose.max()
        for name, shift in candidate_shifts(module, fits, held_out).items():
            r2 = decoded_deg_r2(module, held_out, shift)
            scores.append({"method": name, "fold": k, "all": r2.mean(), "top": r2[top].mean()})
    frame = pd.DataFrame(scores).groupby("method")[["all", "top"]].mean()
    return frame.rename(columns=lambda c: f"cv_decoded_r2_deg_{c}_doses")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="saved GIM folder")
    parser.add_argument("--data", help="the AnnData the model was trained on (.h5ad)")
    parser.add_argument("--synthetic-seed", type=int, help="regenerate gim_scvi.data.synthetic")
    parser.add_argument("--data-kwargs", default="{}", help="JSON dict for synthetic()")
    parser.add_argument("--split-key", default="split")
    parser.add_argument("--train", default="train")
    parser.add_argument("--heldout", default="test")
    parser.add_argument("--degs", default="condition", choices=["condition", "pooled_doses"])
    parser.add_argument("--tag", required=True, help="appended to the CSV file name")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    if args.data is not None:
        import anndata as ad

        adata = ad.read_h5ad(args.data)
    else:
        adata = gim_scvi.data.synthetic(seed=args.synthetic_seed, **json.loads(args.data_kwargs))
    model = gim_scvi.GIM.load(args.model, adata=adata)
    module = model.module
    split = adata.obs[args.split_key].astype(str).to_numpy()
    contexts = context_residuals(model, np.flatnonzero(split == args.train))
    cv = cross_validated_proxy(module, contexts)
    refit_generator(module, contexts)  # the default ensemble again, on all training drugs
    fits = {
        kind: fit_drug_interventions(module, contexts, kind == "dense")
        for kind in ("dense", "sparse")
    }
    kwargs = dict(
        split_key=args.split_key, heldout=args.heldout, train_split=args.train, degs=args.degs
    )
    tables = [gim_scvi.tl.evaluate(model, adata, baselines=BASELINES, **kwargs)]
    replacements = {
        name: mixed_with_neighbours(module, fits[kind], tau, k, weight)
        for name, (kind, tau, k, weight) in CANDIDATES.items()
        if kind is not None
    }
    # with the training cells, so that residuals are taken from the training controls' mean
    heldout = context_residuals(model, np.flatnonzero(np.isin(split, [args.heldout, args.train])))
    replacements |= {
        "GIM_shift_x2": scaled_shift(2.0),
        "oracle_own_encoded_shift": own_encoded_shift(heldout),
    }
    for name, replace in replacements.items():
        with replacing_unseen(module, replace):
            scores = gim_scvi.tl.evaluate(model, adata, baselines=(), **kwargs)
        tables.append(scores.assign(method=name))
    results = pd.concat(tables)
    top = results[results["dose"] == results["dose"].max()] if "dose" in results else results
    summary = top.groupby("method", sort=False).agg(
        r2_deg_mean=("r2_deg", "mean"),
        r2_deg_median=("r2_deg", "median"),
        pearson_delta_deg_mean=("pearson_delta_deg", "mean"),
        energy_distance_mean=("energy_distance", "mean"),
        n_conditions=("r2_deg", "size"),
    )
    summary = summary.join(cv).reset_index()
    summary.insert(0, "data", args.tag)
    print(summary.to_string(index=False, float_format="%.3f"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out / f"latent_neighbours_{args.tag}.csv", index=False)


if __name__ == "__main__":
    main()
