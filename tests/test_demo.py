"""The README's main job, shortened: the real entry point on the built-in digits, end to end."""
import json
import os
import subprocess
import sys

from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(run_dir, *extra):
    cmd = [sys.executable, "-m", "trainer.train", "experiment=digits", f"run_dir={run_dir}", "train.total_nimg=2560",
           "train.log_every_nimg=1280", "train.checkpoint_every_nimg=1280", "preview.per_class=2",
           "preview.sampler.steps=4", "logging.progress=false", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_digits_demo_end_to_end_and_rerun_resumes(tmp_path):
    run_dir = tmp_path / "digits"
    r = run_demo(run_dir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "classifier accuracy on generated digits" in r.stdout
    done = json.loads((run_dir / "DONE.json").read_text())
    assert done["nimg"] == 2560 and 0.0 <= done["sample_accuracy"] <= 1.0 and done["real_accuracy"] > 0.9
    for f in ("samples.png", "loss.png", "metrics.jsonl"):
        assert (run_dir / f).stat().st_size > 0, f
    ckpt = done["checkpoint"]
    assert os.path.exists(os.path.join(ckpt, "COMPLETE"))
    ema = load_file(os.path.join(ckpt, "ema.safetensors"))
    assert "blocks.0.attn.v.weight" in ema
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["nimg"] for x in lines] == [1280, 2560]
    # Re-running the same command resumes from the final checkpoint: no new steps are taken.
    r2 = run_demo(run_dir)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "[resume]" in r2.stdout
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
