"""bench/train_step.py runs end to end on CPU (tiny model) and writes its JSON."""
import json
import subprocess
import sys

from trainer_runs import REPO, env


def test_train_step_bench_cpu_smoke(tmp_path):
    out = tmp_path / "train_step.json"
    p = subprocess.run([sys.executable, "bench/train_step.py", "--models", "FlowDCN-debug", "SiT-debug", "--res", "32",
                        "--batch", "2", "--steps", "2", "--warmup", "1", "--device", "cpu", "--compile", "off",
                        "--out", str(out)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["model"] for r in res["rows"]] == ["FlowDCN-debug", "SiT-debug"]
    for r in res["rows"]:
        assert r["img_per_s"] > 0 and r["gflops_per_img"] > 0 and r["world"] == 1
        assert abs(r["loss"]) < 100
    assert "32px compile=False" in res["flowdcn_over_sit"]
    assert "FlowDCN / SiT img/s" in p.stdout
