"""Latent shards: one record schema, two formats (webdataset tar, MDS), atomic writes, random-access readers.

Record schema (both formats):
    key      str     globally unique record key (the image's index in the sorted source list, 9 digits)
    label    int     class index
    moments  fp16    [K, C, h, w]: K=2 (mean, logvar) or K=4 (mean, logvar, flip_mean, flip_logvar), stored as .npy bytes
    meta     json    {"src": source path, "src_hw": [H, W], "hw": [h, w], "bucket": id, "op": preprocessing op}

webdataset: one plain tar per shard with members ``<key>.npy``, ``<key>.cls``, ``<key>.json`` (readable by
``webdataset.WebDataset`` too). MDS: one directory per shard holding ``index.json`` + ``shard.00000.mds`` written by
mosaicml-streaming's ``MDSWriter`` with columns key:str, label:int, moments:bytes, meta:json.

Every shard holds records of ONE bucket (one latent shape); the manifest lists shards with bucket, count, bytes and
sha256, so the loader plans batches without opening any shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from typing import Dict, List, Tuple

import numpy as np

FORMATS = ("wds", "mds")
MDS_COLUMNS = {"key": "str", "label": "int", "moments": "bytes", "meta": "json"}
MDS_SHARD_FILE = "shard.00000.mds"


class ShardError(RuntimeError):
    """A shard or record that cannot be read as written: the message names the shard (and key)."""


def npy_bytes(arr: np.ndarray) -> bytes:
    """Serialise an array in .npy format."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: Dict[bytes, Tuple[int, np.dtype, tuple]] = {}  # header bytes -> (data offset, dtype, shape)


def npy_load(data: bytes) -> np.ndarray:
    """Parse .npy bytes without pickle; headers are cached (numpy parses them with ast, ~60 us each)."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not .npy data (bad magic)")
    if data[6] == 1:
        end = 10 + int.from_bytes(data[8:10], "little")
    else:
        end = 12 + int.from_bytes(data[8:12], "little")
    head = bytes(data[:end])
    hit = _NPY_HEADERS.get(head)
    if hit is None:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype.hasobject or not arr.flags.c_contiguous:
            return arr
        if len(_NPY_HEADERS) < 1024:
            _NPY_HEADERS[head] = (end, arr.dtype, arr.shape)
        return arr
    end, dtype, shape = hit
    n = int(np.prod(shape)) * dtype.itemsize
    if len(data) - end != n:
        raise ValueError(f".npy payload is {len(data) - end} bytes, header says {n}")
    return np.frombuffer(data, dtype=dtype, offset=end).reshape(shape)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(out_dir: str, name: str, records: List[dict], fmt: str) -> Dict:
    """Write ``records`` atomically as shard ``name`` under ``out_dir``; returns its manifest entry."""
    if fmt not in FORMATS:
        raise ValueError(f"shard format {fmt!r}: expected one of {FORMATS}")
    if not records:
        raise ValueError(f"shard {name}: no records")
    tmp = os.path.join(out_dir, f".tmp-{name}-{os.getpid()}")
    if fmt == "wds":
        rel, data_file = name + ".tar", None
        _write_tar(tmp, records)
        data_file = tmp
    else:
        rel = name + ".mds"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        _write_mds(tmp, records)
        data_file = os.path.join(tmp, MDS_SHARD_FILE)
    entry = {"path": rel, "count": len(records), "bytes": os.path.getsize(data_file), "sha256": sha256_file(data_file)}
    final = os.path.join(out_dir, rel)
    if fmt == "mds" and os.path.isdir(final):
        shutil.rmtree(final)  # a leftover of an interrupted run that never recorded this unit as done
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    return entry


def _write_tar(path: str, records: List[dict]) -> None:
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for r in records:
                for ext, payload in (("npy", npy_bytes(r["moments"])), ("cls", str(int(r["label"])).encode()),
                                     ("json", json.dumps(r["meta"], sort_keys=True).encode())):
                    info = tarfile.TarInfo(f"{r['key']}.{ext}")
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # mtime 0: byte-reproducible shards
                    tf.addfile(info, io.BytesIO(payload))
        f.flush()
        os.fsync(f.fileno())


def _write_mds(tmp_dir: str, records: List[dict]) -> None:
    from streaming import MDSWriter  # heavy import, only for MDS

    with MDSWriter(out=tmp_dir, columns=MDS_COLUMNS, size_limit=None, progress_bar=False) as w:
        for r in records:
            w.write({"key": r["key"], "label": int(r["label"]), "moments": npy_bytes(r["moments"]), "meta": r["meta"]})
    for f in os.listdir(tmp_dir):
        with open(os.path.join(tmp_dir, f), "rb") as fh:
            os.fsync(fh.fileno())


class _ShardBase:
    """Random access to one shard: ``len``, ``key(i)``, ``read(i) -> (label, moments fp16 [K,C,h,w])``."""

    def __init__(self, path: str, entry: Dict, moments_shape: Tuple[int, ...]):
        self.path, self.entry, self.moments_shape = path, entry, tuple(moments_shape)
        self.fd = None

    def _check_size(self, data_file: str) -> None:
        try:
            size = os.path.getsize(data_file)
        except OSError as e:
            raise ShardError(f"shard {self.path}: cannot open ({e})") from e
        if "bytes" in self.entry and size != self.entry["bytes"]:
            raise ShardError(f"shard {self.path}: {size} bytes on disk, manifest says {self.entry['bytes']} "
                             "(truncated or overwritten; re-run the encode job for it)")

    def verify(self, data_file: str) -> None:
        """Compare the sha256 with the manifest's."""
        got = sha256_file(data_file)
        if got != self.entry.get("sha256"):
            raise ShardError(f"shard {self.path}: sha256 {got[:12]}... != manifest {str(self.entry.get('sha256'))[:12]}...")

    def _check_moments(self, i: int, moments: np.ndarray) -> np.ndarray:
        if moments.dtype != np.float16 or moments.shape != self.moments_shape:
            raise ShardError(f"shard {self.path}, key {self.key(i)}: moments {moments.dtype} {moments.shape}, "
                             f"expected float16 {self.moments_shape}")
        return moments

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, i: int) -> str:
        return self.keys[i]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()


class WdsShard(_ShardBase):
    """A webdataset tar read by offsets: the headers are scanned once, then each record is one pread."""

    def __init__(self, path: str, entry: Dict, moments_shape, verify: bool = False):
        super().__init__(path, entry, moments_shape)
        self._check_size(path)
        if verify:
            self.verify(path)
        self.keys, self.labels, self.spans = [], [], []  # spans: (offset, size) of <key>.npy
        try:
            with tarfile.open(path, "r:") as tf:  # a truncated tar raises ReadError here
                pending = {}
                for m in tf:
                    base, _, ext = m.name.rpartition(".")
                    rec = pending.setdefault(base, {})
                    if ext == "cls":
                        rec["cls"] = int(tf.extractfile(m).read())
                    elif ext == "npy":
                        rec["npy"] = (m.offset_data, m.size)
                    elif ext == "json":
                        rec["json"] = True
                    else:
                        raise ShardError(f"shard {path}, key {base}: unexpected member {m.name}")
                    if len(rec) == 3:
                        self.keys.append(base)
                        self.labels.append(rec["cls"])
                        self.spans.append(rec["npy"])
                        del pending[base]
        except ShardError:
            raise
        except (tarfile.TarError, OSError, ValueError) as e:
            raise ShardError(f"shard {path}: unreadable tar ({type(e).__name__}: {e})") from e
        if pending:
            raise ShardError(f"shard {path}, key {next(iter(pending))}: incomplete record (members {sorted(pending[next(iter(pending))])})")
        if len(self.keys) != entry.get("count", len(self.keys)):
            raise ShardError(f"shard {path}: {len(self.keys)} records, manifest says {entry['count']}")
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, i: int) -> Tuple[int, np.ndarray]:
        off, size = self.spans[i]
        data = os.pread(self.fd, size, off)
        try:
            moments = npy_load(data)
        except Exception as e:  # noqa: BLE001
            raise ShardError(f"shard {self.path}, key {self.keys[i]}: bad moments record ({e})") from e
        return self.labels[i], self._check_moments(i, moments)


class MdsShard(_ShardBase):
    """An MDS shard directory read by the offset table at the head of its .mds file."""

    def __init__(self, path: str, entry: Dict, moments_shape, verify: bool = False):
        super().__init__(path, entry, moments_shape)
        data_file = os.path.join(path, MDS_SHARD_FILE)
        self._check_size(data_file)
        if verify:
            self.verify(data_file)
        try:
            from streaming.base.format import reader_from_json

            with open(os.path.join(path, "index.json")) as f:
                self.reader = reader_from_json(path, None, json.load(f)["shards"][0])
            self.fd = os.open(data_file, os.O_RDONLY)
            (n,) = np.frombuffer(os.pread(self.fd, 4, 0), np.uint32)
            self.offsets = np.frombuffer(os.pread(self.fd, 4 * (int(n) + 1), 4), np.uint32).astype(np.int64)
            if len(self.offsets) != n + 1 or self.offsets[-1] != os.path.getsize(data_file):
                raise ValueError("offset table does not match the file size")
            records = [self._raw(i) for i in range(int(n))]
        except ShardError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ShardError(f"shard {path}: unreadable MDS shard ({type(e).__name__}: {e})") from e
        self.keys = [r["key"] for r in records]
        self.labels = [int(r["label"]) for r in records]
        if len(self.keys) != entry.get("count", len(self.keys)):
            raise ShardError(f"shard {path}: {len(self.keys)} records, manifest says {entry['count']}")

    def _raw(self, i: int) -> dict:
        begin, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.reader.decode_sample(os.pread(self.fd, end - begin, begin))

    def _moments_bytes(self, i: int) -> bytes:
        """Only the moments column of record i (skips decoding key/meta: this is the hot path)."""
        begin, end = int(self.offsets[i]), int(self.offsets[i + 1])
        data = os.pread(self.fd, end - begin, begin)
        names, sizes = self.reader.column_names, self.reader.column_sizes
        nvar = sum(1 for s in sizes if not s)
        var = iter(np.frombuffer(data, np.uint32, count=nvar).tolist())
        pos = 4 * nvar
        for name, size in zip(names, sizes):
            size = size or next(var)
            if name == "moments":
                if pos + size > len(data):
                    raise ValueError("record shorter than its column sizes")
                return data[pos: pos + size]
            pos += size
        raise ValueError("no 'moments' column")

    def read(self, i: int) -> Tuple[int, np.ndarray]:
        try:
            moments = npy_load(self._moments_bytes(i))
        except Exception as e:  # noqa: BLE001
            raise ShardError(f"shard {self.path}, key {self.keys[i]}: bad moments record ({e})") from e
        return self.labels[i], self._check_moments(i, moments)


def open_shard(root: str, entry: Dict, fmt: str, moments_shape, verify: bool = False) -> _ShardBase:
    """Open the shard a manifest entry describes (``root`` = the manifest's directory)."""
    path = os.path.join(root, entry["path"])
    if fmt == "wds":
        return WdsShard(path, entry, moments_shape, verify)
    if fmt == "mds":
        return MdsShard(path, entry, moments_shape, verify)
    raise ValueError(f"shard format {fmt!r}: expected one of {FORMATS}")


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to ``path`` via a temp file in the same directory, fsync and os.replace."""
    tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
