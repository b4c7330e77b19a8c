import pandas as pd
import pytest

from gim_scvi.cli import main


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
    table = pd.read_csv(out / "heldout_summary.csv")
    assert set(table["method"]) == {"GIM", "control_mean"}
    assert (out / "demo_annotated.h5ad").exists() and (out / "model" / "model.pt").exists()


def test_unknown_command_exits():
    with pytest.raises(SystemExit):
        main(["nonsense"])
