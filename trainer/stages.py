"""Stage pipelines: ``python -m trainer.stages {run,status,final,list} [options] [overrides]`` (``flowdcn-pipeline``).

A pipeline (configs/pipeline/<name>.yaml) lists stages (configs/stage/<name>.yaml) in order. Stage ``s`` trains in
``{root}/{s}`` with the ordinary trainer (trainer.train.run), so everything the trainer does (resume from the newest
complete checkpoint, signals, DONE.json) holds per stage. ``run`` walks the stages: a stage whose DONE.json reached
its planned images is skipped, the current one resumes, and a new one starts from the previous stage's final
checkpoint (weights + EMA via ``init_from``; fresh optimizer and data position). The same command is run on every
rank (torchrun / srun); what to do with each stage is decided from the files in ``root`` by rank 0 and broadcast.
``status`` prints a table (or JSON) of every stage; ``final`` prints a finished stage's last checkpoint; ``list`` the
stage names (for slurm/pipeline.sh).

Arguments (``key=value``):
  pipeline=default          configs/pipeline/<name>.yaml
  root=DIR                  run root (default: the pipeline's ``root``); stage s lives in DIR/s
  only=a,b                  run/show only these stages (their predecessors must be done)
  format=table|json         status output
  check_data=false          resume a stage although its data settings changed (e.g. only the shard paths moved)
  <stage>.<override>        a train override for one stage, e.g. finetune_512.train.total_nimg=1000
  anything else             a train override for every stage, e.g. experiment=tiny model=flowdcn_l2
Exit codes: 0 all selected stages done, the trainer's ``signals.exit_code`` (3) stopped by a signal after saving.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field

from omegaconf import OmegaConf

COMMANDS = ("run", "status", "final", "list")
RUNNER_KEYS = ("pipeline", "root", "only", "format", "check_data")
STAGE_SLOT = "stage"                      # the Hydra group of configs/stage/
COMPOSE_NAME = "_stage_train"              # train.yaml with a stage slot before `experiment` (see stage_primary)


class StageError(Exception):
    """A pipeline that cannot run as asked (missing predecessor, changed data, bad config); the message says why."""


@dataclass
class PipelineArgs:
    """Parsed command line of the runner."""

    command: str = "run"
    pipeline: str = "default"
    root: str | None = None
    only: list[str] = field(default_factory=list)
    format: str = "table"                                           # status output: table | json
    check_data: bool = True                                         # refuse resuming with other data settings
    common: list[str] = field(default_factory=list)                 # train overrides for every stage
    per_stage: dict[str, list[str]] = field(default_factory=dict)    # train overrides for one stage


@dataclass
class Stage:
    """One stage of a pipeline, resolved: its train config and where it stands on disk."""

    name: str
    run_dir: str
    overrides: list[str]
    cfg: object = None                    # trainer.config.TrainConfig (set by compose_stage)
    config_dict: dict | None = None


def config_dir() -> str:
    """configs/ of this checkout (the trainer's CONFIG_DIR, without importing torch for status/list)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def stage_names() -> list[str]:
    """Every stage config in configs/stage/."""
    d = os.path.join(config_dir(), STAGE_SLOT)
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".yaml"))


def parse_args(argv: list[str]) -> PipelineArgs:
    """Split argv into the command, runner options, per-stage and common train overrides."""
    args = PipelineArgs()
    rest = list(argv)
    if rest and "=" not in rest[0]:
        if rest[0] not in COMMANDS:
            raise SystemExit(f"trainer.stages: unknown command {rest[0]!r} (expected one of {', '.join(COMMANDS)})")
        args.command = rest.pop(0)
    known = stage_names()
    for item in rest:
        if "=" not in item:
            raise SystemExit(f"trainer.stages: argument {item!r} is not key=value")
        key, value = item.split("=", 1)
        if key in RUNNER_KEYS:
            if key == "only":
                args.only = [s for s in value.strip("[]").split(",") if s]
            elif key == "format" and value not in ("table", "json"):
                raise SystemExit(f"trainer.stages: format={value!r}: expected table or json")
            elif key == "check_data":
                if value.lower() not in ("true", "false"):
                    raise SystemExit(f"trainer.stages: check_data={value!r}: expected true or false")
                args.check_data = value.lower() == "true"
            else:
                setattr(args, key, value)
            continue
        prefix = key.lstrip("+~")
        head = prefix.split(".", 1)[0]
        if head in known:
            if "." not in prefix:
                raise SystemExit(f"trainer.stages: {item!r}: a stage override needs a key, "
                                 f"e.g. {head}.train.total_nimg=...")
            sigil = key[: len(key) - len(prefix)]
            args.per_stage.setdefault(head, []).append(f"{sigil}{prefix.split('.', 1)[1]}={value}")
        elif prefix in ("run_dir", "init_from"):
            raise SystemExit(f"trainer.stages: {key} is set per stage by the runner; "
                             "use root=... (or <stage>.init_from=...)")
        else:
            args.common.append(item)
    return args


def load_pipeline(name: str) -> dict:
    """configs/pipeline/<name>.yaml as a plain dict, checked."""
    path = os.path.join(config_dir(), "pipeline", f"{name}.yaml")
    if not os.path.exists(path):
        have = sorted(f[:-5] for f in os.listdir(os.path.dirname(path)) if f.endswith(".yaml"))
        raise StageError(f"pipeline {name!r}: no {path} (have: {', '.join(have)})")
    p = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    unknown = set(p) - {"root", "stages", "stage_overrides"}
    if unknown or not p.get("stages"):
        raise StageError(f"pipeline {path}: needs a non-empty `stages` list; unknown keys: {sorted(unknown)}")
    known = stage_names()
    for s in p["stages"]:
        if s not in known:
            raise StageError(f"pipeline {path}: stage {s!r} has no configs/stage/{s}.yaml (have: {', '.join(known)})")
    if len(set(p["stages"])) != len(p["stages"]):
        raise StageError(f"pipeline {path}: a stage is listed twice: {p['stages']}")
    for s in p.get("stage_overrides") or {}:
        if s not in p["stages"]:
            raise StageError(f"pipeline {path}: stage_overrides for {s!r}, which is not in stages {p['stages']}")
    return p


def stage_primary() -> str:
    """Name of a primary config = configs/train.yaml with an optional ``stage`` group just before ``experiment``.

    The stage must come before the experiment so that presets like experiment=tiny shrink every stage; if
    train.yaml already has a stage slot it is used as is.
    """
    from hydra.core.config_store import ConfigStore

    base = OmegaConf.to_container(OmegaConf.load(os.path.join(config_dir(), "train.yaml")))
    defaults = base.get("defaults", [])
    names = [next(iter(d)).replace("optional ", "") if isinstance(d, dict) else d for d in defaults]
    if STAGE_SLOT in names:
        return "train"
    at = names.index("experiment") if "experiment" in names else len(defaults)
    defaults.insert(at, {f"optional {STAGE_SLOT}": None})
    ConfigStore.instance().store(name=COMPOSE_NAME, node=base)
    return COMPOSE_NAME


def compose_stage(stage: Stage) -> Stage:
    """Compose the stage's train config with Hydra and convert it to the typed TrainConfig."""
    from hydra import compose, initialize_config_dir

    from .train import to_typed

    primary = stage_primary()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        raw = compose(primary, overrides=[f"{STAGE_SLOT}={stage.name}", *stage.overrides, f"run_dir={stage.run_dir}"])
    stage.cfg, stage.config_dict = to_typed(raw)
    return stage


def resolve_stages(args: PipelineArgs) -> tuple[str, list[Stage]]:
    """(root, every stage of the pipeline with its composed config), in pipeline order."""
    p = load_pipeline(args.pipeline)
    root = os.path.abspath(args.root or p.get("root") or "runs/pipeline")
    for s in list(args.per_stage) + args.only:
        if s not in p["stages"]:
            raise SystemExit(f"trainer.stages: stage {s!r} is not in pipeline {args.pipeline!r} "
                             f"({', '.join(p['stages'])})")
    stages = []
    for name in p["stages"]:
        ov = [*((p.get("stage_overrides") or {}).get(name, [])), *args.common, *args.per_stage.get(name, [])]
        stages.append(compose_stage(Stage(name, os.path.join(root, name), ov)))
    return root, stages


# ----------------------------------------------------------------------------- on-disk state


def read_done(run_dir: str) -> dict | None:
    """The stage's DONE.json, or None; a corrupt file is an error naming it."""
    path = os.path.join(run_dir, "DONE.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise StageError(f"corrupt {path}: {e}") from None


def is_done(stage: Stage) -> bool:
    """True when DONE.json exists and reached the stage's planned images (a raised total_nimg resumes it)."""
    done = read_done(stage.run_dir)
    return done is not None and int(done.get("nimg", 0)) >= stage.cfg.train.total_nimg


def complete_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint directories of a run, oldest first (read only: nothing is created or warned)."""
    from .checkpoint import MARKER

    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root)
                   if n.startswith("nimg_") and os.path.exists(os.path.join(root, n, MARKER)))
    return [os.path.join(root, n) for n in names]


def final_checkpoint(stage: Stage) -> str:
    """The checkpoint a finished stage hands to the next one (DONE.json's, which must still exist)."""
    done = read_done(stage.run_dir)
    if done is None or not is_done(stage):
        raise StageError(f"stage {stage.name!r} is not done: {os.path.join(stage.run_dir, 'DONE.json')} missing "
                           f"or below train.total_nimg={stage.cfg.train.total_nimg}; run it first")
    ck = done.get("checkpoint")
    if not ck or not os.path.exists(os.path.join(ck, "ema.safetensors")):
        raise StageError(f"stage {stage.name!r}: DONE.json names checkpoint {ck!r}, which has no ema.safetensors")
    return ck


# Loader knobs that change how batches are fetched, not which batches come next.
IO_ONLY_KEYS = ("num_workers", "prefetch_factor", "pin_memory", "verify_checksums", "max_open_shards")


def data_signature(config_dict: dict) -> dict:
    """What fixes the meaning of a saved data position: data source + batch geometry (not the I/O knobs)."""
    data = json.loads(json.dumps(config_dict.get("data") or {}))
    for k in IO_ONLY_KEYS:
        (data.get("latents") or {}).pop(k, None)
    return {"data": data, "global_batch": config_dict.get("train", {}).get("global_batch")}


def check_resumable(stage: Stage) -> None:
    """A stage resumed with another data source, bucket table or resolution would misread its loader position."""
    cks = complete_checkpoints(stage.run_dir)
    if not cks:
        return
    meta_path = os.path.join(cks[-1], "meta.json")
    with open(meta_path) as f:
        saved = json.load(f).get("config") or {}
    old, new = data_signature(saved), data_signature(stage.config_dict)
    if old != new:
        diff = sorted(k for k in set(_flat(old)) | set(_flat(new)) if _flat(old).get(k) != _flat(new).get(k))
        raise StageError(f"stage {stage.name!r}: checkpoint {cks[-1]} was saved with different data settings "
                         f"({', '.join(diff)}); its loader position does not apply. Restore the settings, start "
                         f"the stage afresh (move {stage.run_dir} away), or pass check_data=false if only paths "
                         "moved")


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


# ----------------------------------------------------------------------------- commands


def select(stages: list[Stage], only: list[str]) -> list[Stage]:
    return [s for s in stages if not only or s.name in only]


def plan_stage(stages: list[Stage], i: int, check_data: bool = True) -> tuple[str, str | None]:
    """What to do with stage i: (skip | resume | explicit | previous | scratch, init_from) or (error, message)."""
    stage = stages[i]
    try:
        if is_done(stage):
            return "skip", None
        if complete_checkpoints(stage.run_dir):
            if check_data:
                check_resumable(stage)
            return "resume", None
        if stage.cfg.init_from:
            return "explicit", stage.cfg.init_from
        if i > 0:
            return "previous", final_checkpoint(stages[i - 1])
        return "scratch", None
    except StageError as e:
        return "error", str(e)


def agree(decision):
    """Rank 0's decision on every rank: a file another node wrote a moment ago may not be visible everywhere yet."""
    from . import dist

    if not dist.is_dist():
        return decision
    import torch.distributed as tdist

    box = [decision]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def run_pipeline(args: PipelineArgs) -> int:
    """Run the selected stages in order; returns the exit code (non-zero stops the pipeline)."""
    from . import dist
    from .train import run

    root, stages = resolve_stages(args)
    chosen = select(stages, args.only)
    dist.init(chosen[0].cfg.strategy.backend)      # once for all stages, so that every decision is rank 0's
    for i, stage in enumerate(stages):
        if stage not in chosen:
            continue
        action, arg = agree(plan_stage(stages, i, args.check_data))
        if action == "error":
            raise StageError(arg)
        cfg = stage.cfg
        if action == "skip":
            dist.print0(f"[stages] {stage.name}: done, skipped ({os.path.join(stage.run_dir, 'DONE.json')})")
            continue
        if action == "resume":
            dist.print0(f"[stages] {stage.name}: resuming in {stage.run_dir}")
        elif action == "explicit":
            dist.print0(f"[stages] {stage.name}: starting from {arg} (init_from set explicitly)")
        elif action == "previous":
            cfg.init_from = stage.config_dict["init_from"] = arg
            dist.print0(f"[stages] {stage.name}: starting from {stages[i - 1].name}'s final weights + EMA {arg}")
        else:
            dist.print0(f"[stages] {stage.name}: starting from scratch in {stage.run_dir}")
        code = run(cfg, stage.config_dict)
        if code:
            dist.print0(f"[stages] {stage.name}: stopped with exit code {code}; re-run the same command to resume")
            return code
    dist.print0(f"[stages] all of {', '.join(s.name for s in chosen)} done in {root}")
    return 0


def stage_status(stage: Stage) -> dict:
    """One status row: images seen / planned, last checkpoint, last loss, done."""
    from .logger import read_metrics

    planned = stage.cfg.train.total_nimg
    cks = complete_checkpoints(stage.run_dir)
    ck_nimg, last_ck = 0, None
    if cks:
        last_ck = cks[-1]
        ck_nimg = int(os.path.basename(last_ck).split("_", 1)[1])
    recs = read_metrics(stage.run_dir) if os.path.isdir(stage.run_dir) else []
    losses = [r for r in recs if isinstance(r.get("loss"), (int, float))]
    seen = max([ck_nimg] + [int(r.get("nimg", 0)) for r in recs])
    last_loss = losses[-1]["loss"] if losses else None
    done = is_done(stage)
    stopped = os.path.join(stage.run_dir, "STOPPED.json")
    if done:
        state = "done"
    elif os.path.exists(stopped):
        with open(stopped) as f:
            state = f"stopped by {json.load(f).get('signal', 'a signal')}, resumable"
    else:
        state = "in progress or interrupted" if seen else "not started"
    return {"stage": stage.name, "nimg": seen, "planned": planned, "checkpoint": last_ck, "checkpoint_nimg": ck_nimg,
            "last_loss": last_loss, "done": done, "state": state, "run_dir": stage.run_dir}


def format_status(root: str, rows: list[dict]) -> str:
    """A fixed-width table of stage rows."""
    def human(n: int) -> str:
        for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if n >= k:
                return f"{n / k:.4g}{unit}"
        return str(n)

    head = ("stage", "images seen / planned", "%", "last checkpoint", "last loss", "state")
    body = []
    for r in rows:
        pct = 100.0 * r["nimg"] / r["planned"] if r["planned"] else 0.0
        ck = os.path.relpath(r["checkpoint"], root) if r["checkpoint"] else "-"
        loss = "-" if r["last_loss"] is None or not math.isfinite(r["last_loss"]) else f"{r['last_loss']:.4f}"
        body.append((r["stage"], f"{human(r['nimg'])} / {human(r['planned'])}", f"{pct:.1f}", ck, loss, r["state"]))
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    lines = [f"pipeline root: {root}", "  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Console entry: run | status | final (prints the last selected stage's final checkpoint) | list (stage names)."""
    try:
        return _main(parse_args(sys.argv[1:] if argv is None else argv))
    except StageError as e:
        print(f"trainer.stages: error: {e}", file=sys.stderr, flush=True)
        return 2


def _main(args: PipelineArgs) -> int:
    if args.command == "run":
        from . import dist

        code = run_pipeline(args)
        dist.destroy()
        return code
    if args.command == "list":   # stage names only (slurm/pipeline.sh): no composition, no torch import
        p = load_pipeline(args.pipeline)
        print(" ".join(s for s in p["stages"] if not args.only or s in args.only))
        return 0
    root, stages = resolve_stages(args)
    chosen = select(stages, args.only)
    if args.command == "status":
        rows = [stage_status(s) for s in chosen]
        print(json.dumps(rows, indent=1) if args.format == "json" else format_status(root, rows))
        return 0
    print(final_checkpoint(chosen[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
