"""End-to-end evaluation with a tiny FlowDCN + tiny VAE on a non-square grid: rank invariance, resumption, outputs."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from evaluation.config import ModelLoadConfig
from evaluation.run import evaluate, to_config
from evaluation.sample import ChunkSampler, load_eval_model, to_uint8

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N, RES = 14, (32, 64)   # 14 samples in chunks of 4 (last one partial); latent 4x8 -> 2x4 tokens


def overrides(ckpt, vae, ref, out_dir, **extra):
    """Hydra overrides of the tiny job, shared by the in-process and the torchrun runs."""
    o = {
        "model.ckpt": ckpt, "vae": vae, "resolutions": f"[[{RES[0]},{RES[1]}]]", "sampling": "euler50",
        "sampling.steps": 3, "sampling.num_samples": N, "sampling.chunk_size": 4, "sampling.batch_size": 3,
        "sampling.decode_batch_size": 2,
        "sampling.cfg_scale": 1.5, "sampling.guidance_interval": "[0.0,0.7]", "sampling.smax_policy": "official",
        "sampling.smax_train_grid": "[2,2]", "sampling.seed": 7, "metrics.extractor": "tiny", "metrics.is_splits": 2,
        "reference.npz": ref, "out_dir": out_dir, "run_name": "r", "save_npz": "true", "grid_size": 6, "device": "cpu",
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def compose(ovr):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(REPO, "configs", "eval"), version_base="1.3"):
        return to_config(hydra_compose("fid50k", overrides=ovr))


def single_thread(fn):
    """Run with one intra-op thread, as each torchrun rank does, so results can be compared bitwise."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_ckpt, tiny_vae, tiny_ref_npz):
    out = str(tmp_path_factory.mktemp("full"))
    report = single_thread(lambda: evaluate(compose(overrides(tiny_ckpt, tiny_vae, tiny_ref_npz, out))))
    return report, os.path.join(out, "r")


def chunk_files(run_dir):
    d = os.path.join(run_dir, f"{RES[0]}x{RES[1]}", "chunks")
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))


def test_outputs_json_markdown_grid_npz(full_run, tiny_ckpt):
    report, run_dir = full_run
    res = json.load(open(os.path.join(run_dir, "metrics.json")))["results"][0]
    m = res["metrics"]
    for k in ("fid", "sfid", "is", "precision", "recall"):
        assert isinstance(m[k], float) and np.isfinite(m[k]), k
    sha = hashlib.sha256(open(os.path.join(tiny_ckpt, "ema.safetensors"), "rb").read()).hexdigest()
    assert res["checkpoint"]["sha256"] == sha and res["checkpoint"]["name"] == "FlowDCN-debug"
    assert res["sampling"]["cfg_scale"] == 1.5 and res["sampling"]["smax_policy"] == "official"
    assert json.load(open(os.path.join(run_dir, "config.json")))["sampling"]["seed"] == 7
    assert f"| {RES[0]}x{RES[1]} | euler | 3 | 1.5 |" in open(os.path.join(run_dir, "results.md")).read()
    rdir = os.path.join(run_dir, f"{RES[0]}x{RES[1]}")
    assert Image.open(os.path.join(rdir, "grid.png")).size == (3 * RES[1], 2 * RES[0])   # 6 samples, 3 per row
    z = np.load(os.path.join(rdir, "samples.npz"))
    assert z["arr_0"].shape == (N, *RES, 3) and z["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(z["arr_1"], np.arange(N) % 10)                          # class-balanced labels
    chunks = [load_file(f) for f in chunk_files(run_dir)]
    assert [len(c["indices"]) for c in chunks] == [4, 4, 4, 2]
    np.testing.assert_array_equal(z["arr_0"], torch.cat([c["images"] for c in chunks]).numpy())
    assert len(set(z["arr_0"].reshape(N, -1).sum(1).tolist())) == N                     # distinct samples


def test_a_sample_depends_only_on_its_index(full_run, tiny_ckpt, tiny_vae):
    """Sample 9 generated alone equals sample 9 generated inside its chunk's batch."""
    from data_pipeline.vae import build_vae
    from evaluation.inception import TinyExtractor
    from evaluation.sample import build_velocity_fn

    _, run_dir = full_run
    cfg = compose(overrides(tiny_ckpt, tiny_vae, "x", "y"))
    loaded = load_eval_model(cfg.model, torch.device("cpu"))
    vae = build_vae(tiny_vae)
    s = ChunkSampler(build_velocity_fn(loaded.model, cfg.sampling), vae, TinyExtractor(), (RES[0] // 8, RES[1] // 8),
                     4, 10, cfg.sampling, cfg.metrics, torch.device("cpu"))
    alone = to_uint8(vae.decode(s.latents(torch.tensor([9]))))[0].permute(1, 2, 0)
    z = np.load(os.path.join(run_dir, f"{RES[0]}x{RES[1]}", "samples.npz"))["arr_0"]
    diff = np.abs(alone.numpy().astype(int) - z[9].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01          # batch composition may only flip a rounding
    other = to_uint8(vae.decode(s.latents(torch.tensor([8]))))[0].permute(1, 2, 0)
    assert np.abs(other.numpy().astype(int) - z[9].astype(int)).mean() > 5


def test_two_ranks_give_the_same_statistics(full_run, tiny_ckpt, tiny_vae, tiny_ref_npz, tmp_path):
    _, run_dir = full_run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "evaluation.run", *overrides(tiny_ckpt, tiny_vae, tiny_ref_npz, str(tmp_path))]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    two = os.path.join(str(tmp_path), "r")
    assert json.load(open(os.path.join(two, "metrics.json")))["world_size"] == 2
    # Chunks are rank-independent units: identical bytes of every feature and image.
    for a, b in zip(chunk_files(run_dir), chunk_files(two), strict=True):
        ta, tb = load_file(a), load_file(b)
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=f"{os.path.basename(a)}:{k}")
    # All-reduced float64 statistics: equal up to summation order.
    sa = load_file(os.path.join(run_dir, f"{RES[0]}x{RES[1]}", "stats.safetensors"))
    sb = load_file(os.path.join(two, f"{RES[0]}x{RES[1]}", "stats.safetensors"))
    for k in ("mu", "sigma", "mu_s", "sigma_s"):
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-12, atol=1e-14)
    ma = json.load(open(os.path.join(run_dir, "metrics.json")))["results"][0]["metrics"]
    mb = json.load(open(os.path.join(two, "metrics.json")))["results"][0]["metrics"]
    # 14 samples of 32-d spatial features give a singular covariance, where the matrix square root
    # amplifies the 1e-16 summation-order differences; 1e-6 still catches any real difference.
    assert mb == pytest.approx(ma, rel=1e-6)


def test_resume_completes_only_missing_chunks(full_run, tiny_ckpt, tiny_vae, tiny_ref_npz, tmp_path):
    _, full_dir = full_run
    cfg = compose(overrides(tiny_ckpt, tiny_vae, tiny_ref_npz, str(tmp_path)))
    with pytest.raises(InterruptedError):
        single_thread(lambda: evaluate(cfg, stop_after_chunks=1))     # "killed" after one chunk
    first = chunk_files(os.path.join(str(tmp_path), "r"))
    assert [os.path.basename(f) for f in first] == ["chunk_000000.safetensors"]
    st = os.stat(first[0])
    # A crashed write leaves only a temp file, which never counts as a finished chunk.
    open(first[0].replace("000000", "000001") + ".tmp.999", "wb").write(b"garbage")
    report = single_thread(lambda: evaluate(cfg))
    assert report["results"][0]["chunks_generated_this_run"] == 3
    st2 = os.stat(first[0])
    assert (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)    # the finished chunk was not redone
    for a, b in zip(chunk_files(full_dir), chunk_files(os.path.join(str(tmp_path), "r")), strict=True):
        ta, tb = load_file(a), load_file(b)
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0)
    sa = load_file(os.path.join(full_dir, f"{RES[0]}x{RES[1]}", "stats.safetensors"))
    sb = load_file(os.path.join(str(tmp_path), "r", f"{RES[0]}x{RES[1]}", "stats.safetensors"))
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-12, atol=1e-14)
    # A rerun with other settings in the same run dir refuses the old chunks instead of mixing them in.
    with pytest.raises(ValueError, match="written by a different evaluation"):
        evaluate(compose(overrides(tiny_ckpt, tiny_vae, tiny_ref_npz, str(tmp_path), **{"sampling.seed": 8})))


def test_checkpoint_forms_and_errors(tiny_ckpt, tmp_path):
    ema = os.path.join(tiny_ckpt, "ema.safetensors")
    a = load_eval_model(ModelLoadConfig(ckpt=tiny_ckpt), "cpu")
    b = load_eval_model(ModelLoadConfig(ckpt=ema), "cpu")
    assert a.sha256 == b.sha256 == hashlib.sha256(open(ema, "rb").read()).hexdigest()
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)
    torch.testing.assert_close(a.model.state_dict()["final_layer.linear.weight"], load_file(ema)["final_layer.linear.weight"])
    with pytest.raises(FileNotFoundError, match="no ema.safetensors"):
        load_eval_model(ModelLoadConfig(ckpt=str(tmp_path)), "cpu")
    bare = str(tmp_path / "bare.safetensors")
    save_file(load_file(ema), bare)                           # no metadata
    with pytest.raises(ValueError, match="model.name"):
        load_eval_model(ModelLoadConfig(ckpt=bare), "cpu")
    with pytest.raises(ValueError, match="do not fit"):       # metadata missing -> default 1000 classes: wrong shape
        load_eval_model(ModelLoadConfig(ckpt=bare, name="FlowDCN-debug"), "cpu")
    ok = load_eval_model(ModelLoadConfig(ckpt=bare, name="FlowDCN-debug", overrides={"num_classes": 10}), "cpu")
    assert ok.name == "FlowDCN-debug"


def test_official_pth_goes_through_the_converter(tmp_path):
    """An official Lightning file (positional EMA tuple) loads via modeling.convert with the model name given."""
    from modeling import build_model
    from modeling.convert import official_param_names
    from modeling.msdcn import prior_grid

    ours = build_model("FlowDCN-debug").state_dict()
    g = torch.Generator().manual_seed(3)
    ema = []
    for n in official_param_names(2):
        if n.endswith("deformables_prior"):
            ema.append(prior_grid(9).view(1, 1, 1, 1, 9, 2).clone())
        elif n.endswith("deformables_scale"):
            ema.append(torch.randn(1, 1, 1, 4, 1, 1, generator=g))
        else:
            ema.append(torch.randn(ours[n].shape, generator=g))
    path = str(tmp_path / "flowdcn_official.pth")
    torch.save({"optimizer_states": [{"ema": tuple(ema)}], "state_dict": {}}, path)
    with pytest.raises(ValueError, match="model.name"):
        load_eval_model(ModelLoadConfig(ckpt=path), "cpu")
    loaded = load_eval_model(ModelLoadConfig(ckpt=path, name="FlowDCN-debug"), "cpu")
    assert loaded.format == "official" and loaded.overrides["rounding"] == "trunc"
    assert loaded.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    sd = loaded.model.state_dict()
    for n, v in zip(official_param_names(2), ema):
        if n.endswith("deformables_prior"):
            continue
        torch.testing.assert_close(sd[n], v.reshape(sd[n].shape), rtol=0, atol=0, msg=n)


def test_run_directory_resolves_to_newest_complete_checkpoint(tiny_ckpt, tmp_path):
    import shutil

    from evaluation.sample import resolve_checkpoint

    ck = tmp_path / "run" / "checkpoints"
    for n, complete in ((1000, True), (2000, True), (3000, False)):   # 3000: crashed before the marker
        d = ck / f"nimg_{n:012d}"
        d.mkdir(parents=True)
        shutil.copy(os.path.join(tiny_ckpt, "ema.safetensors"), d / "ema.safetensors")
        (d / "meta.json").write_text("{}")
        if complete:
            (d / "COMPLETE").write_text(f"{n}\n")
    want = str(ck / "nimg_000000002000" / "ema.safetensors")
    assert resolve_checkpoint(str(tmp_path / "run")) == (want, "safetensors")
    assert resolve_checkpoint(str(ck)) == (want, "safetensors")
    with pytest.raises(ValueError, match="COMPLETE"):
        resolve_checkpoint(str(ck / "nimg_000000003000"))
