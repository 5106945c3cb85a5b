"""slurm/ job scripts on a real Slurm cluster (.ci/slurm_setup.sh brings up one on localhost): a CPU job with 2 ranks
(gloo) finishes with a complete checkpoint; a job preempted with USR1 saves, requeues, resumes and ends with the
same weights as an uninterrupted run; slurm/pipeline.sh chains two stages with afterok, the second starting from
the first's weights. Skipped, saying why, where Slurm is not installed or no cluster answers."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slurm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# CPU allocation for every job: no GPUs (overrides the scripts' --gpus-per-node=8), one node, 2 cores.
CPU_JOB = ["--gpus-per-node=0", "--nodes=1", "--cpus-per-task=2", "--time=00:20:00"]
TINY = ["experiment=tiny", "train.checkpoint_every_nimg=512"]


def cluster_problem() -> str | None:
    """Why the Slurm tests cannot run here, or None."""
    for tool in ("sbatch", "sinfo", "squeue", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return (f"Slurm is not installed ({tool} not found); "
                    "run `sudo bash .ci/slurm_setup.sh` to set up a local cluster")
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no Slurm controller answers"
    if p.returncode != 0:
        return f"no Slurm controller answers (sinfo: {p.stderr.strip()[:200]}); run `sudo bash .ci/slurm_setup.sh`"
    if not {"idle", "mix", "alloc"} & set(p.stdout.split()):
        return f"no Slurm node is up (states: {p.stdout.split()})"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    why = cluster_problem()
    if why:
        pytest.skip(why)


def job_env(tmp, **extra) -> dict:
    env = {**os.environ, "FLOWDCN_HOME": REPO, "FLOWDCN_LOGS": str(tmp / "logs"), "NPROC_PER_NODE": "2",
           "FLOWDCN_LAUNCHER": "torchrun", "OMP_NUM_THREADS": "1"}
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    env.update(extra)
    return env


def sbatch(script: str, args: list[str], tmp, env: dict) -> str:
    p = subprocess.run(["sbatch", "--parsable", *CPU_JOB, f"--output={tmp}/%x-%j.out", script, *args], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def job_info(jid: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(jid: str, timeout: float = 300) -> dict:
    """Poll until the job has left the queue (finished for good, requeues included); its final record."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        q = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], capture_output=True, text=True, timeout=30)
        if not q.stdout.strip():
            return job_info(jid)
        time.sleep(0.5)
    subprocess.run(["scancel", jid], timeout=30)
    raise AssertionError(f"job {jid} still queued after {timeout} s: {job_info(jid)}")


def job_log(tmp, name: str, jid: str) -> str:
    with open(os.path.join(tmp, f"{name}-{jid}.out")) as f:
        return f.read()


def final_tensors(root, stage: str, nimg: int) -> dict:
    d = os.path.join(root, stage, "checkpoints", f"nimg_{nimg:012d}")
    return {f: load_file(os.path.join(d, f"{f}.safetensors")) for f in ("model", "ema")}


def assert_same(a: dict, b: dict) -> None:
    for f in a:
        assert sorted(a[f]) == sorted(b[f])
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), (f, k)


@pytest.fixture(scope="module")
def pretrain_pair(tmp_path_factory):
    """Two `sbatch slurm/pretrain_256.sh experiment=tiny` jobs (2 ranks): one runs through, one gets
    `scancel --signal=USR1 --batch` after its first steps."""
    tmp = tmp_path_factory.mktemp("slurm_pretrain")
    env = job_env(tmp)
    args = [*TINY, "train.total_nimg=2048"]
    ref = sbatch("slurm/pretrain_256.sh", [*args, f"root={tmp}/ref"], tmp, env)
    pre = sbatch("slurm/pretrain_256.sh", [*args, f"root={tmp}/pre"], tmp, env)
    metrics = os.path.join(tmp, "pre", "pretrain_256", "metrics.jsonl")
    t0, seen = time.time(), 0
    while time.time() - t0 < 240 and seen < 256:
        if os.path.exists(metrics):
            with open(metrics) as f:
                seen = max([json.loads(line).get("nimg", 0) for line in f if line.strip()] or [0])
        time.sleep(0.1)
    assert seen >= 256, f"job {pre} did not train: {job_info(pre)}"
    signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", pre], capture_output=True, text=True, timeout=30)
    assert signalled.returncode == 0, signalled.stderr
    return tmp, {"ref": (ref, wait_job(ref)), "pre": (pre, wait_job(pre))}


def test_pretrain_job_finishes_with_a_complete_checkpoint(pretrain_pair):
    tmp, jobs = pretrain_pair
    jid, info = jobs["ref"]
    log = job_log(tmp, "pretrain_256", jid)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log[-3000:]
    done = json.load(open(os.path.join(tmp, "ref", "pretrain_256", "DONE.json")))
    ck = os.path.join(tmp, "ref", "pretrain_256", "checkpoints", "nimg_000000002048")
    assert done["nimg"] == 2048 and done["checkpoint"] == ck
    assert os.path.exists(os.path.join(ck, "COMPLETE"))
    meta = json.load(open(os.path.join(ck, "meta.json")))
    assert meta["world_size"] == 2 and meta["state"]["nimg"] == 2048
    assert meta["backend"] == "gloo"      # strategy.backend None resolves to gloo on CPU
    assert final_tensors(os.path.join(tmp, "ref"), "pretrain_256", 2048)["ema"]
    # per-rank logs: torchrun tees each rank into logs/<job>/restart0/node0/.../<rank>/stdout.log
    logs = _find(os.path.join(tmp, "logs", f"pretrain_256-{jid}"), "stdout.log")
    ranks = {os.path.basename(os.path.dirname(p)) for p in logs}
    assert ranks == {"0", "1"}


def _find(root: str, name: str) -> list[str]:
    return [os.path.join(d, name) for d, _, files in os.walk(root) if name in files]


def test_preempted_job_saves_requeues_resumes_and_matches(pretrain_pair):
    tmp, jobs = pretrain_pair
    jid, info = jobs["pre"]
    log = job_log(tmp, "pretrain_256", jid)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    assert "USR1: time limit or preemption notice" in log and "requeueing job" in log
    saved = int(re.search(r"\[signal\] SIGTERM: checkpoint saved at nimg=(\d+)", log).group(1))
    assert 256 <= saved < 2048
    assert re.search(rf"\[resume\] \S+nimg_{saved:012d}: nimg={saved}", log), log[-3000:]
    assert "restart 1:" in log
    assert_same(final_tensors(os.path.join(tmp, "ref"), "pretrain_256", 2048),
                final_tensors(os.path.join(tmp, "pre"), "pretrain_256", 2048))


def test_pipeline_chains_stages_with_afterok_and_evaluates(tmp_path):
    """slurm/pipeline.sh on real latent shards (data_pipeline.tiny), one Slurm task per rank (FLOWDCN_LAUNCHER=srun):
    finetune_512 waits for pretrain_256 and starts from its final weights + EMA (0 images of its own, so its
    checkpoint is exactly what it started from); then slurm/eval_stage.sh -> slurm/eval_fid.sh evaluates it."""
    data = tmp_path / "data"
    build = subprocess.run([sys.executable, "-m", "data_pipeline.tiny", "--out", str(data)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (24, 64, 64, 3)).astype(np.uint8))
    eval_args = [f"vae={data}/vae", "metrics.extractor=tiny", "resolutions=[[64,64]]", "sampling=euler50",
                 "sampling.steps=3", "sampling.num_samples=8", "sampling.chunk_size=4", "metrics.is_splits=2",
                 f"reference.npz={tmp_path}/ref.npz", "device=cpu", f"out_dir={tmp_path}/eval", "run_name=r"]
    env = job_env(tmp_path, FLOWDCN_LAUNCHER="srun", SBATCH_EXTRA=" ".join(CPU_JOB), EVAL_STAGES="finetune_512",
                  EVAL_ARGS=" ".join(eval_args), EVAL_SBATCH_EXTRA=" ".join(CPU_JOB), GPUS_PER_NODE="1")
    root = tmp_path / "root"
    p = subprocess.run(["bash", "slurm/pipeline.sh", "pipeline=two_stage", f"root={root}", "experiment=tiny_latents",
                        f"data.latents.manifest={data}/latents/manifest.json", "train.total_nimg=128",
                        "finetune_512.train.total_nimg=0"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    ids = dict(line.split() for line in p.stdout.splitlines())
    assert list(ids) == ["pretrain_256", "finetune_512", "eval:finetune_512"]
    for after, job in (("pretrain_256", "finetune_512"), ("finetune_512", "eval:finetune_512")):
        dep = subprocess.run(["squeue", "-h", "-j", ids[job], "-o", "%E"], capture_output=True, text=True).stdout
        assert f"afterok:{ids[after]}" in dep, (job, dep)
    first, second, ev = (wait_job(ids[k]) for k in ("pretrain_256", "finetune_512", "eval:finetune_512"))
    logs = tmp_path / "logs"
    for info, (name, jid) in zip((first, second), list(ids.items())[:2]):
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job_log(logs, name, jid)[-3000:]
        assert sorted(os.listdir(logs / f"{name}-{jid}")) == ["rank0.log", "rank1.log"]
    assert second["StartTime"] >= first["EndTime"] and ev["StartTime"] >= second["EndTime"]
    final = json.load(open(root / "pretrain_256" / "DONE.json"))["checkpoint"]
    assert f"[init] weights and EMA from {final}" in job_log(logs, "finetune_512", ids["finetune_512"])
    assert_same(final_tensors(root, "pretrain_256", 128), final_tensors(root, "finetune_512", 0))
    # the evaluation job ran on the finished stage's final checkpoint
    eval_log = job_log(logs, "eval-finetune_512", ids["eval:finetune_512"])
    assert (ev["JobState"], ev["ExitCode"]) == ("COMPLETED", "0:0"), eval_log[-3000:]
    stage_final = json.load(open(root / "finetune_512" / "DONE.json"))["checkpoint"]
    assert f"evaluating finetune_512: {stage_final}" in eval_log
    metrics = json.load(open(tmp_path / "eval" / "r" / "metrics.json"))
    assert metrics["config"]["model"]["ckpt"] == stage_final
    assert "fid" in metrics["results"][0]["metrics"]
