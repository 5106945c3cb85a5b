"""Helpers for trainer tests (imported as `trainer_runs`): tiny digits runs launched in-process, as a plain process, or under torchrun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# FlowDCN-debug shrunk further: 8×8 digits, 8 images per step, fp32 and deterministic (bitwise CPU resume).
TINY = [
    "model.name=FlowDCN-debug",
    "+model.overrides={in_channels: 1, num_classes: 10, hidden_size: 32, depth: 2, groups: 4}",
    "train.global_batch=8", "train.total_nimg=48", "train.log_every_nimg=8", "train.checkpoint_every_nimg=24",
    "train.keep_last=10", "train.precision=fp32", "train.deterministic=true", "optim.lr=1e-3",
    "ema.decay=0.9", "logging.progress=false", "preview.per_class=1", "preview.num_classes_shown=2",
    "preview.sampler.steps=2",
]


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.pop("WORLD_SIZE", None)
    return e


def command(run_dir: str, overrides: list[str], nproc: int = 0) -> list[str]:
    """``python -m trainer.train`` (nproc=0) or ``torchrun --nproc_per_node nproc -m trainer.train``."""
    head = [sys.executable, "-m", "trainer.train"]
    if nproc:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "-m", "trainer.train"]
    return head + TINY + [f"run_dir={run_dir}"] + list(overrides)


def train(run_dir: str, overrides: list[str] = (), nproc: int = 0, timeout: int = 240, check: bool = True):
    """Run training to completion; returns the CompletedProcess (raises with the output tail on failure)."""
    p = subprocess.run(command(run_dir, overrides, nproc), cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"training failed (rc={p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def train_until(run_dir: str, overrides: list[str], nproc: int, nimg: int, sig: int, timeout: int = 240):
    """Start training, send ``sig`` to the launcher once metrics.jsonl reaches ``nimg``; returns (rc, output).

    Under torchrun the workers are held still while the launcher forwards the signal (``signal_frozen_workers``), so
    the stop lands within a step of ``nimg`` however loaded the machine is."""
    p = subprocess.Popen(command(run_dir, overrides, nproc), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if p.poll() is not None:
                break
            if any(r["nimg"] >= nimg for r in metrics(run_dir)):
                if sig == signal.SIGKILL:   # the launcher and its workers (torchrun puts them in their own sessions)
                    kill_tree(p.pid)
                elif nproc:
                    signal_frozen_workers(p.pid, sig)
                else:
                    os.kill(p.pid, sig)
                break
            time.sleep(0.05)
        out, _ = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            kill_tree(p.pid)
    return p.returncode, out


def signal_frozen_workers(launcher: int, sig: int, timeout: float = 60.0) -> None:
    """Send ``sig`` to torchrun with its workers stopped until torchrun has forwarded it to all of them.

    Without the freeze the workers keep stepping while torchrun forwards the signal: on a loaded machine the run
    could reach its end before the signal lands, and the test would prove nothing. Linux only (the pending signal
    shows in /proc/<pid>/status of a stopped worker); elsewhere the signal is just sent.
    """
    import psutil

    if not os.path.exists(f"/proc/{launcher}/status"):
        os.kill(launcher, sig)
        return
    workers = psutil.Process(launcher).children(recursive=True)
    try:
        for w in workers:
            try:
                w.send_signal(signal.SIGSTOP)
            except psutil.NoSuchProcess:
                pass
        # SIGSTOP takes effect asynchronously: a worker still running could take the forwarded signal itself, and the
        # wait below would never see it pending. Signal the launcher only once every worker has stopped.
        _wait_for(lambda: all(_stopped(w) for w in workers), timeout, "torchrun's workers to stop")
        os.kill(launcher, sig)
        bit = 1 << (sig - 1)
        _wait_for(lambda: all(_pending(w) & bit for w in workers), timeout, f"torchrun to forward signal {sig}")
    finally:
        for w in workers:
            try:
                w.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass


def _wait_for(cond, timeout: float, what: str) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.01)


def _stopped(proc) -> bool:
    import psutil

    try:
        return proc.status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return True


def _pending(proc) -> int:
    """Signals pending on a process (thread- and process-directed), as a bit mask; all bits once it is gone."""
    try:
        if not proc.is_running():   # psutil also catches a reused PID
            return -1
        with open(f"/proc/{proc.pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return -1
    return int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (children first)."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for child in parent.children(recursive=True):
        child.kill()
    parent.kill()


def metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:   # a line being written right now
                pass
    return out


def losses(run_dir: str) -> dict[int, float]:
    """nimg -> logged loss (every step is logged in TINY runs)."""
    return {r["nimg"]: r["loss"] for r in metrics(run_dir)}


def grad_norms(run_dir: str) -> dict[int, float]:
    """nimg -> logged grad norm: unlike the early losses (the zero-initialised final layer makes the first
    outputs ~0), it depends on every parameter's gradient."""
    return {r["nimg"]: r["grad_norm"] for r in metrics(run_dir)}


def assert_close_logs(a_dir: str, b_dir: str, rtol: float) -> None:
    """Same logged steps; losses and grad norms equal within ``rtol`` (0 = bitwise)."""
    for get in (losses, grad_norms):
        a, b = get(a_dir), get(b_dir)
        assert sorted(a) == sorted(b), (sorted(a), sorted(b))
        for n in b:
            assert abs(a[n] - b[n]) <= rtol * abs(b[n]), (get.__name__, n, a[n], b[n])
