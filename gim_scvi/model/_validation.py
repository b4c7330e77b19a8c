"""Input checks with messages that name the bad key or value and the fix."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from gim_scvi._utils import control_flags as _control_flags


def check_obsm_features(adata: AnnData, features_key: str) -> np.ndarray:
    """Return the feature matrix of ``adata.obsm[features_key]`` after checking it."""
    if features_key not in adata.obsm:
        available = ", ".join(map(repr, adata.obsm.keys())) or "none"
        raise KeyError(
            f"adata.obsm[{features_key!r}] not found (available obsm keys: {available}). "
            "Store one feature row per cell there (zeros for controls), e.g. with "
            "`gim_scvi.pp.featurize_smiles`, and pass its key as `features_key`."
        )
    features = adata.obsm[features_key]
    if isinstance(features, pd.DataFrame):
        features = features.to_numpy()
    if sp.issparse(features):
        data = features.data
    else:
        features = np.asarray(features)
        data = features
    if features.ndim != 2:
        raise ValueError(
            f"adata.obsm[{features_key!r}] must be 2-D (cells x features), got shape "
            f"{features.shape}."
        )
    if not np.issubdtype(np.asarray(data).dtype, np.number) and data.dtype != bool:
        raise TypeError(
            f"adata.obsm[{features_key!r}] has dtype {data.dtype}; perturbation features must "
            "be numeric (convert with `.astype(np.float32)`)."
        )
    bad = ~np.isfinite(np.asarray(data, dtype=np.float64))
    if bad.any():
        raise ValueError(
            f"adata.obsm[{features_key!r}] contains {int(bad.sum())} NaN or infinite values. "
            "Impute or drop those features (controls should have all-zero rows)."
        )
    return features


def check_obs_key(adata: AnnData, key: str | None, argument: str) -> None:
    """Raise a clear error if an ``.obs`` column is missing."""
    if key is not None and key not in adata.obs:
        raise KeyError(
            f"`{argument}={key!r}` is not a column of adata.obs "
            f"(columns: {', '.join(map(repr, adata.obs.columns)) or 'none'})."
        )


def check_categories(adata: AnnData, key: str | None, argument: str) -> None:
    """Raise a clear error for missing labels or labels without cells in a covariate column.

    A category without cells would become a cell line (or batch) the model knows but never
    saw; a missing label cannot be assigned to any.
    """
    if key is None:
        return
    col = adata.obs[key]
    missing = col.isna().to_numpy()
    if missing.any():
        example = str(adata.obs_names[missing][0])
        raise ValueError(
            f"adata.obs[{key!r}] (`{argument}`) has {int(missing.sum())} missing value(s) (e.g. "
            f"cell {example!r}); drop those cells or give them a label first."
        )
    if isinstance(col.dtype, pd.CategoricalDtype):
        unused = sorted(set(map(str, col.cat.categories)) - set(map(str, col.unique())))
        if unused:
            raise ValueError(
                f"adata.obs[{key!r}] (`{argument}`) has categories without any cell: "
                f"{unused[:5]}. Remove them first: "
                f"`adata.obs[{key!r}] = adata.obs[{key!r}].cat.remove_unused_categories()`."
            )


def check_control_agreement(
    adata: AnnData,
    flags: np.ndarray,
    zero_features: np.ndarray,
    control_key: str,
    features_key: str,
    perturbation_key: str | None,
) -> None:
    """Fail on perturbed cells without features; warn on controls with features.

    Controls are the cells flagged by ``control_key`` or with an all-zero feature row. A cell
    flagged as perturbed whose features are all zero (a compound whose SMILES was missing,
    say) would silently become a control, so it is an error.
    """
    featureless = ~flags & zero_features
    if featureless.any():
        if perturbation_key is not None:
            names = sorted(set(map(str, adata.obs[perturbation_key][featureless])))
            where = f" (perturbations: {names[:5]})"
        else:
            where = f" (e.g. cell {str(adata.obs_names[featureless][0])!r})"
        raise ValueError(
            f"{int(featureless.sum())} cell(s) are not controls by adata.obs[{control_key!r}] "
            f"but have all-zero features in adata.obsm[{features_key!r}]{where}, so they "
            "cannot be told apart from controls. Give them features (e.g. their SMILES before "
            "`gim_scvi.pp.featurize_smiles`), or flag or drop them."
        )
    featured = flags & ~zero_features
    if featured.any():
        warnings.warn(
            f"{int(featured.sum())} control cell(s) by adata.obs[{control_key!r}] have non-zero "
            f"features in adata.obsm[{features_key!r}]; they are used as controls and their "
            "features are ignored (`featurize_smiles(..., control_key=...)` writes zeros for "
            "controls).",
            UserWarning,
            stacklevel=3,
        )


def check_layer(adata: AnnData, layer: str | None) -> None:
    """Raise a clear error if a layer is missing."""
    if layer is not None and layer not in adata.layers:
        raise KeyError(
            f"`layer={layer!r}` not found in adata.layers "
            f"(layers: {', '.join(map(repr, adata.layers.keys())) or 'none'}); "
            "use `layer=None` for counts in adata.X."
        )


def control_flags(adata: AnnData, control_key: str) -> np.ndarray:
    """Boolean or 0/1 control flags of ``adata.obs[control_key]``, as setup can register them."""
    return _control_flags(adata.obs, control_key, strings=False)


def check_doses(adata: AnnData, dose_key: str, treated: np.ndarray) -> None:
    """Treated cells need a finite positive dose."""
    dose = pd.to_numeric(adata.obs[dose_key], errors="coerce").to_numpy(dtype=np.float64)
    bad = treated & ~(np.isfinite(dose) & (dose > 0))
    if bad.any():
        examples = adata.obs_names[bad][:3].tolist()
        raise ValueError(
            f"adata.obs[{dose_key!r}] must be a positive number for every perturbed cell; "
            f"{int(bad.sum())} perturbed cells have a dose <= 0 or NaN (e.g. {examples}). "
            "Fix those values or flag the cells as controls."
        )


def check_adata_shape(adata: AnnData) -> None:
    """Refuse empty AnnData and duplicate cell or gene names."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    for axis, names, fix in (
        ("obs_names", adata.obs_names, "adata.obs_names_make_unique()"),
        ("var_names", adata.var_names, "adata.var_names_make_unique()"),
    ):
        if not names.is_unique:
            dup = names[names.duplicated()].unique()[:3].tolist()
            raise ValueError(f"adata.{axis} has duplicates (e.g. {dup}); run `{fix}` first.")
