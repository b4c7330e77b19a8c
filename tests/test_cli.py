import pandas as pd
import pytest

import gim_scvi
from gim_scvi.cli import _first_word_note, _without_compounds_lacking_smiles, main


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(
            ["demo", "--small", "--epochs", "2", "--n-programs", "4", "--quiet", "--out", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "held-out drugs" in printed and "target_auroc" in printed
    assert "GIM against each baseline" in printed and "95% interval" in printed
    table = pd.read_csv(out / "heldout_summary.csv")
    assert {"GIM", "control_mean", "mean_shift", "nearest_drug", "ridge"} == set(table["method"])
    assert (out / "demo_annotated.h5ad").exists() and (out / "model" / "model.pt").exists()
    assert (out / "heldout_scores.png").stat().st_size > 0
    # pairs of training drugs, scored next to the additive baseline
    assert "pairs of training drugs given together" in printed
    combos = pd.read_csv(out / "combination_metrics.csv")
    assert set(combos["method"]) == {"GIM", "control_mean", "mean_shift", "additive"}
    assert combos["condition"].str.contains("+", regex=False).all()


def test_unknown_command_exits():
    with pytest.raises(SystemExit):
        main(["nonsense"])


def test_evaluate_command(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--small", "--epochs", "1", "--n-programs", "3", "--quiet", "--out", str(out)])
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(out / "model"),
                "--data",
                str(out / "demo_annotated.h5ad"),
                "--out",
                str(tmp_path / "ev"),
                "--degs",
                "pooled_doses",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "ridge" in printed and "nearest_drug" in printed
    assert "(DEGs: pooled_doses)" in printed
    table = pd.read_csv(tmp_path / "ev" / "heldout_metrics.csv")
    assert len(table) > 0 and table["r2_all"].notna().all()


def test_train_leaves_out_compounds_without_smiles(tmp_path, capsys):
    from test_sciplex import read_usable, write_pertpy

    write_pertpy(tmp_path / "p.h5ad", extra_name="Mystery compound 7")
    with pytest.warns(UserWarning, match="refuses them"):
        adata = read_usable(tmp_path / "p.h5ad")
    mystery = (adata.obs["condition"] == "Mystery compound 7").to_numpy()
    assert mystery.any()
    kept = _without_compounds_lacking_smiles(adata)
    assert kept.n_obs == adata.n_obs - mystery.sum()
    assert "left out" in capsys.readouterr().out and "Mystery compound 7" in str(
        kept.uns["sciplex3"]["unmatched"]
    )
    gim_scvi.pp.featurize_smiles(kept, n_bits=64, control_key="control")  # no error now


def test_first_word_note_names_the_matches():
    assert _first_word_note({"matched_by_first_word": []}) == ""
    names = ["ZM 447439", "AZ 960", "GSK J1", "Ellagic acid"]
    note = _first_word_note({"matched_by_first_word": names})
    assert note == ", 4 matched by their first word only (ZM 447439, AZ 960, GSK J1, ...)"
