"""Small helpers shared by the model and the tools."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def context_labels(
    names: Iterable[str], doses: Iterable[float] | None, lines: Iterable[str]
) -> np.ndarray:
    """Labels ``"perturbation | dose | cell line"`` (``"perturbation | cell line"`` without doses).

    The one label format for a perturbed context, shared by :meth:`GIM.get_interventions`,
    :func:`gim_scvi.tl.annotate` and :func:`gim_scvi.tl.evaluate` so that their tables align.
    """
    if doses is None:
        return np.array([f"{n} | {ln}" for n, ln in zip(names, lines, strict=True)])
    return np.array(
        [f"{n} | {float(d):g} | {ln}" for n, d, ln in zip(names, doses, lines, strict=True)]
    )
