"""Fixtures shared by the trainer tests."""
import pytest

from trainer_runs import train


@pytest.fixture(scope="session")
def ddp2_reference(tmp_path_factory) -> str:
    """An uninterrupted 2-process DDP run of TINY (6 steps); the baseline of several tests."""
    d = str(tmp_path_factory.mktemp("ddp2_ref"))
    train(d, ["train.snapshot_every_nimg=24"], nproc=2)
    return d
