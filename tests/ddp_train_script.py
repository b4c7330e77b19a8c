"""Train GIM with two DDP processes on CPU (gloo); run by tests/test_ddp.py.

Lightning's DDP launcher starts the second process by running this script again, so the
script is run as a file (``python tests/ddp_train_script.py OUT_DIR``), never imported.
Each rank saves its model under ``OUT_DIR/rank<r>``.
"""

import os
import sys

import scvi
import torch
from conftest import make_small, setup

import gim_scvi

if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    scvi.settings.seed = 0
    adata = setup(make_small())
    model = gim_scvi.GIM(adata, n_programs=4)
    model.train(
        max_epochs=int(os.environ.get("GIM_DDP_EPOCHS", 3)),
        split_key="split",
        validation_split="valid",
        batch_size=16,  # per process: the same 32 cells per optimiser step as one process
        accelerator="cpu",
        devices=2,
        strategy="ddp_find_unused_parameters_true",
        enable_progress_bar=False,
    )
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    print(f"GIM_DDP rank={rank} world={world}", flush=True)
    model.save(os.path.join(out, f"rank{rank}"))
