"""How predictable are the nine OOD drugs of ``synthetic_sciplex`` from the training drugs?

A noise-free ceiling for issue #4. The simulation's ground truth (``.uns["ground_truth"]``)
gives each drug's true shift of the latent programs and the model that turns a shift into
expression. Every predictor below learns from the **true**, noise-free 10 µM effects of the
~168 training drugs (no cells, no sampling noise, no model to fit to counts) and predicts
the nine OOD drugs; a predicted program shift is decoded with the **true** latent model. So
the predictors that work in program space are what GIM would be with a perfect latent model
and perfect per-drug fits, and differ only in the map from a drug's features to its shift.

Score: R² of the expected ``log1p(normalize_total(1e4))`` profile (exogenous noise averaged
out, no count noise) on each condition's 50 genes of largest true change, mean over the 27
OOD conditions (drug x line) at 10 µM: a noise-free stand-in for ``evaluate``'s DEG-R².

    python benchmarks/predictability_ceiling.py --seeds 0 1 2 3 4 --features both morgan
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import RidgeCV
from sklearn.neighbors import KNeighborsRegressor
from sklearn.neural_network import MLPRegressor

import gim_scvi

DOSE_NM = 1e4
N_DEGS = 50
ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4)


class MLPEnsemble:
    """Mean of a few small MLPs from different starting points (sklearn)."""

    def __init__(self, n_members: int = 5, n_hidden: int = 128, alpha: float = 0.1):
        self.members = [
            MLPRegressor(
                hidden_layer_sizes=(n_hidden,), alpha=alpha, max_iter=5000, random_state=seed
            )
            for seed in range(n_members)
        ]

    def fit(self, x: np.ndarray, y: np.ndarray) -> MLPEnsemble:
        for member in self.members:
            member.fit(x, y)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.mean([member.predict(x) for member in self.members], axis=0)


class TrueModel:
    """Expected profile of a program shift in a cell line, from the simulation's ground truth."""

    def __init__(self, truth: dict, n_draws: int = 400, seed: int = 0):
        dag = truth["dag"].to_numpy()
        self.solve = np.linalg.inv(np.eye(dag.shape[0]) - dag)
        self.loadings = truth["loadings"].to_numpy()
        self.basal = truth["basal_means"].to_numpy()
        self.gene_base = truth["genes"]["base"].to_numpy()
        self.line_bias = truth["line_bias"].to_numpy()
        sd = truth["params"]["exogenous_sd"]
        self.noise = sd * np.random.default_rng(seed).normal(size=(n_draws, dag.shape[0]))

    def profile(self, shift: np.ndarray, line: int) -> np.ndarray:
        """Mean ``log1p(1e4 * expression share)`` over exogenous draws (no count noise)."""
        programs = (self.basal[line] + self.noise + shift) @ self.solve
        logits = programs @ self.loadings.T + self.gene_base + self.line_bias[line]
        logits -= logits.max(axis=1, keepdims=True)
        share = np.exp(logits)
        share /= share.sum(axis=1, keepdims=True)
        return np.log1p(1e4 * share).mean(axis=0)


def true_shifts(truth: dict, dose: float) -> np.ndarray:
    """Each drug's true program shift at ``dose`` (Hill dose response)."""
    drugs = truth["drugs"]
    hill = drugs["hill"].to_numpy()
    ec50 = 10.0 ** drugs["log10_ec50"].to_numpy()
    response = dose**hill / (dose**hill + ec50**hill)
    return truth["shifts"].to_numpy() * response[:, None]


def whitened_components(x: np.ndarray, train: np.ndarray, n_components: int) -> np.ndarray:
    """Rows of ``x`` on the first principal components of its standardised training rows."""
    scale = np.maximum(x[train].std(0), 1e-6)
    standardised = (x - x[train].mean(0)) / scale
    pca = PCA(n_components, random_state=0).fit(standardised[train])
    scores = pca.transform(standardised)
    return scores / scores[train].std(0)


def r2_on_degs(true: np.ndarray, pred: np.ndarray, control: np.ndarray) -> float:
    """R² of ``pred`` on the ``N_DEGS`` genes where ``true`` differs most from ``control``."""
    genes = np.argsort(-np.abs(true - control))[:N_DEGS]
    residual = ((true[genes] - pred[genes]) ** 2).sum()
    return 1.0 - residual / ((true[genes] - true[genes].mean()) ** 2).sum()


def predictions(truth: dict, features: np.ndarray, model: TrueModel) -> dict[str, dict]:
    """Predicted profile of every (OOD drug, line) at 10 µM, by method."""
    split = truth["drugs"]["split"].to_numpy()
    train, ood = np.flatnonzero(split == "train"), np.flatnonzero(split == "ood")
    n_lines = model.basal.shape[0]
    shifts = true_shifts(truth, DOSE_NM)
    profiles = {
        (i, line): model.profile(shifts[i], line)
        for i in np.concatenate([train, ood])
        for line in range(n_lines)
    }
    control = [model.profile(np.zeros(shifts.shape[1]), line) for line in range(n_lines)]
    out: dict[str, dict] = {"oracle (own true shift)": {k: profiles[k] for k in profiles}}
    standardised = (features - features[train].mean(0)) / np.maximum(features[train].std(0), 1e-6)
    for line in range(n_lines):
        deltas = np.array([profiles[i, line] - control[line] for i in train])
        ridge = RidgeCV(alphas=ALPHAS).fit(features[train], deltas)
        for i in ood:
            nearest = train[np.argmin(((standardised[train] - standardised[i]) ** 2).sum(1))]
            for name, profile in (
                ("control mean", control[line]),
                ("mean shift", control[line] + deltas.mean(0)),
                ("ridge (genes)", control[line] + ridge.predict(features[[i]])[0]),
                ("nearest drug (genes)", profiles[nearest, line]),
            ):
                out.setdefault(name, {})[i, line] = profile
    components = whitened_components(features, train, 16)
    mechanism = truth["mechanism"].to_numpy()
    program_space = {
        "programs: ridge on features": (features, RidgeCV(alphas=ALPHAS)),
        "programs: ridge on 16 PCs": (components, RidgeCV(alphas=ALPHAS)),
        "programs: MLPs on 16 PCs": (components, MLPEnsemble()),
        "programs: MLPs on all features": (standardised, MLPEnsemble()),
        "programs: MLPs on true mechanism": (mechanism, MLPEnsemble()),
        "programs: 5-NN on true mechanism": (mechanism, KNeighborsRegressor(5)),
    }
    for name, (x, regressor) in program_space.items():
        predicted = regressor.fit(x[train], shifts[train]).predict(x[ood])
        out[name] = {
            (i, line): model.profile(shift, line)
            for i, shift in zip(ood, predicted, strict=True)
            for line in range(n_lines)
        }
    return {
        name: {k: (v, profiles[k], control[k[1]]) for k, v in pred.items() if k[0] in ood}
        for name, pred in out.items()
    }


def score_seed(seed: int, feature_sets: list[str]) -> pd.DataFrame:
    """Noise-free DEG-R² of every method on one seed's OOD drugs."""
    adata = gim_scvi.data.synthetic_sciplex(
        cells_per_condition=1, control_cells_per_line=2, seed=seed
    )  # the ground truth does not depend on how many cells are drawn
    truth = adata.uns["ground_truth"]
    table = gim_scvi.data.sciplex3_compounds().set_index("name").loc[truth["drugs"].index]
    model = TrueModel(truth)
    rows = []
    for method in feature_sets:
        features = gim_scvi.pp.smiles_to_features(table["smiles"].tolist(), method=method)
        for name, pred in predictions(truth, features, model).items():
            scores = [r2_on_degs(true, p, ctrl) for p, true, ctrl in pred.values()]
            rows.append(
                {
                    "seed": seed,
                    "features": method,
                    "method": name,
                    "n_conditions": len(scores),
                    "r2_deg_mean": float(np.mean(scores)),
                    "r2_deg_median": float(np.median(scores)),
                }
            )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--features", nargs="+", default=["both", "morgan"])
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "predictability_ceiling.csv")
    )
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        results = pd.concat([score_seed(seed, args.features) for seed in args.seeds])
    results.to_csv(args.out, index=False)
    wide = results.pivot_table(
        index=["features", "method"], columns="seed", values="r2_deg_mean", sort=False
    )
    wide["mean"] = wide.mean(axis=1)
    with pd.option_context(
        "display.width", 160, "display.max_columns", None, "display.float_format", "{:.3f}".format
    ):
        print(wide)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
