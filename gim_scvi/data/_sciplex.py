"""sci-Plex 3 (Srivatsan et al. 2020): reading processed files, the OOD split, a simulation.

The simulation is a sci-Plex-shaped synthetic data set built from the real compounds.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData, read_h5ad

from gim_scvi._utils import control_flags, first_non_count_rows
from gim_scvi.data._compounds import (
    match_compounds_by_rule,
    normalize_name,
    sciplex3_compounds,
)
from gim_scvi.data._synthetic import _drug_mechanisms, simulate_screen

logger = logging.getLogger(__name__)

#: chemCPA's out-of-distribution drugs: held out at all doses in all three cell lines.
SCIPLEX3_OOD_DRUGS = (
    "Dacinostat",
    "Givinostat",
    "Belinostat",
    "Quisinostat",
    "Hesperadin",
    "TAK-901",
    "Alvespimycin",
    "Tanespimycin",
    "Flavopiridol",
)
SCIPLEX3_CELL_LINES = ("A549", "K562", "MCF7")
SCIPLEX3_DOSES_NM = (10.0, 100.0, 1000.0, 10000.0)
_UNIT_TO_NM = {"pm": 1e-3, "nm": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "mm": 1e6, "m": 1e9}
_COUNT_LAYERS = ("counts", "raw_counts", "X_counts", "count")
_TIME_COLUMNS = ("time", "time_point")
_GENE_ID_COLUMNS = ("ensembl_id", "gene_id")
_MISSING = ("", "nan", "none", "<na>")
_SUBSET_LINE = 'adata[adata.obs["sciplex3_keep"], adata.var["sciplex3_keep"]].to_memory()'


def detect_sciplex3_schema(obs: pd.DataFrame) -> str:
    """``"canonical"``, ``"chemcpa"`` or ``"pertpy"`` from the obs columns.

    ``"canonical"`` is the schema :func:`read_sciplex3` writes (e.g. a saved
    :func:`synthetic_sciplex`); unknown layouts raise an error naming the expected columns.
    """
    if {"condition", "cell_line", "dose_nM", "control", "smiles"} <= set(obs.columns):
        return "canonical"
    if {"perturbation", "cell_line", "dose_value", "dose_unit"} <= set(obs.columns):
        return "pertpy"
    if {"condition", "cell_type", "dose"} <= set(obs.columns):
        return "chemcpa"
    raise ValueError(
        "Not a known sci-Plex 3 file: expected chemCPA obs columns ('condition', 'cell_type', "
        "'dose', 'SMILES', 'control') or pertpy/scPerturb columns ('perturbation', "
        f"'cell_line', 'dose_value', 'dose_unit'); found {list(obs.columns)[:20]}."
    )


def _is_control(names: pd.Series) -> np.ndarray:
    lowered = names.astype(str).str.strip().str.lower()
    return lowered.isin(["control", "vehicle", "dmso", "ctrl"]).to_numpy()


def _is_missing(values: pd.Series) -> np.ndarray:
    """True where a label is missing (NaN, empty, or the text ``"nan"``)."""
    text = values.astype(str).str.strip().str.lower()
    return (values.isna() | text.isin(_MISSING)).to_numpy()


def _assigned(canon: pd.DataFrame) -> np.ndarray:
    """Cells of a reader's table with a compound and a cell line (not failed demultiplexing)."""
    return ~(_is_missing(canon["name"]) | _is_missing(canon["cell_line"]))


def _text(values: pd.Series) -> pd.Series:
    """Labels as text, missing ones (NaN, ``"nan"``) as ``""``."""
    return values.astype(str).where(~_is_missing(values), "")


def _file_pathway(obs: pd.DataFrame) -> np.ndarray | str:
    """The file's pathways: ``pathway`` (the table's vocabulary), else ``pathway_level_1``."""
    col = next((c for c in ("pathway", "pathway_level_1") if c in obs), None)
    return obs[col].astype(str).to_numpy() if col else ""


def _chemcpa_control(obs: pd.DataFrame) -> np.ndarray:
    """Control flags of a chemCPA file: vehicle names, or a truthy ``control`` column.

    A numeric column is read leniently (CPA's files hold an all-zero one, so the condition
    name decides); a column of text goes through :func:`gim_scvi._utils.control_flags`.
    """
    control = _is_control(obs["condition"])
    if "control" not in obs:
        return control
    col = obs["control"]
    if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
        return control | (pd.to_numeric(col, errors="coerce").fillna(0).to_numpy() > 0)
    return control | control_flags(obs, "control")


def _canonical_from_chemcpa(obs: pd.DataFrame) -> pd.DataFrame:
    dose = pd.to_numeric(obs["dose"], errors="coerce").to_numpy(dtype=float)
    smiles_col = next((c for c in ("SMILES", "smiles", "canonical_smiles") if c in obs), None)
    return pd.DataFrame(
        {
            "name": obs["condition"].astype(str).to_numpy(),
            "cell_line": obs["cell_type"].astype(str).to_numpy(),
            "dose_nM": dose,
            "control": _chemcpa_control(obs),
            "smiles_file": obs[smiles_col].astype(str).to_numpy() if smiles_col else "",
            "pathway_file": _file_pathway(obs),
        },
        index=obs.index,
    )


def _canonical_from_canonical(obs: pd.DataFrame) -> pd.DataFrame:
    control = control_flags(obs, "control") | _is_control(obs["condition"])
    return pd.DataFrame(
        {
            "name": obs["condition"].astype(str).to_numpy(),
            "cell_line": obs["cell_line"].astype(str).to_numpy(),
            "dose_nM": pd.to_numeric(obs["dose_nM"], errors="coerce").to_numpy(dtype=float),
            "control": control,
            "smiles_file": obs["smiles"].astype(str).to_numpy(),
            "pathway_file": obs["pathway"].astype(str).to_numpy() if "pathway" in obs else "",
        },
        index=obs.index,
    )


def _canonical_from_pertpy(obs: pd.DataFrame) -> pd.DataFrame:
    control = _is_control(obs["perturbation"])
    assigned = ~(_is_missing(obs["perturbation"]) | _is_missing(obs["cell_line"]))
    units = obs["dose_unit"].astype(str).str.strip().str.lower()
    factor = units.map(_UNIT_TO_NM)
    unknown = sorted(set(units[factor.isna() & ~control & assigned & (units != "nan")]))
    if unknown:
        raise ValueError(f"Unknown dose unit(s) {unknown} in obs['dose_unit'].")
    dose = pd.to_numeric(obs["dose_value"], errors="coerce").to_numpy(dtype=float)
    dose = dose * factor.fillna(1.0).to_numpy(dtype=float)
    return pd.DataFrame(
        {
            "name": obs["perturbation"].astype(str).to_numpy(),
            "cell_line": obs["cell_line"].astype(str).to_numpy(),
            "dose_nM": dose,
            "control": control,
            "smiles_file": "",
            "pathway_file": _file_pathway(obs),
        },
        index=obs.index,
    )


def _time_points(obs: pd.DataFrame) -> tuple[str | None, np.ndarray]:
    """The file's time column (``time`` or ``time_point``) and its values in hours.

    Numbers are read as they are, text such as ``"24"``, ``"24h"`` or ``"72 hours"`` by its
    leading number; missing values are NaN. Without such a column: ``(None, empty)``.
    """
    col = next((c for c in _TIME_COLUMNS if c in obs), None)
    if col is None:
        return None, np.empty(0)
    values = obs[col]
    if pd.api.types.is_numeric_dtype(values):
        return col, pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    missing = _is_missing(values)
    text = values.astype(str).str.strip()
    hours = pd.to_numeric(text.str.extract(r"^(\d+(?:\.\d+)?)", expand=False), errors="coerce")
    unreadable = sorted(set(text[hours.isna().to_numpy() & ~missing]))
    if unreadable:
        raise ValueError(
            f"obs[{col!r}] has time points that are not a number of hours: {unreadable[:5]}."
        )
    return col, hours.to_numpy(dtype=float)


def _format_hours(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _time_mask(obs: pd.DataFrame, time: float | None) -> np.ndarray:
    """Cells at ``time`` hours where the file has several time points; all cells otherwise.

    Raises a ValueError when ``time`` is not among the file's time points, and warns that
    the arms are pooled when ``time`` is None.
    """
    col, hours = _time_points(obs)
    keep = np.ones(len(obs), dtype=bool)
    values = sorted(set(hours[~np.isnan(hours)])) if col is not None else []
    if len(values) < 2:
        return keep
    if time is None:
        warnings.warn(
            f"obs[{col!r}] holds several time points ({_format_hours(values)} h) and "
            "`time=None` keeps them all: each condition / dose / cell-line group pools the "
            f"arms. Pass e.g. `time={values[0]:g}` to keep one.",
            UserWarning,
            stacklevel=3,
        )
        return keep
    if not np.isclose(values, float(time)).any():
        raise ValueError(
            f"`time={time}` is not a time point of the file: obs[{col!r}] holds "
            f"{_format_hours(values)} (hours). Pass one of them, or `time=None` to keep all."
        )
    return np.isclose(hours, float(time))


def _human_gene_mask(var: pd.DataFrame) -> np.ndarray:
    """Genes with a human (``ENSG``) id where var mixes human and mouse (``ENSMUSG``) ids.

    The id column is ``ensembl_id`` or ``gene_id``; without one, or without both kinds of
    id, every gene is kept.
    """
    keep = np.ones(len(var), dtype=bool)
    col = next((c for c in _GENE_ID_COLUMNS if c in var), None)
    if col is None:
        return keep
    ids = var[col].astype(str).str.strip().str.upper()
    human = ids.str.startswith("ENSG").to_numpy()
    mouse = ids.str.startswith("ENSMUSG").to_numpy()
    if human.any() and mouse.any():
        return human
    return keep


def _find_counts(adata: AnnData) -> str | None:
    if first_non_count_rows(adata.X) is None:
        return "X"
    for layer in _COUNT_LAYERS:
        if layer in adata.layers and first_non_count_rows(adata.layers[layer]) is None:
            return f"layers/{layer}"
    if (
        adata.raw is not None
        and adata.raw.n_vars == adata.n_vars
        and first_non_count_rows(adata.raw.X) is None
    ):
        return "raw"
    return None


_READERS = {
    "canonical": _canonical_from_canonical,
    "chemcpa": _canonical_from_chemcpa,
    "pertpy": _canonical_from_pertpy,
}


def _canonical_columns(
    canon: pd.DataFrame, matched: dict[str, str], assigned: np.ndarray
) -> pd.DataFrame:
    """The canonical obs columns from a reader's table and the matched compound names.

    Cells not ``assigned`` to a compound and cell line get missing labels and
    ``control=False``.
    """
    table = sciplex3_compounds().set_index("name")
    control = canon["control"].to_numpy(dtype=bool) & assigned
    unassigned = ~assigned
    condition = canon["name"].map(matched).fillna(canon["name"]).astype(object)
    condition[control] = "control"
    smiles = condition.map(table["smiles"])
    smiles = smiles.where(smiles.notna(), _text(canon["smiles_file"]))
    pathway = condition.map(table["pathway"])
    pathway = pathway.where(pathway.notna(), _text(canon["pathway_file"])).astype(object)
    smiles[control | unassigned] = ""
    pathway[control] = "Vehicle"
    dose = canon["dose_nM"].to_numpy(dtype=float).copy()
    dose[control] = 0.0
    cell_line = canon["cell_line"].astype(object).copy()
    for labels in (condition, pathway, cell_line):
        labels[unassigned] = np.nan
    dose[unassigned] = np.nan
    return pd.DataFrame(
        {
            "condition": pd.Categorical(condition.to_numpy()),
            "cell_line": pd.Categorical(cell_line.to_numpy()),
            "dose_nM": dose,
            "control": control,
            "smiles": smiles.to_numpy().astype(str),
            "pathway": pd.Categorical(pathway.to_numpy()),
        },
        index=canon.index,
    )


def _write_canonical(obs: pd.DataFrame, columns: pd.DataFrame, rows: np.ndarray) -> None:
    """Write the canonical columns into ``obs``, keeping changed file columns.

    A file column with a canonical name whose values on the kept ``rows`` would change
    (compared as strings) is kept as ``<name>_original``, unless that column exists.
    """
    for name in columns:
        original = f"{name}_original"
        if name in obs and original not in obs:
            before = obs[name].astype(str).to_numpy()[rows]
            after = columns[name].astype(str).to_numpy()[rows]
            if (before != after).any():
                obs[original] = obs[name]
        obs[name] = columns[name].values  # positional: a Categorical or an ndarray


def _removal_summary(
    n_unassigned: int, n_other_time: int, n_genes: int, time: float | None
) -> str:
    """What is not usable, in words ("" when everything is)."""
    parts = []
    if n_unassigned:
        parts.append(
            f"{n_unassigned} cell(s) with no compound or cell line (failed demultiplexing)"
        )
    if n_other_time:
        parts.append(f"{n_other_time} cell(s) at other time points than {time:g} h (`time`)")
    if n_genes:
        parts.append(f"{n_genes} mouse gene(s) (ENSMUSG ids; `human_genes_only`)")
    return "; ".join(parts)


def _first_word_message(by_first_word: list[str], matched: dict[str, str]) -> str:
    """The note for names that matched the table only by their first word."""
    pairs = ", ".join(f"{name!r} -> {matched[name]!r}" for name in by_first_word[:10])
    more = f" and {len(by_first_word) - 10} more" if len(by_first_word) > 10 else ""
    return (
        f"{len(by_first_word)} compound name(s) matched the shipped sci-Plex 3 table only by "
        f"their first word (chemCPA's naming rule): {pairs}{more}. Check them if the file is "
        "not sci-Plex 3; adata.uns['sciplex3']['matched_by_first_word'] lists them."
    )


def _unmatched_message(unmatched: list[str], n_missing: int) -> str:
    """The warning for compound names the shipped table does not have."""
    message = (
        f"{len(unmatched)} compound name(s) not in the shipped sci-Plex 3 table, kept as they "
        f"are: {unmatched[:10]}. Their SMILES come from the file if it has them"
    )
    if not n_missing:
        return message + "; it has them for every treated cell."
    return message + (
        f": {n_missing} treated cell(s) therefore have no SMILES, and "
        "`gim_scvi.pp.featurize_smiles(..., control_key='control')` refuses them; set their "
        "obs['smiles'] or leave those cells out."
    )


def _select(adata: AnnData, rows: np.ndarray, genes: np.ndarray, summary: str) -> AnnData:
    """Keep the usable cells and genes: a copy in memory, flags for a backed file."""
    if adata.isbacked:
        adata.obs["sciplex3_keep"] = rows
        adata.var["sciplex3_keep"] = genes
        if summary:
            warnings.warn(
                f"Not usable: {summary}. The backed file is returned whole (X stays on disk) "
                f'with obs/var["sciplex3_keep"]; load the usable part with `{_SUBSET_LINE}`.',
                UserWarning,
                stacklevel=3,
            )
        return adata
    if not summary:
        return adata
    warnings.warn(
        f"Removed {summary}; counts in adata.uns['sciplex3'].", UserWarning, stacklevel=3
    )
    return adata[rows, genes].copy()


def read_sciplex3(
    path: str | Path,
    backed: bool = False,
    time: float | None = 24.0,
    human_genes_only: bool = True,
) -> AnnData:
    """Read a processed sci-Plex 3 file into one canonical schema.

    Two schemas are recognised: chemCPA's ``sciplex_complete_middle_subset*.h5ad`` (obs
    ``condition``, ``cell_type``, ``dose`` in nM, ``SMILES``, ``control``; log-normalised X,
    counts maybe in a layer) and pertpy / scPerturb's ``srivatsan_2020_sciplex3.h5ad`` (obs
    ``perturbation``, ``cell_line``, ``dose_value`` + ``dose_unit``, ``time``; var
    ``ensembl_id``; raw counts in X).

    Canonical obs columns are written: ``condition`` (the compound's name in the shipped
    table, or the file's name if unmatched; ``"control"`` for vehicle), ``cell_line``,
    ``dose_nM`` (0 for controls), ``control`` (bool), ``smiles`` and ``pathway`` (from the
    shipped compound table; where a name is unmatched, the file's SMILES and its ``pathway``
    column, else ``pathway_level_1``). The file's other columns are kept as they are. A file
    column with one of these six names is replaced; where its values on the kept cells would
    change (compared as strings), it is first copied to ``<name>_original`` (unless the file
    already has that column). Where the counts are is reported in
    ``.uns["sciplex3"]["counts"]`` (``"X"``, ``"layers/<name>"``, ``"raw"`` or ``None``);
    counts found in ``.raw`` are put in ``.layers["counts"]``. Nothing is densified.

    Cells that are not usable are removed: those without a compound or cell line (cells that
    failed demultiplexing) and, where the file has several time points, those at other
    times; so are mouse genes (see ``human_genes_only``). A warning and
    ``.uns["sciplex3"]`` say how many.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    backed
        Open the file in backed (read-only, on-disk X) mode for very large files. Nothing is
        removed then: the whole file is returned with boolean ``obs["sciplex3_keep"]`` and
        ``var["sciplex3_keep"]``; load the usable part with
        ``adata[adata.obs["sciplex3_keep"], adata.var["sciplex3_keep"]].to_memory()``.
    time
        Hours after treatment to keep where obs has a ``time`` or ``time_point`` column
        (numbers, or text such as ``"24h"``) with several values (pertpy's file has a 72 h
        A549 arm; chemCPA uses 24 h only). ``None`` keeps every time point (they are then
        pooled in the same condition / dose / cell-line groups). A file without such a
        column is not affected.
    human_genes_only
        Where var's ``ensembl_id`` (or ``gene_id``) mixes human (``ENSG``) and mouse
        (``ENSMUSG``) genes, keep only the human ones, as the sci-Plex notebooks do.

    Returns
    -------
    AnnData
        The file's data with the canonical columns and ``.uns["sciplex3"]``: ``schema``,
        ``counts``, ``unmatched`` compound names, ``matched_by_first_word`` (names that
        matched the table only by their first word, chemCPA's rule; logged), ``source``,
        ``n_cells_removed`` (by reason: ``unassigned``, ``other_time_point``),
        ``n_genes_removed`` and ``params``. With ``backed=True`` the counts are of cells and
        genes flagged, not removed.

    Raises
    ------
    ValueError
        If the schema is unknown, ``time`` is not one of the file's time points, or a
        control flag is missing.
    TypeError
        If a ``control`` column of text holds other values than ``"True"``/``"False"``.
    """
    adata = read_h5ad(path, backed="r" if backed else None)
    schema = detect_sciplex3_schema(adata.obs)
    canon = _READERS[schema](adata.obs).reset_index(drop=True)  # positional from here
    assigned = _assigned(canon)
    at_time = _time_mask(adata.obs, time)
    rows = assigned & at_time
    genes = _human_gene_mask(adata.var) if human_genes_only else np.ones(adata.n_vars, bool)
    treated = rows & ~canon["control"].to_numpy(dtype=bool)
    matched, unmatched, by_first_word = match_compounds_by_rule(
        canon.loc[treated, "name"].unique()
    )
    if by_first_word:
        logger.info(_first_word_message(by_first_word, matched))
    columns = _canonical_columns(canon, matched, assigned)
    _write_canonical(adata.obs, columns, rows)
    if unmatched:
        n_missing = int((treated & (columns["smiles"] == "").to_numpy()).sum())
        warnings.warn(_unmatched_message(unmatched, n_missing), UserWarning, stacklevel=2)

    counts = _find_counts(adata)
    if counts == "raw":
        adata.layers["counts"] = adata.raw.X.copy()
        counts = "layers/counts"
    if counts is None:
        warnings.warn(
            "The file holds log-normalised expression and no raw counts (X, a counts layer or "
            ".raw): use `gene_likelihood='normal'` with `layer=None`.",
            UserWarning,
            stacklevel=2,
        )
    n_unassigned = int((~assigned).sum())
    n_other_time = int((assigned & ~at_time).sum())
    adata.uns["sciplex3"] = {
        "schema": schema,
        "counts": "None" if counts is None else counts,
        "unmatched": np.asarray(unmatched, dtype=str),
        "matched_by_first_word": np.asarray(by_first_word, dtype=str),
        "source": str(path),
        "n_cells_removed": {"unassigned": n_unassigned, "other_time_point": n_other_time},
        "n_genes_removed": int((~genes).sum()),
        "params": {
            "backed": backed,
            "time": "all" if time is None else float(time),
            "human_genes_only": human_genes_only,
        },
    }
    summary = _removal_summary(n_unassigned, n_other_time, int((~genes).sum()), time)
    return _select(adata, rows, genes, summary)


def sciplex3_degs(
    adata: AnnData, uns_key: str = "all_DEGs", name_key: str = "cov_drug_dose_name"
) -> dict[str, np.ndarray]:
    """The DEG lists of a chemCPA file read by :func:`read_sciplex3`, for ``evaluate(degs=...)``.

    chemCPA's files keep, in ``.uns["all_DEGs"]``, 50 DEGs per ``cov_drug_dose_name``
    (``"A549_Dacinostat_1.0"``: line, drug, dose / 10 µM), computed per line and drug over all
    doses; the published sci-Plex DEG-R² values are computed on them. This relabels them by the
    canonical columns (``condition``, ``cell_line``, ``dose_nM``) as
    ``"condition | dose | cell line"``, plus ``"condition | cell line"`` where every dose of a
    drug in a line has the same list.

    Parameters
    ----------
    adata
        Output of :func:`read_sciplex3` for a chemCPA file.
    uns_key
        Key of the DEG lists in ``adata.uns``.
    name_key
        Column of ``adata.obs`` with the lists' keys.

    Returns
    -------
    dict
        Label -> gene names.
    """
    from gim_scvi._utils import context_labels

    if uns_key not in adata.uns:
        raise KeyError(f"adata.uns has no {uns_key!r} (chemCPA's files keep their DEGs there).")
    for col in (name_key, "condition", "cell_line", "dose_nM", "control"):
        if col not in adata.obs:
            raise KeyError(
                f"adata.obs has no {col!r}: read the file with gim_scvi.data.read_sciplex3."
            )
    lists = adata.uns[uns_key]
    obs = adata.obs.loc[~control_flags(adata.obs, "control")]
    cols = [name_key, "condition", "cell_line", "dose_nM"]
    pairs = obs[cols].astype({c: str for c in cols[:3]}).drop_duplicates()
    pairs = pairs[pairs[name_key].isin(list(lists))]
    out: dict[str, np.ndarray] = {}
    by_pair: dict[str, list[tuple[str, ...]]] = {}
    for key, cond, line, dose in pairs.itertuples(index=False):
        genes = np.asarray(lists[key]).astype(str)
        out[context_labels([cond], [dose], [line])[0]] = genes
        by_pair.setdefault(f"{cond} | {line}", []).append(tuple(genes))
    doses = obs[cols[1:]].astype(str).drop_duplicates()
    n_doses = doses.groupby(["condition", "cell_line"]).size()
    for (cond, line), n in n_doses.items():
        found = by_pair.get(f"{cond} | {line}", [])
        if len(found) == n and len(set(found)) == 1:
            out[f"{cond} | {line}"] = np.asarray(found[0])
    return out


def sciplex3_ood_split(
    adata: AnnData,
    condition_key: str = "condition",
    key_added: str = "split_ood",
    ood_drugs: Sequence[str] = SCIPLEX3_OOD_DRUGS,
    n_validation_drugs: int = 0,
    control_key: str | None = "control",
    seed: int = 0,
) -> None:
    """Write chemCPA's OOD split to ``adata.obs[key_added]`` (``"ood"``, ``"valid"``, ``"train"``).

    The nine OOD drugs (names matched robustly) are ``"ood"`` at every dose and line;
    ``n_validation_drugs`` other drugs, drawn with ``seed``, are ``"valid"`` (whole drugs, for
    model selection); everything else, controls included, is ``"train"``.
    """
    if condition_key not in adata.obs:
        raise KeyError(f"`condition_key={condition_key!r}` is not a column of adata.obs.")
    names = adata.obs[condition_key].astype(str)
    wanted = {normalize_name(d) for d in ood_drugs}
    normalized = names.map(normalize_name)
    is_ood = normalized.isin(wanted).to_numpy()
    found = set(normalized[is_ood])
    missing = [d for d in ood_drugs if normalize_name(d) not in found]
    if missing:
        warnings.warn(f"OOD drug(s) not in the data: {missing}.", UserWarning, stacklevel=2)
    control = _is_control(names)
    if control_key is not None and control_key in adata.obs:
        control |= control_flags(adata.obs, control_key)
    split = np.where(is_ood, "ood", "train").astype(object)
    if n_validation_drugs:
        pool = sorted(set(names[~is_ood & ~control]))
        rng = np.random.default_rng(seed)
        valid = set(rng.choice(pool, size=min(n_validation_drugs, len(pool)), replace=False))
        split[names.isin(valid).to_numpy()] = "valid"
    split[control] = "train"
    adata.obs[key_added] = pd.Categorical(split, categories=["train", "valid", "ood"])


def synthetic_sciplex(
    cells_per_condition: int = 10,
    control_cells_per_line: int = 1000,
    n_genes: int = 2000,
    n_programs: int = 12,
    n_mechanism: int = 8,
    n_validation_drugs: int = 10,
    edge_prob: float = 0.25,
    exogenous_sd: float = 0.5,
    inert_fraction: float = 0.3,
    library_median: float = 2500.0,
    seed: int = 0,
    chunk_size: int = 20000,
) -> AnnData:
    """A sci-Plex-3-shaped screen simulated from the real 187 compounds.

    The hidden mechanism of each compound is the first ``n_mechanism`` principal components
    of its RDKit features (Morgan bits and standardised 2D descriptors), so compounds that
    look alike chemically act alike; targets, shifts and dose response follow from it as in
    :func:`synthetic`. Three lines (A549, K562, MCF7), four doses (10 nM – 10 µM), counts in
    X, the canonical obs schema of :func:`read_sciplex3`, and ``split_ood`` from
    :func:`sciplex3_ood_split`. The default has ~31,000 cells; ``cells_per_condition=280``
    gives the full ~650,000 (generated chunk by chunk, never dense).

    Featurise with :func:`gim_scvi.pp.featurize_smiles` before setting up the model.
    """
    from gim_scvi.pp import smiles_to_features

    table = sciplex3_compounds()
    drugs = table["name"].tolist()
    feats = smiles_to_features(table["smiles"].tolist(), method="both")
    centred = feats - feats.mean(0)
    centred /= np.maximum(centred.std(0), 1e-6)
    u, _, _ = np.linalg.svd(centred, full_matrices=False)
    mechanism = u[:, :n_mechanism] * np.sqrt(len(drugs))

    def make_drugs(rng: np.random.Generator):
        mech = _drug_mechanisms(
            len(drugs), n_programs, n_mechanism, inert_fraction, rng, mechanism=mechanism
        )
        return mech, np.array(["train"] * len(drugs), dtype=object), feats

    rng = np.random.default_rng(seed)
    adata, _ = simulate_screen(
        drugs,
        list(SCIPLEX3_CELL_LINES),
        make_drugs,
        rng,
        doses=SCIPLEX3_DOSES_NM,
        cells_per_condition=cells_per_condition,
        control_cells_per_line=control_cells_per_line,
        n_genes=n_genes,
        n_programs=n_programs,
        edge_prob=edge_prob,
        exogenous_sd=exogenous_sd,
        library_median=library_median,
        chunk_size=chunk_size,
    )
    obs = adata.obs
    lookup = table.set_index("name")
    names = obs["condition"].astype(str)
    adata.obs = pd.DataFrame(
        {
            "condition": obs["condition"],
            "cell_line": obs["cell_line"],
            "dose_nM": obs["dose"].astype(float),
            "control": obs["control"],
            "smiles": names.map(lookup["smiles"]).fillna("").to_numpy(),
            "pathway": pd.Categorical(names.map(lookup["pathway"]).fillna("Vehicle")),
        },
        index=obs.index,
    )
    sciplex3_ood_split(adata, n_validation_drugs=n_validation_drugs, seed=seed)
    truth = adata.uns["ground_truth"]
    truth["drugs"]["split"] = (
        pd.Series(adata.obs["split_ood"].astype(str).to_numpy(), index=names.to_numpy())
        .groupby(level=0)
        .first()
        .reindex(truth["drugs"].index)
        .to_numpy()
    )
    truth["params"] |= {"seed": seed, "n_mechanism": n_mechanism}
    return adata
