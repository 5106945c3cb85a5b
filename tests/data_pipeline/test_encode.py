"""The encode job on real photos with the tiny VAE: records equal direct VAE calls, both formats agree, resume, bad input."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dp_helpers import encode_args, write_image_folder
from data_pipeline.buckets import nearest_bucket
from data_pipeline.encode import main
from data_pipeline.preprocess import Preprocessor, PreprocessConfig, to_tensor
from data_pipeline.shards import ShardError, npy_bytes, open_shard
from data_pipeline.vae import LatentVAE


def _manifest(d):
    with open(os.path.join(d, "manifest.json")) as f:
        return json.load(f)


def _records(d):
    """key -> (label, moments, bucket) over all shards of an encoded dir."""
    m = _manifest(d)
    shapes = {b["id"]: (len(m["moments"]), m["vae"]["latent_channels"], *b["latent_hw"]) for b in m["buckets"]}
    out = {}
    for e in m["shards"]:
        sh = open_shard(d, e, m["format"], shapes[e["bucket"]], verify=True)
        for i in range(len(sh)):
            key, label, mom = sh.read(i)
            out[key] = (label, mom, e["bucket"])
    return out


def test_records_match_direct_vae_and_formats_agree(latent_data, tiny_vae_dir):
    m = _manifest(latent_data["wds"])
    assert m["counts"]["images"] == 48 and m["counts"]["failed"] == 0 and m["vae"]["scale_factor"] == pytest.approx(0.18215)
    wds, mds = _records(latent_data["wds"]), _records(latent_data["mds"])
    assert wds.keys() == mds.keys() and len(wds) == 48
    for k in wds:  # both formats hold bit-identical records
        assert wds[k][0] == mds[k][0] and wds[k][2] == mds[k][2] and np.array_equal(wds[k][1], mds[k][1])
    # Independent recomputation: source order, bucket by aspect ratio, preprocessing, VAE moments of image and flip.
    pre = Preprocessor(PreprocessConfig(**m["preprocess"]))
    vae = LatentVAE.from_pretrained(tiny_vae_dir)
    root = latent_data["imgs"]
    paths = sorted(os.path.join(root, c, f) for c in sorted(os.listdir(root)) for f in os.listdir(os.path.join(root, c)))
    counts = {}
    for idx, p in enumerate(paths):
        label, mom, bucket = wds[f"{idx:09d}"]
        img = Image.open(p)
        assert label == int(os.path.basename(os.path.dirname(p))[1:])
        assert bucket == nearest_bucket(img.size[0], img.size[1], pre.table)
        counts[bucket] = counts.get(bucket, 0) + 1
        if idx % 6:  # spot-check the VAE moments on 8 of the images
            continue
        _, px, _ = pre(img, key=f"{idx:09d}")
        x = to_tensor(px)[None]
        mean, logvar = vae.encode_moments(x)
        fmean, flogvar = vae.encode_moments(torch.flip(x, dims=[-1]))
        want = torch.stack([mean[0], logvar[0], fmean[0], flogvar[0]]).numpy()
        np.testing.assert_allclose(mom.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    assert m["counts"]["per_bucket"] == {str(b): n for b, n in sorted(counts.items())}
    assert len(counts) >= 3  # several aspect-ratio buckets are exercised
    assert sum(m["counts"]["per_class"].values()) == 48


def test_wds_shards_readable_by_webdataset(latent_data):
    import webdataset as wds

    m = _manifest(latent_data["wds"])
    shard = os.path.join(latent_data["wds"], m["shards"][0]["path"])
    samples = list(wds.WebDataset(shard, shardshuffle=False).decode())
    mine = open_shard(latent_data["wds"], m["shards"][0], "wds", samples[0]["npy"].shape)
    assert len(samples) == len(mine)
    for i, s in enumerate(samples):
        key, label, mom = mine.read(i)
        assert s["__key__"] == key and s["cls"] == label
        assert np.array_equal(s["npy"], mom) and s["json"]["bucket"] == m["shards"][0]["bucket"]


def test_resume_skips_done_units_and_rank_split(tmp_path, latent_data, tiny_vae_dir):
    out = str(tmp_path / "out")
    args = encode_args(latent_data["imgs"], out, tiny_vae_dir, "wds")
    # Two "array tasks": task 1 alone does not write the manifest; task 0 finishes it.
    assert main(args + ["--num-tasks", "2", "--task-id", "1"]) == 0
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert main(args + ["--num-tasks", "2", "--task-id", "0"]) == 0
    first = _manifest(out)
    assert first["shards"] == _manifest(latent_data["wds"])["shards"]  # same shards, same checksums as one task
    # Lose unit 1 (as if killed after writing shards but before recording it): only unit 1 is redone.
    os.remove(os.path.join(out, "_progress", "unit-000001.json"))
    os.remove(os.path.join(out, "manifest.json"))
    mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out) if f.endswith(".tar")}
    assert main(args) == 0
    again = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in mtimes}
    changed = sorted(f for f in mtimes if again[f] != mtimes[f])
    assert changed and all(f.startswith("u000001-") for f in changed)
    assert _manifest(out) == first


def test_bad_image_reported_and_counted(tmp_path, tiny_vae_dir, capsys):
    imgs = str(tmp_path / "imgs")
    write_image_folder(imgs)
    bad = os.path.join(imgs, "class_a", "zz_truncated.png")
    with open(os.path.join(imgs, "class_a", "astronaut.png"), "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 3])  # a truncated PNG
    out = str(tmp_path / "out")
    args = encode_args(imgs, out, tiny_vae_dir, "wds")
    assert main(args) == 1  # fails, naming the file, and writes no manifest
    err = capsys.readouterr().err
    assert "zz_truncated.png" in err and not os.path.exists(os.path.join(out, "manifest.json"))
    assert main(args + ["--allow-failures"]) == 0
    m = _manifest(out)
    assert m["counts"]["failed"] == 1 and m["failures"][0]["path"] == bad and m["counts"]["images"] == 8


def test_tar_source_with_cls(tmp_path, tiny_vae_dir):
    from dp_helpers import skimage_photos

    tpath = str(tmp_path / "images-000.tar")
    with tarfile.open(tpath, "w") as tf:
        for i, (name, arr) in enumerate(skimage_photos()[:4]):
            buf = io.BytesIO()
            Image.fromarray(np.asarray(arr)).convert("RGB").save(buf, format="JPEG")
            for ext, payload in (("jpg", buf.getvalue()), ("cls", str(7 + i).encode())):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    out = str(tmp_path / "out")
    assert main(encode_args(tpath, out, tiny_vae_dir, "mds", "--source", "tar", "--no-flip")) == 0
    recs = _records(out)
    assert sorted(r[0] for r in recs.values()) == [7, 8, 9, 10]
    assert all(r[1].shape[0] == 2 for r in recs.values())  # no flips: (mean, logvar)
    from data_pipeline.loader import LoaderConfig, build_loader

    with pytest.raises(ValueError, match="no flipped moments"):
        build_loader(LoaderConfig(manifest=out, batch_size=1, flip_prob=0.5), 0, 1)


def test_truncated_and_corrupt_shards_named(tmp_path, latent_data):
    import shutil

    for fmt in ("wds", "mds"):
        d = str(tmp_path / fmt)
        shutil.copytree(latent_data[fmt], d)
        m = _manifest(d)
        e = max(m["shards"], key=lambda s: s["count"])
        shape = (4, 4, *m["buckets"][e["bucket"]]["latent_hw"])
        data_file = os.path.join(d, e["path"]) if fmt == "wds" else os.path.join(d, e["path"], "shard.00000.mds")
        with open(data_file, "rb") as f:
            data = f.read()
        with open(data_file, "wb") as f:
            f.write(data[: len(data) // 2])
        with pytest.raises(ShardError, match=e["path"]):
            open_shard(d, e, fmt, shape)
        # Same size, garbage over record 1's moments: the checksum names the shard, the read names shard and key.
        corrupt = bytearray(data)
        sh = open_shard(latent_data[fmt], e, fmt, shape)
        key1 = sh.read(1)[0]
        if fmt == "wds":
            off = int(sh.starts[1]) + 512  # data of the first member, <key>.npy
        else:
            off = int(sh.ends[1]) - len(npy_bytes(np.zeros(shape, np.float16)))  # moments is the last column
        corrupt[off: off + 8] = b"\xff" * 8  # breaks the .npy magic
        with open(data_file, "wb") as f:
            f.write(bytes(corrupt))
        with pytest.raises(ShardError, match=e["path"]):
            open_shard(d, e, fmt, shape, verify=True)
        with pytest.raises(ShardError, match=f"{e['path']}, key {key1}"):
            open_shard(d, e, fmt, shape).read(1)


def test_torchrun_two_ranks_split_the_units(tmp_path, latent_data, tiny_vae_dir):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "data_pipeline.encode", *encode_args(latent_data["imgs"], out, tiny_vae_dir, "wds")]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "worker 0/2" in proc.stdout and "worker 1/2" in proc.stdout
    assert _manifest(out)["shards"] == _manifest(latent_data["wds"])["shards"]  # same bytes as one process


def test_identity_vae_center_crop_round_trip(tmp_path):
    """Pixel-space encoding (the demo path): the loader's x is the ADM-cropped image in [-1, 1] (fp16 precision)."""
    from data_pipeline.loader import LoaderConfig, build_loader
    from data_pipeline.preprocess import center_crop_arr

    imgs = str(tmp_path / "imgs")
    rels = write_image_folder(imgs)
    out = str(tmp_path / "out")
    assert main(["--input", imgs, "--out", out, "--vae", "identity", "--preprocess", "center_crop", "--resolution",
                 "32", "--no-flip", "--no-progress", "--torch-threads", "1"]) == 0
    loader = build_loader(LoaderConfig(manifest=out, batch_size=len(rels), num_workers=0, flip_prob=0.0,
                                       sample=False), 0, 1)
    assert loader.manifest["vae"]["scale_factor"] == 1.0
    batch = next(iter(loader))
    for key, x in zip(batch["keys"], batch["x"]):
        img = center_crop_arr(Image.open(os.path.join(imgs, rels[int(key)])).convert("RGB"), 32)
        want = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        torch.testing.assert_close(x, want, atol=1e-3, rtol=0)


def test_leftover_temp_files_of_own_units_removed(tmp_path, latent_data, tiny_vae_dir):
    import shutil

    out = str(tmp_path / "out")
    shutil.copytree(latent_data["wds"], out)
    os.remove(os.path.join(out, "_progress", "unit-000002.json"))
    junk = [os.path.join(out, ".tmp-u000002-b001-999999"), os.path.join(out, ".tmp-u000001-b001-999999")]
    for j in junk:
        open(j, "wb").write(b"half a shard")
    # As worker 0 of 2: unit 2 is ours (its junk goes), unit 1 belongs to worker 1 (may be in flight: kept).
    assert main(encode_args(latent_data["imgs"], out, tiny_vae_dir, "wds", "--num-tasks", "2", "--task-id", "0")) == 0
    assert not os.path.exists(junk[0]) and os.path.exists(junk[1])
    assert _manifest(out)["shards"] == _manifest(latent_data["wds"])["shards"]


def test_mds_set_readable_by_streaming_dataset(tmp_path, latent_data):
    """The MDS output is also a plain mosaicml-streaming dataset (top-level index.json over the shard dirs)."""
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    from data_pipeline.shards import npy_load

    clean_stale_shared_memory()
    ds = StreamingDataset(local=latent_data["mds"], shuffle=False, batch_size=1)
    mine = _records(latent_data["mds"])
    assert len(ds) == len(mine) == 48
    for i in range(len(ds)):
        s = ds[i]
        label, mom, bucket = mine[s["key"]]
        assert s["label"] == label and s["meta"]["bucket"] == bucket and np.array_equal(npy_load(s["moments"]), mom)


def test_image_folder_class_map_and_ignored_files(tmp_path):
    from data_pipeline.sources import ImageFolderSource

    root = tmp_path / "train"
    for cls in ("n02", "n01", "extra"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / cls / "a.JPEG")
    (root / "n01" / "notes.txt").write_text("not an image")
    (tmp_path / "LOC_synset_mapping.txt").write_text("n02 goldfish\nn01 tench, Tinca tinca\n")
    src = ImageFolderSource(str(root), class_map=str(tmp_path / "LOC_synset_mapping.txt"))
    assert {os.path.basename(os.path.dirname(it.path)): it.label for it in src.items} == {"n02": 0, "n01": 1}
    assert any("notes.txt" in p for p in src.ignored) and any("extra" in p for p in src.ignored)
    plain = ImageFolderSource(str(root))  # no map: sorted directory index
    assert {os.path.basename(os.path.dirname(it.path)): it.label for it in plain.items} == {"extra": 0, "n01": 1, "n02": 2}
