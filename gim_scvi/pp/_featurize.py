"""Perturbation features from SMILES with RDKit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from gim_scvi._utils import control_flags

Method = Literal["morgan", "descriptors", "both"]
_MISSING = {"", "nan", "none", "na", "control"}


def _rdkit():
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import Descriptors, rdFingerprintGenerator
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Featurising SMILES needs RDKit: `pip install 'gim_scvi[chem]'` (or `pip install "
            "rdkit`)."
        ) from err
    RDLogger.DisableLog("rdApp.*")
    return Chem, Descriptors, rdFingerprintGenerator


def _molecules(smiles: Sequence[str]) -> list:
    chem, _, _ = _rdkit()
    mols = [chem.MolFromSmiles(s) for s in smiles]
    bad = [s for s, m in zip(smiles, mols, strict=True) if m is None]
    if bad:
        raise ValueError(
            f"{len(bad)} SMILES could not be parsed by RDKit: {bad[:10]}. Fix or remove them "
            "(controls should have no SMILES or be flagged with `control_key`)."
        )
    return mols


def morgan_fingerprints(smiles: Sequence[str], radius: int = 2, n_bits: int = 1024) -> np.ndarray:
    """Morgan (ECFP-like) bit vectors, ``len(smiles) x n_bits`` of 0/1 (float32)."""
    _, _, generators = _rdkit()
    gen = generators.GetMorganGenerator(radius=radius, fpSize=n_bits)
    mols = _molecules(list(smiles))
    return np.stack([gen.GetFingerprintAsNumPy(m) for m in mols]).astype(np.float32)


def rdkit_descriptors(smiles: Sequence[str]) -> pd.DataFrame:
    """All RDKit 2D descriptors (raw values; non-finite values become NaN)."""
    _, descriptors, _ = _rdkit()
    mols = _molecules(list(smiles))
    rows = [descriptors.CalcMolDescriptors(m) for m in mols]
    frame = pd.DataFrame(rows, index=list(smiles), dtype=np.float64)
    return frame.replace([np.inf, -np.inf], np.nan)


def smiles_to_features(
    smiles: Sequence[str],
    method: Method = "morgan",
    radius: int = 2,
    n_bits: int = 1024,
    params: dict | None = None,
) -> np.ndarray:
    """Features of new SMILES, computed exactly as for training.

    Pass ``params=adata.uns[key_added]`` written by :func:`featurize_smiles` to reuse its
    method, fingerprint settings and descriptor standardisation, e.g. to predict a brand-new
    compound: ``model.predict(features=smiles_to_features(["CCO"], params=...))``.

    Parameters
    ----------
    smiles
        SMILES strings.
    method
        ``"morgan"`` (bits), ``"descriptors"`` (standardised RDKit 2D descriptors) or
        ``"both"`` (concatenated).
    radius, n_bits
        Morgan fingerprint radius and length.
    params
        Settings recorded by :func:`featurize_smiles` (override the other arguments).

    Returns
    -------
    numpy.ndarray
        ``len(smiles) x P`` float32 array.
    """
    if params is not None:
        method = params["method"]
        radius = int(params["radius"])
        n_bits = int(params["n_bits"])
    parts = []
    if method in ("morgan", "both"):
        parts.append(morgan_fingerprints(smiles, radius, n_bits))
    if method in ("descriptors", "both"):
        raw = rdkit_descriptors(smiles)
        if params is not None:
            names = list(params["descriptor_names"])
            mean = np.asarray(params["descriptor_mean"])
            std = np.asarray(params["descriptor_std"])
        else:
            names, mean, std = _descriptor_stats(raw)
        parts.append(_standardise(raw[names].to_numpy(), mean, std))
    if not parts:
        raise ValueError(f"method must be 'morgan', 'descriptors' or 'both', got {method!r}.")
    return np.hstack(parts).astype(np.float32)


def _descriptor_stats(raw: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Descriptors that vary and are finite somewhere, with their mean and sd."""
    values = raw.to_numpy()
    mean = np.nanmean(values, axis=0)
    std = np.nanstd(values, axis=0)
    keep = np.isfinite(mean) & (std > 1e-8)
    return list(raw.columns[keep]), mean[keep], std[keep]


def _standardise(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    z = (values - mean) / std
    z = np.where(np.isfinite(z), z, 0.0)  # a missing descriptor sits at the mean
    return np.clip(z, -10.0, 10.0)


def _check_perturbed_have_smiles(
    adata: AnnData, smiles_key: str, control_key: str, missing: np.ndarray
) -> None:
    """Fail if cells that are not controls by ``control_key`` have no SMILES."""
    if not missing.any():
        return
    examples = sorted(set(map(str, adata.obs_names[missing][:1000])))[:3]
    raise ValueError(
        f"{int(missing.sum())} cell(s) are not controls by adata.obs[{control_key!r}] but have "
        f"no SMILES in adata.obs[{smiles_key!r}] (e.g. cells {examples}); their features would "
        "be zeros, the mark of a control. Fill in their SMILES (e.g. for compounds that "
        "`read_sciplex3` could not match, listed in adata.uns['sciplex3']['unmatched']) or "
        "drop those cells."
    )


def featurize_smiles(
    adata: AnnData,
    smiles_key: str = "smiles",
    method: Method = "morgan",
    radius: int = 2,
    n_bits: int = 1024,
    control_key: str | None = None,
    key_added: str = "drug_features",
    sparse: bool = False,
) -> None:
    """Write RDKit features of each cell's compound to ``adata.obsm[key_added]``.

    Features are computed once per distinct SMILES. Control cells (flagged in ``control_key``,
    or with an empty / ``"control"`` SMILES) get all-zero rows, which is how
    :class:`~gim_scvi.GIM` recognises them. Descriptors are standardised over the distinct
    compounds; the statistics go to ``adata.uns[key_added]`` so that
    :func:`smiles_to_features` featurises new compounds identically.

    Parameters
    ----------
    adata
        AnnData with one SMILES per cell in ``adata.obs[smiles_key]``.
    smiles_key
        Column of ``adata.obs`` with SMILES.
    method
        ``"morgan"``, ``"descriptors"`` or ``"both"``. Fingerprint bits describe
        substructures, descriptors physicochemical properties; on the synthetic sci-Plex,
        whose mechanisms come from both, GIM predicted unseen drugs better with ``"both"``
        (``gim-scvi train``'s default; ``benchmarks/README.md`` of the repository).
    radius, n_bits
        Morgan fingerprint radius and length.
    control_key
        Optional column of ``adata.obs`` flagging controls (boolean, 0/1 or
        ``"True"``/``"False"``). With it, a cell that is not a control but has no SMILES is
        an error (it would get the all-zero row of a control).
    key_added
        Key of ``.obsm`` and ``.uns`` to write.
    sparse
        Write a CSR matrix instead of a dense array. Morgan bits are mostly zero: for a
        whole screen (650,000 cells x 1,024 bits) this takes ~0.3 GB instead of 2.7 GB;
        :class:`~gim_scvi.GIM` reads either without densifying.
    """
    if smiles_key not in adata.obs:
        raise KeyError(
            f"`smiles_key={smiles_key!r}` is not a column of adata.obs "
            f"(columns: {list(adata.obs.columns)})."
        )
    smiles = adata.obs[smiles_key].astype(str).str.strip().to_numpy()
    control = np.isin(np.char.lower(smiles.astype(str)), list(_MISSING))
    if control_key is not None:
        if control_key not in adata.obs:
            raise KeyError(f"`control_key={control_key!r}` is not a column of adata.obs.")
        flags = control_flags(adata.obs, control_key)
        _check_perturbed_have_smiles(adata, smiles_key, control_key, ~flags & control)
        control |= flags
    distinct = sorted(set(smiles[~control]))
    if not distinct:
        raise ValueError(f"No perturbed cell has a SMILES in adata.obs[{smiles_key!r}].")
    params: dict = {"method": method, "radius": radius, "n_bits": n_bits, "smiles_key": smiles_key}
    if method in ("descriptors", "both"):
        names, mean, std = _descriptor_stats(rdkit_descriptors(distinct))
        params |= {
            "descriptor_names": np.asarray(names),
            "descriptor_mean": mean,
            "descriptor_std": std,
        }
    table = smiles_to_features(distinct, params=params)
    index = {s: i for i, s in enumerate(distinct)}
    # row i of `lookup` is compound i's features; the last row (zeros) is for controls
    lookup = np.vstack([table, np.zeros((1, table.shape[1]), np.float32)])
    which = np.full(adata.n_obs, len(table), dtype=np.int64)
    rows = np.flatnonzero(~control)
    which[rows] = [index[s] for s in smiles[rows]]
    if sparse:
        select = sp.csr_matrix(
            (np.ones(adata.n_obs, np.float32), (np.arange(adata.n_obs), which)),
            shape=(adata.n_obs, len(lookup)),
        )
        adata.obsm[key_added] = (select @ sp.csr_matrix(lookup)).astype(np.float32).tocsr()
    else:
        adata.obsm[key_added] = lookup[which]
    adata.uns[key_added] = params | {"n_compounds": len(distinct), "n_features": table.shape[1]}
