"""Simple baselines for held-out perturbations, fitted on training conditions only.

Every baseline predicts the mean ``log1p(normalize_total(1e4))`` profile of a (features, dose,
cell line) condition as the line's control mean plus a predicted shift ``delta``; predicted
cells (for distributional metrics) are the line's control cells plus that shift.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import RidgeCV


@dataclass
class TrainingProfiles:
    """Mean profiles of the training conditions.

    Attributes
    ----------
    features
        ``n_conditions x P`` features of each training condition.
    doses
        ``n_conditions`` doses (ones when there is no dose).
    lines
        ``n_conditions`` cell-line names.
    deltas
        ``n_conditions x G`` mean profile minus the line's control mean.
    control_means
        Cell line -> control mean profile.
    """

    features: np.ndarray
    doses: np.ndarray
    lines: np.ndarray
    deltas: np.ndarray
    control_means: dict[str, np.ndarray] = field(default_factory=dict)


class Baseline:
    """A baseline: ``fit`` on training profiles, ``predict_delta`` for new conditions.

    ``kinds`` says what it predicts: ``"single"`` perturbations (``features`` is one row of
    ``P``) and/or ``"combination"`` (``features`` is ``n_components x P``).
    """

    name = "baseline"
    kinds: tuple[str, ...] = ("single",)

    def fit(self, train: TrainingProfiles) -> Baseline:
        """Store what the baseline needs from the training conditions."""
        self.train_ = train
        return self

    def predict_delta(self, features: np.ndarray, dose: float, line: str) -> np.ndarray:
        """Predicted shift of the mean profile from the line's control mean."""
        raise NotImplementedError


class ControlMean(Baseline):
    """No change: the line's control mean."""

    name = "control_mean"
    kinds = ("single", "combination")

    def predict_delta(self, features, dose, line):
        return np.zeros(self.train_.deltas.shape[1])


class MeanShift(Baseline):
    """The mean shift of all training perturbations at the same dose and line."""

    name = "mean_shift"
    kinds = ("single", "combination")

    def predict_delta(self, features, dose, line):
        t = self.train_
        sel = _same_line_nearest_dose(t, dose, line)
        return t.deltas[sel].mean(0)


class NearestDrug(Baseline):
    """The shift of the most similar training perturbation at the same dose and line.

    Similarity is Tanimoto on binary features (e.g. Morgan bits) and negative Euclidean
    distance otherwise.
    """

    name = "nearest_drug"

    def predict_delta(self, features, dose, line):
        t = self.train_
        sel = np.flatnonzero(_same_line_nearest_dose(t, dose, line))
        sim = similarity(features[None], t.features[sel])[0]
        return t.deltas[sel[np.argmax(sim)]]


class Additive(Baseline):
    """For a combination: the sum of its components' shifts (control + Δa + Δb + ...).

    Each component's shift is that of the training condition with the same features in the
    same line at the nearest dose (log scale), as :class:`NearestDose`; a component never
    trained on in that line falls back to its most similar training perturbation.
    """

    name = "additive"
    kinds = ("combination",)

    def predict_delta(self, features, dose, line):
        rows = np.atleast_2d(features)
        return np.sum([NearestDose.predict_delta(self, row, dose, line) for row in rows], axis=0)


class NearestDose(Baseline):
    """The same perturbation's shift at its nearest training dose (log scale), same line.

    The reference for doses never seen in training. A perturbation without any training
    condition in that line falls back to the most similar one (as :class:`NearestDrug`).
    """

    name = "nearest_dose"

    def predict_delta(self, features, dose, line):
        t = self.train_
        same = (t.lines == line) & np.all(np.isclose(t.features, features[None]), axis=1)
        if not same.any():
            return NearestDrug.predict_delta(self, features, dose, line)
        rows = np.flatnonzero(same)
        gap = np.abs(np.log(t.doses[rows]) - np.log(dose))
        return t.deltas[rows[gap == gap.min()]].mean(0)


class RidgeShift(Baseline):
    """Ridge regression from features and log dose to the per-gene shift, one per line.

    The penalty is chosen by efficient leave-one-out cross-validation (``RidgeCV``).
    """

    name = "ridge"

    def __init__(self, alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0, 1e4)):
        self.alphas = alphas

    def fit(self, train: TrainingProfiles) -> RidgeShift:
        super().fit(train)
        self.models_ = {}
        for line in np.unique(train.lines):
            sel = train.lines == line
            x = self._design(train.features[sel], train.doses[sel])
            self.models_[line] = RidgeCV(alphas=np.asarray(self.alphas, dtype=float)).fit(
                x, train.deltas[sel]
            )
        return self

    @staticmethod
    def _design(features: np.ndarray, doses: np.ndarray) -> np.ndarray:
        return np.hstack([features, np.log(np.asarray(doses, dtype=float))[:, None]])

    def predict_delta(self, features, dose, line):
        x = self._design(features[None], np.array([dose]))
        return self.models_[line].predict(x)[0]


BASELINES: dict[str, type[Baseline]] = {
    cls.name: cls
    for cls in (ControlMean, MeanShift, NearestDrug, NearestDose, RidgeShift, Additive)
}


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Tanimoto similarity for binary rows, negative Euclidean distance otherwise."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all():
        inter = a @ b.T
        union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
        return np.where(union > 0, inter / np.maximum(union, 1e-12), 1.0)
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return -np.sqrt(np.maximum(d2, 0.0))


def _same_line_nearest_dose(t: TrainingProfiles, dose: float, line: str) -> np.ndarray:
    in_line = t.lines == line
    if not in_line.any():
        raise ValueError(f"No training condition in cell line {line!r} for the baselines.")
    line_doses = np.unique(t.doses[in_line])
    nearest = line_doses[np.argmin(np.abs(np.log(line_doses) - np.log(dose)))]
    return in_line & (t.doses == nearest)
