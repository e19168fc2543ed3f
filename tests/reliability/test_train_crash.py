"""Training crash: ``kill -9`` the training command mid-epoch; the same command run again resumes from the
last checkpoint instead of starting over, and finishes the planned epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from faults import Cli

# Each test starts several commands, each with its own local Ray: minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_training_resumes_from_last_checkpoint(small_shards, tmp_path, ledger):
    out = tmp_path / "model"
    last = Path(f"{out}.train") / "checkpoints" / "last.pt"
    args = [
        "train",
        "--shards",
        str(small_shards),
        "--out",
        str(out),
        "--model",
        "fl_tiny",
        "--epochs",
        "4",
        "--workers",
        "2",
        "--patience",
        "10",
        "--batch-size",
        "32",
    ]
    with ledger.fault("train: kill -9 driver mid-epoch (epoch 0 checkpointed)"):
        c = Cli(args, tmp_path, name="train-kill")
        hit = c.wait_for(lambda: last.exists(), 400, poll=0.05)
        c.kill()  # the next epoch has begun: the kill lands inside it
        assert hit, c.output[-3000:]
        # The checkpoint on disk is whole (published atomically) and loads without unpickling objects.
        saved = torch.load(last, map_location="cpu", weights_only=True)
        assert saved["epoch"] < 3 and not out.exists()

        c = Cli(args, tmp_path, name="train-resume")
        rc = c.finish(600)
        assert rc == 0, c.output[-3000:]
        history = json.loads((out / "curves.json").read_text())
        assert [h["epoch"] for h in history] == [0, 1, 2, 3]
        # Resumed, not retrained: the epochs before the kill are the checkpoint's own records, measured
        # throughput included, which a fresh run could not reproduce to the last digit.
        assert history[: saved["epoch"] + 1] == json.loads(json.dumps(saved["history"]))
        assert (out / "version").is_file()
