"""Data-parallel training with two CPU processes (Lightning DDP, gloo backend)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import scvi
import torch
from conftest import make_small, setup

import gim_scvi

SCRIPT = Path(__file__).with_name("ddp_train_script.py")
EPOCHS = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "GIM_DDP_EPOCHS": str(EPOCHS),
        "CUDA_VISIBLE_DEVICES": "",
    }
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)],
        cwd=SCRIPT.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run.stdout


def test_two_processes_train_one_model(ddp_models):
    out, stdout = ddp_models
    assert "GIM_DDP rank=0 world=2" in stdout and "GIM_DDP rank=1 world=2" in stdout
    adata = setup(make_small())
    ranks = [gim_scvi.GIM.load(out / f"rank{r}", adata=adata) for r in (0, 1)]
    # gradients are averaged across processes, so both hold the same weights
    for name, value in ranks[0].module.state_dict().items():
        assert torch.equal(value, ranks[1].module.state_dict()[name]), name
    assert ranks[0].module.scm.is_acyclic()


def test_ddp_model_predicts_like_a_single_process_one(ddp_models):
    out, _ = ddp_models
    adata = setup(make_small())
    ddp = gim_scvi.GIM.load(out / "rank0", adata=adata)
    scvi.settings.seed = 0
    single = gim_scvi.GIM(adata, n_programs=4)
    single.train(
        max_epochs=EPOCHS,
        split_key="split",
        validation_split="valid",
        batch_size=32,
        enable_progress_bar=False,
    )
    scores = {
        name: gim_scvi.tl.evaluate(model, adata, split_key="split", heldout="test")
        for name, model in (("ddp", ddp), ("single", single))
    }
    r2 = {k: v.loc[v["method"] == "GIM", "r2_all"].mean() for k, v in scores.items()}
    assert r2["ddp"] > 0.1  # learned the held-out responses (control-mean level is ~0)
    assert r2["ddp"] > r2["single"] - 0.05
