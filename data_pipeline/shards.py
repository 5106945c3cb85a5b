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
    """Random access to one shard: ``len``, ``read(i) -> (key, label, moments fp16 [K,C,h,w])``.

    Opening builds a small index (byte range of every record, 16 bytes/record) that is kept for the life of the
    process; the file descriptor is opened lazily and ``close()`` releases only it, so a loader can keep the index of
    every shard while holding few open files. Each read is ONE pread of the record's bytes.
    """

    def __init__(self, path: str, data_file: str, entry: Dict, moments_shape: Tuple[int, ...], verify: bool):
        self.path, self.data_file, self.entry, self.moments_shape = path, data_file, entry, tuple(moments_shape)
        self.fd = None
        try:
            size = os.path.getsize(data_file)
        except OSError as e:
            raise ShardError(f"shard {path}: cannot open ({e})") from e
        if "bytes" in entry and size != entry["bytes"]:
            raise ShardError(f"shard {path}: {size} bytes on disk, manifest says {entry['bytes']} "
                             "(truncated or overwritten; re-run the encode job for it)")
        if verify:
            got = sha256_file(data_file)
            if got != entry.get("sha256"):
                raise ShardError(f"shard {path}: sha256 {got[:12]}... != manifest {str(entry.get('sha256'))[:12]}...")
        self.starts, self.ends = self._build_index()  # (N,) int64 byte ranges
        if "count" in entry and len(self.starts) != entry["count"]:
            raise ShardError(f"shard {path}: {len(self.starts)} records, manifest says {entry['count']}")

    def __len__(self) -> int:
        return len(self.starts)

    def _blob(self, i: int) -> bytes:
        if self.fd is None:
            self.fd = os.open(self.data_file, os.O_RDONLY)
        start, end = int(self.starts[i]), int(self.ends[i])
        blob = os.pread(self.fd, end - start, start)
        if len(blob) != end - start:
            raise ShardError(f"shard {self.path}: record {i} ends past the end of the file (truncated?)")
        return blob

    def read(self, i: int) -> Tuple[str, int, np.ndarray]:
        """(key, label, moments) of record ``i``; a bad record raises ShardError naming the shard and key."""
        blob = self._blob(i)
        key = f"#{i}"
        try:
            key, label, raw = self._parse(blob)
            moments = npy_load(raw)
        except ShardError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ShardError(f"shard {self.path}, key {key}: bad record ({type(e).__name__}: {e})") from e
        if moments.dtype != np.float16 or moments.shape != self.moments_shape:
            raise ShardError(f"shard {self.path}, key {key}: moments {moments.dtype} {moments.shape}, "
                             f"expected float16 {self.moments_shape}")
        return key, label, moments

    def close(self) -> None:
        """Release the file descriptor (the index stays)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()

    def __getstate__(self):  # descriptors do not cross process boundaries
        return {**self.__dict__, "fd": None}


class WdsShard(_ShardBase):
    """A webdataset tar; a record is its three consecutive members ``<key>.npy``, ``<key>.cls``, ``<key>.json``."""

    def _build_index(self):
        starts, ends, names, members = [], [], [], []
        try:
            with tarfile.open(self.data_file, "r:") as tf:  # a truncated or garbled tar raises ReadError here
                for m in tf:
                    base, _, ext = m.name.rpartition(".")
                    if ext == "npy":
                        starts.append(m.offset)
                        names.append(base)
                        members.append(1)
                    elif names and base == names[-1] and ext in ("cls", "json"):
                        members[-1] += 1
                    else:
                        raise ShardError(f"shard {self.path}, key {base}: unexpected member {m.name}")
                    ends.append(m.offset_data + -(-m.size // 512) * 512)
        except ShardError:
            raise
        except (tarfile.TarError, OSError, ValueError) as e:
            raise ShardError(f"shard {self.path}: unreadable tar ({type(e).__name__}: {e})") from e
        for name, n in zip(names, members):
            if n != 3:
                raise ShardError(f"shard {self.path}, key {name}: incomplete record ({n} of 3 members)")
        # ends holds one value per member; a record ends where its last member ends.
        rec_ends = np.zeros(len(starts), np.int64)
        rec_ends[:-1] = starts[1:] if starts else []
        if starts:
            rec_ends[-1] = ends[-1]
        return np.asarray(starts, np.int64), rec_ends

    def _parse(self, blob: bytes):
        key, label, raw, pos, seen = None, None, None, 0, 0
        while pos + 512 <= len(blob):
            hdr = blob[pos: pos + 512]
            if not hdr.strip(b"\0"):
                break  # end-of-archive padding
            chk = int(hdr[148:156].rstrip(b"\0 ") or b"0", 8)
            if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):  # the checksum field counts as 8 spaces
                raise ValueError("tar header checksum mismatch")
            name = hdr[:100].rstrip(b"\0").decode()
            size = int(hdr[124:136].rstrip(b"\0 ") or b"0", 8)
            data = blob[pos + 512: pos + 512 + size]
            base, _, ext = name.rpartition(".")
            key = key or base
            if base != key:
                raise ValueError(f"member {name} inside record {key}")
            if ext == "npy":
                raw = data
            elif ext == "cls":
                label = int(data)
            seen += 1
            pos += 512 + -(-size // 512) * 512
        if raw is None or label is None or seen != 3:
            raise ValueError(f"incomplete record ({seen} members)")
        return key, label, raw


class MdsShard(_ShardBase):
    """An MDS shard directory (``index.json`` + ``shard.00000.mds``) read through the offset table at the file head;
    needs no mosaicml-streaming at read time."""

    def __init__(self, path: str, entry: Dict, moments_shape, verify: bool = False):
        try:
            with open(os.path.join(path, "index.json")) as f:
                info = json.load(f)["shards"][0]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise ShardError(f"shard {path}: unreadable index.json ({type(e).__name__}: {e})") from e
        names, encs = info.get("column_names"), info.get("column_encodings")
        if names != sorted(MDS_COLUMNS) or encs != [MDS_COLUMNS[n] for n in names]:
            raise ShardError(f"shard {path}: columns {names} {encs} are not the latent record schema {MDS_COLUMNS}")
        self.column_sizes = info["column_sizes"]
        super().__init__(path, os.path.join(path, MDS_SHARD_FILE), entry, moments_shape, verify)

    def _build_index(self):
        try:
            with open(self.data_file, "rb") as f:
                (n,) = np.frombuffer(f.read(4), np.uint32)
                offsets = np.frombuffer(f.read(4 * (int(n) + 1)), np.uint32).astype(np.int64)
            if len(offsets) != n + 1 or offsets[-1] != os.path.getsize(self.data_file) or (np.diff(offsets) < 0).any():
                raise ValueError("offset table does not match the file")
        except (OSError, ValueError) as e:
            raise ShardError(f"shard {self.path}: unreadable MDS shard ({type(e).__name__}: {e})") from e
        return offsets[:-1], offsets[1:]

    def _parse(self, blob: bytes):
        nvar = sum(1 for s in self.column_sizes if not s)
        var = iter(np.frombuffer(blob, np.uint32, count=nvar).tolist())
        pos, cols = 4 * nvar, {}
        for name, size in zip(sorted(MDS_COLUMNS), self.column_sizes):  # key, label, meta, moments
            size = size or next(var)
            if pos + size > len(blob):
                raise ValueError("record shorter than its column sizes")
            if name != "meta":
                cols[name] = blob[pos: pos + size]
            pos += size
        return cols["key"].decode(), int(np.frombuffer(cols["label"], np.int64)[0]), cols["moments"]


def open_shard(root: str, entry: Dict, fmt: str, moments_shape, verify: bool = False) -> _ShardBase:
    """Open the shard a manifest entry describes (``root`` = the manifest's directory)."""
    path = os.path.join(root, entry["path"])
    if fmt == "wds":
        return WdsShard(path, path, entry, moments_shape, verify)
    if fmt == "mds":
        return MdsShard(path, entry, moments_shape, verify)
    raise ValueError(f"shard format {fmt!r}: expected one of {FORMATS}")


def write_mds_root_index(out_dir: str, shard_paths: List[str]) -> str:
    """Top-level MDS ``index.json`` over the per-shard directories, so ``streaming.StreamingDataset(local=out_dir)``
    can read the whole set too (what streaming's ``merge_index`` does, without its remote/download machinery)."""
    shards = []
    for rel in shard_paths:
        with open(os.path.join(out_dir, rel, "index.json")) as f:
            info = json.load(f)["shards"][0]
        info["raw_data"] = {**info["raw_data"], "basename": f"{rel}/{info['raw_data']['basename']}"}
        shards.append(info)
    path = os.path.join(out_dir, "index.json")
    write_json_atomic(path, {"version": 2, "shards": shards})
    return path


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to ``path`` via a temp file in the same directory, fsync and os.replace."""
    tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
