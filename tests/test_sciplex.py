"""sci-Plex 3 reading (both schemas), name matching, featurisation and the OOD split."""

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
from anndata import AnnData, read_h5ad

import gim_scvi
from gim_scvi.data import (
    SCIPLEX3_OOD_DRUGS,
    match_compounds,
    read_sciplex3,
    sciplex3_compounds,
    sciplex3_ood_split,
)
from gim_scvi.data._compounds import match_compounds_by_rule
from gim_scvi.pp import featurize_smiles, smiles_to_features

# names as the pertpy / scPerturb file spells them (vendor product names)
PRODUCT_NAMES = {
    "Givinostat": "Givinostat (ITF2357)",
    "Quisinostat": "Quisinostat (JNJ-26481585) 2HCl",
    "Alvespimycin": "Alvespimycin (17-DMAG) HCl",
    "Flavopiridol": "Flavopiridol HCl",
    "Belinostat": "Belinostat (PXD101)",
    "Dacinostat": "Dacinostat (LAQ824)",
    "Hesperadin": "Hesperadin",
    "TAK-901": "TAK-901",
    "Tanespimycin": "Tanespimycin (17-AAG)",
    "Abexinostat": "Abexinostat (PCI-24781)",
    "AC480": "AC480 (BMS-599626)",
    "Aurora A Inhibitor I": "Aurora A Inhibitor I",
}
# pertpy's vendor names whose table name is chemCPA's first word (`name.split(" ")[0]`)
FIRST_WORD_NAMES = {
    "Trichostatin": "Trichostatin A (TSA)",
    "Valproic": "Valproic acid sodium salt (Sodium valproate)",
    "ZM": "ZM 447439",
    "AZ": "AZ 960",
    "Tie2": "Tie2 kinase inhibitor",
    "GSK": "GSK J1",
    "Ellagic": "Ellagic acid",
    "Anacardic": "Anacardic Acid",
    "Epothilone": "Epothilone A",
    "Tubastatin": "Tubastatin A",
    "Triamcinolone": "Triamcinolone Acetonide",
    "ENMD-2076": "ENMD-2076 L-(+)-Tartaric acid",
    "Motesanib": "Motesanib Diphosphate (AMG-706)",
    "Lapatinib": "Lapatinib (GW-572016) Ditosylate",
    "Bisindolylmaleimide": "Bisindolylmaleimide IX (Ro 31-8220 Mesylate)",
    "JQ1": "(+)-JQ1",
    "Glesatinib?(MGCD265)": "Glesatinib?(MGCD265)",  # a literal '?' from a mangled space
}
VENDOR_NAMES = PRODUCT_NAMES | {d: FIRST_WORD_NAMES[d] for d in ("Trichostatin", "Valproic")}
DRUGS = list(PRODUCT_NAMES)  # the chemCPA file's drugs; the pertpy file has two more
PERTPY_DRUGS = list(VENDOR_NAMES)
LINES = ["A549", "K562", "MCF7"]
DOSES = [10.0, 100.0, 1000.0, 10000.0]


def _counts_table(drugs=DRUGS, seed=0, cells=4, controls=20, genes=40):
    """Counts and a cell table: every drug x dose x line, plus controls per line."""
    rng = np.random.default_rng(seed)
    rows = [("control", 0.0, line) for line in LINES for _ in range(controls)]
    rows += [(d, dose, ln) for d in drugs for dose in DOSES for ln in LINES for _ in range(cells)]
    table = pd.DataFrame(rows, columns=["drug", "dose", "line"])
    base = rng.gamma(1.0, 1.0, genes)
    effect = {d: rng.normal(0, 1, genes) for d in drugs}
    mu = np.stack(
        [
            base * np.exp(0 if d == "control" else effect[d] * np.log10(dose) / 4)
            for d, dose, _ in rows
        ]
    )
    counts = sp.csr_matrix(rng.poisson(mu * 3).astype(np.float32))
    genes_names = [f"GENE{i}" for i in range(genes)]
    return table, counts, genes_names


def _lognorm(counts):
    return gim_scvi.tl.lognorm(counts)


def write_chemcpa(path, with_counts=True):
    table, counts, genes = _counts_table()
    smiles = sciplex3_compounds().set_index("name")["smiles"]
    control = (table["drug"] == "control").to_numpy()
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(table["line"].to_numpy()),
            "dose": table["dose"].to_numpy(dtype=np.float64),
            "condition": pd.Categorical(table["drug"].to_numpy()),
            "product_name": pd.Categorical(
                np.where(control, "Vehicle", table["drug"].map(PRODUCT_NAMES).fillna(""))
            ),
            "control": control.astype(np.int64),
            "SMILES": np.where(control, "CS(C)=O", table["drug"].map(smiles).fillna("")),
            "dose_val": np.where(control, 1.0, table["dose"] / 1e4),
            "cov_drug_dose_name": (
                table["line"] + "_" + table["drug"] + "_" + (table["dose"] / 1e4).astype(str)
            ).to_numpy(),
            "split_ood_multi_task": pd.Categorical(["train"] * len(table)),
            "pathway_level_1": pd.Categorical(["Epigenetic regulation"] * len(table)),
            "pathway": pd.Categorical(["Epigenetics"] * len(table)),
        },
        index=[f"cell{i}" for i in range(len(table))],
    )
    adata = AnnData(X=_lognorm(counts), obs=obs, var=pd.DataFrame(index=genes))
    if with_counts:
        adata.layers["counts"] = counts
    # as chemCPA: 50 DEGs (here 5) per line x drug over all doses, under each dose's key
    treated = obs.loc[~control, ["cov_drug_dose_name", "cell_type", "condition"]].astype(str)
    treated = treated.drop_duplicates()
    rng = np.random.default_rng(0)
    per_pair = {
        pair: rng.choice(genes, 5, replace=False)
        for pair in treated[["cell_type", "condition"]].drop_duplicates().itertuples(index=False)
    }
    adata.uns["all_DEGs"] = {
        key: per_pair[(line, drug)] for key, line, drug in treated.itertuples(index=False)
    }
    adata.write_h5ad(path)
    return adata


N_UNASSIGNED = 30  # cells that failed demultiplexing (about 4.6% of the real file)
N_MOUSE_GENES = 5


def write_pertpy(path, extra_name=None):
    """A file as pertpy / scPerturb's: vendor names, 24 h plus a 72 h A549-only arm, cells
    that failed demultiplexing (NaN labels), and mouse genes (``ENSMUSG``) in the matrix."""
    table, counts, genes = _counts_table(PERTPY_DRUGS)
    names = table["drug"].map(VENDOR_NAMES).fillna("control")
    if extra_name is not None:
        names = names.where(table["drug"] != "AC480", extra_name)
    obs = pd.DataFrame(
        {
            "perturbation": names.to_numpy(dtype=object),
            "cell_line": table["line"].to_numpy(dtype=object),
            "dose_value": table["dose"].to_numpy(dtype=np.float64),
            "dose_unit": np.where(names == "control", None, "nM").astype(object),
            "time": 24.0,
        }
    )
    arm = (table["line"] == "A549").to_numpy()
    obs = pd.concat([obs, obs[arm].assign(time=72.0)], ignore_index=True)
    unassigned = {c: np.nan for c in ("perturbation", "cell_line", "dose_value", "time")}
    unassigned["dose_unit"] = None
    obs = pd.concat([obs, pd.DataFrame([unassigned] * N_UNASSIGNED)], ignore_index=True)
    rng = np.random.default_rng(1)
    counts = sp.vstack(
        [counts, counts[arm], counts[rng.choice(counts.shape[0], N_UNASSIGNED)]], format="csr"
    )
    for col in ("perturbation", "cell_line"):
        obs[col] = pd.Categorical(obs[col])
    obs["dose_unit"] = pd.Categorical(obs["dose_unit"], categories=["nM"])
    obs["ncounts"] = np.asarray(counts.sum(1)).ravel()
    obs["target"] = pd.Categorical(["HDAC"] * len(obs))
    obs["pathway_level_1"] = pd.Categorical(["Epigenetic regulation"] * len(obs))
    obs["pathway"] = pd.Categorical(["Epigenetics"] * len(obs))
    obs.index = [f"cell{i}" for i in range(len(obs))]
    n_human = len(genes) - N_MOUSE_GENES
    ids = [f"ENSG{i:011d}" for i in range(n_human)]
    ids += [f"ENSMUSG{i:011d}" for i in range(N_MOUSE_GENES)]
    var = pd.DataFrame({"ensembl_id": ids}, index=genes)
    written = AnnData(X=counts, obs=obs, var=var)
    written.write_h5ad(path)
    return written


def read_usable(path, **kwargs):
    """``read_sciplex3`` without its warning about the cells and genes it removed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Removed", UserWarning)
        return read_sciplex3(path, **kwargs)


def _rewrite_obs(path, **columns):
    adata = read_h5ad(path)
    for name, values in columns.items():
        adata.obs[name] = values
    adata.write_h5ad(path)
    return adata


def test_read_chemcpa_schema(tmp_path):
    written = write_chemcpa(tmp_path / "sciplex_complete_middle_subset.h5ad")
    adata = read_sciplex3(tmp_path / "sciplex_complete_middle_subset.h5ad")
    info = adata.uns["sciplex3"]
    assert info["schema"] == "chemcpa" and info["counts"] == "layers/counts"
    assert len(info["unmatched"]) == 0
    assert sp.issparse(adata.X) and sp.issparse(adata.layers["counts"])
    obs = adata.obs
    assert set(obs["cell_line"]) == set(LINES)
    assert obs["control"].dtype == bool
    assert obs["control"].sum() == 60
    assert (obs.loc[obs["control"], "dose_nM"] == 0).all()
    assert set(obs.loc[~obs["control"], "dose_nM"]) == set(DOSES)
    giv = obs[obs["condition"] == "Givinostat"]
    table = sciplex3_compounds().set_index("name")
    assert (giv["smiles"] == table.loc["Givinostat", "smiles"]).all()
    assert (giv["pathway"] == table.loc["Givinostat", "pathway"]).all()
    assert (obs.loc[obs["control"], "smiles"] == "").all()
    # the file's own columns and uns are kept; changed ones as <name>_original
    assert "cov_drug_dose_name" in obs and "all_DEGs" in adata.uns
    assert np.array_equal(adata.obs_names, written.obs_names)
    assert (obs["control_original"] == written.obs["control"]).all()  # 0/1, not bool
    assert "cell_line_original" not in obs and "dose_nM_original" not in obs
    renamed = obs["condition_original"] == "Aurora A Inhibitor I"
    assert renamed.any() and (obs.loc[renamed, "condition"] == "Aurora").all()
    assert adata.uns["sciplex3"]["n_cells_removed"] == {"unassigned": 0, "other_time_point": 0}
    assert adata.uns["sciplex3"]["n_genes_removed"] == 0


def test_sciplex3_degs_relabels_chemcpa_lists(tmp_path):
    written = write_chemcpa(tmp_path / "chemcpa.h5ad")
    adata = read_sciplex3(tmp_path / "chemcpa.h5ad")
    degs = gim_scvi.data.sciplex3_degs(adata)
    # one label per drug x dose x line, and per drug x line (every dose has the same list)
    assert len(degs) == len(DRUGS) * len(LINES) * (len(DOSES) + 1)
    key = "A549_Givinostat_1.0"  # chemCPA's cov_drug_dose_name of 10 µM
    assert list(degs["Givinostat | 10000 | A549"]) == list(written.uns["all_DEGs"][key])
    assert list(degs["Givinostat | A549"]) == list(written.uns["all_DEGs"][key])
    # a dose without a list, or lists that differ between doses: no pooled label
    adata.uns["all_DEGs"].pop("A549_Givinostat_0.001")
    adata.uns["all_DEGs"]["K562_Givinostat_0.1"] = written.var_names[:5].to_numpy()
    degs = gim_scvi.data.sciplex3_degs(adata)
    assert "Givinostat | 10 | A549" not in degs and "Givinostat | A549" not in degs
    assert "Givinostat | K562" not in degs and "Givinostat | 1000 | K562" in degs
    with pytest.raises(KeyError, match="no 'missing'"):
        gim_scvi.data.sciplex3_degs(adata, uns_key="missing")


def test_chemcpa_without_counts_says_normal(tmp_path):
    write_chemcpa(tmp_path / "lognorm_only.h5ad", with_counts=False)
    with pytest.warns(UserWarning, match="gene_likelihood='normal'"):
        adata = read_sciplex3(tmp_path / "lognorm_only.h5ad")
    assert adata.uns["sciplex3"]["counts"] == "None"


def test_read_pertpy_schema_and_unmatched(tmp_path, caplog):
    write_pertpy(tmp_path / "srivatsan_2020_sciplex3.h5ad", extra_name="Mystery-123 (XYZ)")
    with caplog.at_level("INFO", logger="gim_scvi.data._sciplex"):
        with pytest.warns(UserWarning, match="Mystery-123") as record:
            adata = read_usable(tmp_path / "srivatsan_2020_sciplex3.h5ad")
    message = next(str(w.message) for w in record if "Mystery-123" in str(w.message))
    # 4 doses x 3 lines x 4 cells at 24 h; the 72 h arm's are removed
    assert "48 treated cell(s) therefore have no SMILES" in message
    assert "featurize_smiles" in message
    info = adata.uns["sciplex3"]
    assert info["schema"] == "pertpy" and info["counts"] == "X"
    assert list(info["unmatched"]) == ["Mystery-123 (XYZ)"]
    names = set(adata.obs["condition"].astype(str))
    assert {"Givinostat", "Quisinostat", "Alvespimycin", "Flavopiridol", "control"} <= names
    assert "Mystery-123 (XYZ)" in names  # kept as it is
    assert (adata.obs.loc[adata.obs["condition"] == "Mystery-123 (XYZ)", "smiles"] == "").all()
    assert (adata.obs.loc[~adata.obs["control"], "dose_nM"] > 0).all()
    # vendor names named by their first word in the table (chemCPA's rule)
    table = sciplex3_compounds().set_index("name")
    for drug in ("Trichostatin", "Valproic"):
        cells = adata.obs[adata.obs["condition"] == drug]
        assert len(cells) == 48 and (cells["smiles"] == table.loc[drug, "smiles"]).all()
    # ... and those two, only those, are reported for the user to check
    first_word = [FIRST_WORD_NAMES["Trichostatin"], FIRST_WORD_NAMES["Valproic"]]
    assert sorted(info["matched_by_first_word"]) == sorted(first_word)
    assert "2 compound name(s) matched" in caplog.text
    assert "'Trichostatin A (TSA)' -> 'Trichostatin'" in caplog.text
    # an unmatched name's pathway is the file's `pathway` (the table's vocabulary)
    mystery = adata.obs["condition"] == "Mystery-123 (XYZ)"
    assert (adata.obs.loc[mystery, "pathway"] == "Epigenetics").all()
    # the file's pathway column changes (table values, "Vehicle"): kept as pathway_original
    assert (adata.obs["pathway_original"] == "Epigenetics").all()
    assert (adata.obs.loc[adata.obs["control"], "pathway"] == "Vehicle").all()
    assert "cell_line_original" not in adata.obs


def test_pertpy_unusable_cells_time_arm_and_mouse_genes_removed(tmp_path):
    written = write_pertpy(tmp_path / "p.h5ad")
    with pytest.warns(UserWarning, match="Removed 30 cell"):
        adata = read_sciplex3(tmp_path / "p.h5ad")
    at_24h = (written.obs["time"] == 24).to_numpy()
    assert adata.n_obs == at_24h.sum() and adata.n_vars == written.n_vars - N_MOUSE_GENES
    assert adata.var["ensembl_id"].str.startswith("ENSG").all()
    assert sp.issparse(adata.X)
    assert (adata.X != written[at_24h, adata.var_names].X).nnz == 0
    # no phantom "nan" cell line or condition
    assert list(adata.obs["cell_line"].cat.categories) == LINES
    assert "nan" not in set(adata.obs["condition"].astype(str))
    assert adata.obs["condition"].notna().all()
    info = adata.uns["sciplex3"]
    n_arm = int((written.obs["time"] == 72).sum())
    assert info["n_cells_removed"] == {"unassigned": N_UNASSIGNED, "other_time_point": n_arm}
    assert info["n_genes_removed"] == N_MOUSE_GENES
    # the result is saved and read back as it is (canonical schema, nothing more removed)
    adata.write_h5ad(tmp_path / "usable.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = read_sciplex3(tmp_path / "usable.h5ad")
    assert again.uns["sciplex3"]["schema"] == "canonical" and again.shape == adata.shape
    assert again.obs.columns.tolist() == adata.obs.columns.tolist()
    # every cell and gene on request (cells without labels are never usable)
    with pytest.warns(UserWarning, match=r"several time points \(24, 72 h\)"):
        everything = read_usable(tmp_path / "p.h5ad", time=None, human_genes_only=False)
    assert everything.n_obs == written.n_obs - N_UNASSIGNED
    assert everything.n_vars == written.n_vars


@pytest.mark.parametrize("as_text", [False, True])
def test_time_selects_one_arm(tmp_path, as_text):
    written = write_pertpy(tmp_path / "p.h5ad")
    if as_text:  # "24h" / "72h", under the other column name
        text = written.copy()
        hours = text.obs.pop("time")
        text.obs["time_point"] = hours.map(lambda h: f"{h:g}h", na_action="ignore")
        text.write_h5ad(tmp_path / "p.h5ad")
    arm = read_usable(tmp_path / "p.h5ad", time=72)
    assert arm.n_obs == int((written.obs["time"] == 72).sum())
    assert set(arm.obs["cell_line"]) == {"A549"}
    with pytest.raises(ValueError, match=r"`time=48` .* 24, 72"):
        read_sciplex3(tmp_path / "p.h5ad", time=48)


def test_single_time_point_or_no_time_column_unaffected(tmp_path):
    written = write_chemcpa(tmp_path / "c.h5ad")  # no time column
    assert read_sciplex3(tmp_path / "c.h5ad", time=72).n_obs == written.n_obs
    _rewrite_obs(tmp_path / "c.h5ad", time="24h")  # one time point only
    assert read_sciplex3(tmp_path / "c.h5ad", time=72).n_obs == written.n_obs


def test_backed_read_keeps_x_on_disk(tmp_path):
    written = write_pertpy(tmp_path / "p.h5ad")
    n_arm = int((written.obs["time"] == 72).sum())
    with pytest.warns(UserWarning, match="X stays on disk") as record:
        adata = read_sciplex3(tmp_path / "p.h5ad", backed=True)
    assert adata.isbacked
    assert adata.uns["sciplex3"]["counts"] == "X"
    keep_cells, keep_genes = adata.obs["sciplex3_keep"], adata.var["sciplex3_keep"]
    assert (~keep_cells).sum() == N_UNASSIGNED + n_arm and (~keep_genes).sum() == N_MOUSE_GENES
    assert adata.obs.loc[~keep_cells, "cell_line"].isna().sum() == N_UNASSIGNED
    # the line the warning gives loads what an in-memory read returns
    line = 'adata[adata.obs["sciplex3_keep"], adata.var["sciplex3_keep"]].to_memory()'
    assert any(line in str(w.message) for w in record)
    loaded = eval(line, {"adata": adata})
    memory = read_usable(tmp_path / "p.h5ad")
    assert np.array_equal(loaded.obs_names, memory.obs_names)
    assert np.array_equal(loaded.var_names, memory.var_names)
    assert (loaded.X != memory.X).nnz == 0
    for col in ("condition", "cell_line", "dose_nM", "control", "smiles", "pathway"):
        assert (loaded.obs[col].astype(str) == memory.obs[col].astype(str)).all()


def test_unknown_file_schema(tmp_path):
    AnnData(X=np.ones((3, 2)), obs=pd.DataFrame({"foo": [1, 2, 3]}, index=list("abc"))).write_h5ad(
        tmp_path / "x.h5ad"
    )
    with pytest.raises(ValueError, match="Not a known sci-Plex 3 file"):
        read_sciplex3(tmp_path / "x.h5ad")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("givinostat", "Givinostat"),
        ("GIVINOSTAT HCl", "Givinostat"),
        ("Givinostat (ITF2357)", "Givinostat"),
        ("ITF2357 (Givinostat)", "Givinostat"),  # only the alias matches
        ("Quisinostat (JNJ-26481585) 2HCl", "Quisinostat"),
        ("TAK901", "TAK-901"),
        ("Alvespimycin (17-DMAG) hydrochloride", "Alvespimycin"),
        ("Glesatinib (MGCD265)", "Glesatinib?(MGCD265)"),
        ("Aurora A Inhibitor I", "Aurora"),
        ("Sodium Phenylbutyrate", "Sodium"),
        ("Sodium", "Sodium"),
    ],
)
def test_name_matching(name, expected):
    matched, unmatched = match_compounds([name])
    assert matched == {name: expected} and unmatched == []


def test_earlier_matches_unchanged():
    # the vendor names matched before chemCPA's first-word rule map to the same entries
    expected = {
        vendor: "Aurora" if drug == "Aurora A Inhibitor I" else drug
        for drug, vendor in PRODUCT_NAMES.items()
    }
    matched, unmatched = match_compounds(PRODUCT_NAMES.values())
    assert unmatched == [] and matched == expected


@pytest.mark.parametrize(("expected", "name"), FIRST_WORD_NAMES.items())
def test_first_word_matches_chemcpa_names(expected, name):
    matched, unmatched = match_compounds([name])
    assert matched == {name: expected} and unmatched == []


def test_first_word_matches_are_reported():
    names = [*PRODUCT_NAMES.values(), *FIRST_WORD_NAMES.values(), "ZM 336372", "Unobtainium"]
    matched, unmatched, by_first_word = match_compounds_by_rule(names)
    assert unmatched == ["Unobtainium"]
    # a different compound sharing the first word is matched, and reported as such
    assert matched["ZM 336372"] == "ZM"
    # the table's own (mangled) name, and one whose bracket drops out ("(+)-JQ1" -> "jq1")
    full = {"Glesatinib?(MGCD265)", "JQ1"}
    expected = [n for d, n in FIRST_WORD_NAMES.items() if d not in full] + ["ZM 336372"]
    assert by_first_word == expected
    assert match_compounds(names) == (matched, unmatched)


def test_first_word_is_the_last_resort():
    table = pd.DataFrame({"name": ["Abc", "AbcDef", "Xyz"]})
    names = ["Abc Def", "Abc Qrs (Xyz)", "Abc 123", "Qrs Abc"]
    matched, unmatched = match_compounds(names, table=table)
    # the full name, then a bracketed alias, win over the first word
    assert matched == {"Abc Def": "AbcDef", "Abc Qrs (Xyz)": "Xyz", "Abc 123": "Abc"}
    assert unmatched == ["Qrs Abc"]


def test_every_table_name_matches_itself():
    names = sciplex3_compounds()["name"]
    matched, unmatched = match_compounds(names)
    assert unmatched == [] and all(matched[n] == n for n in names)


def test_name_matching_reports_unmatched():
    matched, unmatched = match_compounds(["Unobtainium", "control", "Belinostat"])
    assert matched == {"Belinostat": "Belinostat"}
    assert unmatched == ["Unobtainium", "control"]


def test_featurize_shapes_determinism_controls(tmp_path):
    write_chemcpa(tmp_path / "c.h5ad")
    adata = read_sciplex3(tmp_path / "c.h5ad")
    featurize_smiles(adata, method="both", n_bits=256, control_key="control")
    feats = adata.obsm["drug_features"]
    params = adata.uns["drug_features"]
    assert feats.shape == (adata.n_obs, params["n_features"]) and params["n_features"] > 256
    assert np.all(feats[adata.obs["control"].to_numpy()] == 0)
    assert np.all(np.any(feats[~adata.obs["control"].to_numpy()] != 0, axis=1))
    again = adata.copy()
    featurize_smiles(again, method="both", n_bits=256, control_key="control")
    assert np.array_equal(again.obsm["drug_features"], feats)
    # a brand-new SMILES at prediction time is featurised identically
    row = np.flatnonzero((adata.obs["condition"] == "Belinostat").to_numpy())[0]
    new = smiles_to_features([adata.obs["smiles"].iloc[row]], params=params)
    assert np.allclose(new[0], feats[row])
    # the sparse variant holds the same numbers
    sparse = adata.copy()
    featurize_smiles(sparse, method="both", n_bits=256, control_key="control", sparse=True)
    assert sp.issparse(sparse.obsm["drug_features"])
    assert np.array_equal(sparse.obsm["drug_features"].toarray(), feats)
    morgan = smiles_to_features(["CCO", "c1ccccc1"], method="morgan", n_bits=128)
    assert morgan.shape == (2, 128) and set(np.unique(morgan)) <= {0.0, 1.0}


def test_invalid_smiles_listed():
    adata = AnnData(
        X=np.ones((3, 2)),
        obs=pd.DataFrame({"smiles": ["CCO", "not_a_smiles", "C1CC"]}, index=list("abc")),
    )
    with pytest.raises(ValueError, match=r"not_a_smiles.*C1CC|C1CC.*not_a_smiles"):
        featurize_smiles(adata)


def test_ood_split_holds_out_exactly_the_nine(tmp_path):
    write_pertpy(tmp_path / "p.h5ad")
    adata = read_usable(tmp_path / "p.h5ad")
    sciplex3_ood_split(adata, n_validation_drugs=1, seed=0)
    split = adata.obs["split_ood"].astype(str)
    ood = set(adata.obs.loc[split == "ood", "condition"].astype(str))
    assert ood == set(SCIPLEX3_OOD_DRUGS)
    held = adata.obs[split == "ood"]
    assert held.groupby("condition", observed=True)["dose_nM"].nunique().eq(4).all()
    assert held.groupby("condition", observed=True)["cell_line"].nunique().eq(3).all()
    assert (split[adata.obs["control"].to_numpy()] == "train").all()
    assert adata.obs.loc[split == "valid", "condition"].nunique() == 1


def test_ood_split_reads_text_control_flags(tmp_path):
    write_pertpy(tmp_path / "p.h5ad")
    adata = read_usable(tmp_path / "p.h5ad")
    adata.obs["control"] = np.where(adata.obs["control"], "True", "False")
    sciplex3_ood_split(adata)
    split = adata.obs["split_ood"].astype(str)
    is_ood = adata.obs["condition"].isin(SCIPLEX3_OOD_DRUGS).to_numpy()
    assert (split[is_ood] == "ood").all() and (split[~is_ood] == "train").all()
    adata.obs["control"] = np.where(adata.obs["control"] == "True", "yes", "no")
    with pytest.raises(TypeError, match="'control'"):
        sciplex3_ood_split(adata)


def _write_canonical(path, control):
    belinostat = sciplex3_compounds().set_index("name").loc["Belinostat", "smiles"]
    obs = pd.DataFrame(
        {
            "condition": ["control", "control", "Belinostat", "Belinostat"],
            "cell_line": ["A549"] * 4,
            "dose_nM": [0.0, 0.0, 10.0, 10.0],
            "control": control,
            "smiles": ["", "", belinostat, belinostat],
        },
        index=list("abcd"),
    )
    AnnData(X=sp.csr_matrix(np.ones((4, 3), dtype=np.float32)), obs=obs).write_h5ad(path)


@pytest.mark.parametrize(
    "control", [["True", "True", "False", "False"], [1, 1, 0, 0], [True, True, False, False]]
)
def test_canonical_control_flags(tmp_path, control):
    _write_canonical(tmp_path / "c.h5ad", control)
    adata = read_sciplex3(tmp_path / "c.h5ad")
    assert list(adata.obs["control"]) == [True, True, False, False]
    assert list(adata.obs["dose_nM"]) == [0.0, 0.0, 10.0, 10.0]


def test_canonical_missing_control_flag_raises(tmp_path):
    _write_canonical(tmp_path / "c.h5ad", ["True", "True", None, "False"])
    with pytest.raises(ValueError, match="missing value"):
        read_sciplex3(tmp_path / "c.h5ad")


def test_chemcpa_control_column_variants(tmp_path):
    written = write_chemcpa(tmp_path / "c.h5ad")
    is_control = (written.obs["condition"] == "control").to_numpy()
    # CPA's all-zero column: the condition name decides
    _rewrite_obs(tmp_path / "c.h5ad", control=np.zeros(written.n_obs, dtype=np.int64))
    assert (read_sciplex3(tmp_path / "c.h5ad").obs["control"].to_numpy() == is_control).all()
    # text flags are read as flags ("False" is not True)
    _rewrite_obs(tmp_path / "c.h5ad", control=np.where(is_control, "True", "False"))
    assert (read_sciplex3(tmp_path / "c.h5ad").obs["control"].to_numpy() == is_control).all()
    # an unmatched compound's pathway: the file's `pathway`, not `pathway_level_1`
    condition = written.obs["condition"].astype(str).replace("AC480", "Mystery-123")
    _rewrite_obs(tmp_path / "c.h5ad", condition=condition.to_numpy())
    with pytest.warns(UserWarning, match="Mystery-123.*has them for every treated cell"):
        adata = read_sciplex3(tmp_path / "c.h5ad")
    mystery = (adata.obs["condition"] == "Mystery-123").to_numpy()
    assert mystery.sum() == 48 and (adata.obs.loc[mystery, "pathway"] == "Epigenetics").all()


def test_end_to_end_from_file(tmp_path):
    scvi.settings.seed = 0
    write_pertpy(tmp_path / "p.h5ad")
    adata = read_usable(tmp_path / "p.h5ad")
    featurize_smiles(adata, method="morgan", n_bits=128, control_key="control")
    sciplex3_ood_split(adata)
    gim_scvi.GIM.setup_anndata(
        adata,
        features_key="drug_features",
        control_key="control",
        dose_key="dose_nM",
        perturbation_key="condition",
        cell_line_key="cell_line",
    )
    model = gim_scvi.GIM(adata, n_programs=4)
    model.train(max_epochs=2, split_key="split_ood", batch_size=64, enable_progress_bar=False)
    assert set(adata.obs["split_ood"].iloc[model.train_indices].astype(str)) == {"train"}
    res = gim_scvi.tl.evaluate(
        model, adata, split_key="split_ood", heldout="ood", n_cells=10, n_degs=5, n_pcs=5
    )
    assert set(res["condition"]) == set(SCIPLEX3_OOD_DRUGS)
    # a brand-new compound from its SMILES
    new = smiles_to_features(["CC(=O)Nc1ccc(O)cc1"], params=adata.uns["drug_features"])
    pred = model.predict(features=new, doses=1000.0, conditions=["paracetamol"], n_cells=5)
    assert pred.n_obs == 15


def test_synthetic_sciplex_small():
    adata = gim_scvi.data.synthetic_sciplex(
        cells_per_condition=1, control_cells_per_line=20, n_genes=50, n_validation_drugs=3
    )
    assert adata.n_obs == 187 * 4 * 3 + 60
    assert set(adata.obs["cell_line"]) == set(LINES)
    split = adata.obs["split_ood"].astype(str)
    assert set(adata.obs.loc[split == "ood", "condition"]) == set(SCIPLEX3_OOD_DRUGS)
    truth = adata.uns["ground_truth"]
    assert truth["targets"].shape[0] == 187
    assert (truth["drugs"].loc[list(SCIPLEX3_OOD_DRUGS), "split"] == "ood").all()
    smiles = adata.obs.loc[~adata.obs["control"], "smiles"]
    assert (smiles != "").all()
    roundtrip = adata.copy()
    roundtrip.uns.pop("ground_truth")
    assert read_h5ad  # the file path is exercised in the reading tests


def test_train_command_on_a_file(tmp_path, capsys):
    from gim_scvi.cli import main

    write_chemcpa(tmp_path / "chemcpa.h5ad")
    code = main(
        [
            "train",
            "--data",
            str(tmp_path / "chemcpa.h5ad"),
            "--epochs",
            "2",
            "--n-programs",
            "3",
            "--n-bits",
            "64",
            "--n-validation-drugs",
            "1",
            "--quiet",
            "--out",
            str(tmp_path / "out"),
            "--degs",
            "file",  # the file's own chemCPA DEG lists
            "--n-top-genes",
            "30",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "kept the 30 most variable of 40" in printed
    assert "schema chemcpa" in printed and "held-out (OOD) drugs" in printed
    assert "(DEGs: file)" in printed
    assert "(both)" in printed  # Morgan bits and RDKit descriptors by default
    table = pd.read_csv(tmp_path / "out" / "heldout_metrics.csv")
    assert set(table["condition"]) == set(SCIPLEX3_OOD_DRUGS)


def test_canonical_schema_round_trip(tmp_path):
    adata = gim_scvi.data.synthetic_sciplex(
        cells_per_condition=1, control_cells_per_line=10, n_genes=30, n_validation_drugs=0
    )
    adata.uns.pop("ground_truth")
    adata.write_h5ad(tmp_path / "syn.h5ad")
    back = read_sciplex3(tmp_path / "syn.h5ad")
    assert back.uns["sciplex3"]["schema"] == "canonical"
    assert back.uns["sciplex3"]["counts"] == "X"
    assert (back.obs["condition"].astype(str) == adata.obs["condition"].astype(str)).all()
