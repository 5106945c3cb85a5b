"""Metrics: console and JSONL always (rank 0), wandb when enabled, continued across restarts."""
from __future__ import annotations

import json
import os
import uuid

from . import dist


class MetricLogger:
    """log(dict) appends one JSON line to {run_dir}/metrics.jsonl and prints a compact line."""

    def __init__(self, run_dir: str, cfg, config_dict: dict, wandb_id: str | None = None):
        self.rank0 = dist.get_rank() == 0
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb_id = wandb_id or uuid.uuid4().hex[:12]
        self.run = None
        if self.rank0 and cfg.wandb:
            import wandb

            # The same id across restarts continues the run (id stored in every checkpoint's meta.json).
            self.run = wandb.init(project=cfg.wandb_project, id=self.wandb_id, resume="allow", mode=cfg.wandb_mode,
                                  dir=run_dir, config=config_dict)

    def log(self, record: dict, echo: bool = True) -> None:
        if not self.rank0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)
        if self.run is not None:
            self.run.log(record, step=int(record.get("nimg", 0)))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def read_metrics(run_dir: str) -> list[dict]:
    """All JSONL records of a run (empty when none)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
