"""Image sources for encoding: an ImageFolder tree or tar shards of images, listed in a deterministic order.

Every source lists ``ImageItem``s (sorted, so the i-th item is the same on every rank and every re-run) and loads
one item as a PIL image. A file that cannot be decoded raises ``ImageError`` naming it; the encode job counts and
reports those. Files that are not images (by extension) are not silently ignored: they are counted in
``source.ignored`` and written to the manifest.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional

from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")


class ImageError(RuntimeError):
    """An image that could not be read or decoded; ``path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class ImageItem:
    """One input image: where it is (``path``, plus ``member`` inside a tar) and its class index."""

    path: str
    label: int
    member: Optional[str] = None

    @property
    def name(self) -> str:
        """Human-readable location, used in error reports and the manifest."""
        return f"{self.path}::{self.member}" if self.member else self.path


def load_class_map(path: str) -> Dict[str, int]:
    """Class name -> index from a JSON dict, or a text file whose i-th line starts with the i-th class name
    (ImageNet's LOC_synset_mapping.txt works as is)."""
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        mapping = json.loads(text)
        if not isinstance(mapping, dict):
            raise ValueError(f"class map {path}: expected a JSON object name -> index")
        return {str(k): int(v) for k, v in mapping.items()}
    names = [line.split()[0] for line in text.splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"class map {path}: duplicate class names")
    return {n: i for i, n in enumerate(names)}


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


class ImageFolderSource:
    """ImageNet-train layout ``root/<class>/<image>``; class = sorted directory index unless a class map is given."""

    kind = "imagefolder"

    def __init__(self, root: str, class_map: Optional[str] = None):
        self.root = root
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root!r}")
        dirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.class_to_idx = load_class_map(class_map) if class_map else {d: i for i, d in enumerate(dirs)}
        self.ignored: List[str] = []  # non-image files and directories without a class index
        self.items: List[ImageItem] = []
        for d in dirs:
            if d not in self.class_to_idx:
                self.ignored.append(os.path.join(root, d) + "/ (not in the class map)")
                continue
            for dirpath, _, files in sorted(os.walk(os.path.join(root, d))):
                for f in sorted(files):
                    p = os.path.join(dirpath, f)
                    (self.items if _is_image(f) else self.ignored).append(
                        ImageItem(p, self.class_to_idx[d]) if _is_image(f) else p)
        self.ignored += [os.path.join(root, f) for f in sorted(os.listdir(root))
                         if os.path.isfile(os.path.join(root, f))]
        self.items.sort(key=lambda it: it.path)
        self.num_classes = max(self.class_to_idx.values(), default=-1) + 1

    def load(self, item: ImageItem) -> Image.Image:
        """Open and fully decode one image (truncated files fail here, not later)."""
        try:
            with open(item.path, "rb") as f:
                return _decode(f.read())
        except Exception as e:  # noqa: BLE001 - any decoder failure is reported with the path
            raise ImageError(item.name, f"{type(e).__name__}: {e}") from e


class TarImageSource:
    """Tar shards of images, webdataset style: ``<key>.<img ext>`` with the label in ``<key>.cls``, or
    ``<class>/<name>.<ext>`` members whose directory is the class (sorted over all tars, or a class map)."""

    kind = "tar"

    def __init__(self, tars: List[str], class_map: Optional[str] = None):
        self.tars = sorted(tars)
        self.ignored: List[str] = []
        entries = []  # (tar, member, key, class dir)
        labels: Dict[tuple, int] = {}
        for tpath in self.tars:
            try:
                with tarfile.open(tpath) as tf:
                    members = [m for m in tf.getmembers() if m.isfile()]
                    for m in members:
                        base, _, ext = m.name.rpartition(".")
                        if ext == "cls":
                            labels[(tpath, base)] = int(tf.extractfile(m).read().decode().strip())
                        elif _is_image(m.name):
                            entries.append((tpath, m.name, base, os.path.dirname(m.name)))
                        elif ext != "json":
                            self.ignored.append(f"{tpath}::{m.name}")
            except (tarfile.TarError, OSError, ValueError) as e:
                raise ImageError(tpath, f"unreadable tar shard ({type(e).__name__}: {e})") from e
        dirs = sorted({d for *_, d in entries if d})
        self.class_to_idx = load_class_map(class_map) if class_map else {d: i for i, d in enumerate(dirs)}
        self.items = []
        for tpath, member, base, d in entries:
            if (tpath, base) in labels:
                label = labels[(tpath, base)]
            elif d in self.class_to_idx:
                label = self.class_to_idx[d]
            else:
                raise ValueError(f"{tpath}::{member}: no <key>.cls member and no class directory in the class map")
            self.items.append(ImageItem(tpath, label, member))
        self.items.sort(key=lambda it: (it.path, it.member))
        self.num_classes = max([it.label for it in self.items], default=-1) + 1
        self._local = threading.local()  # a TarFile has one file position: one handle per thread

    def load(self, item: ImageItem) -> Image.Image:
        """Read one member and fully decode it (safe to call from several threads)."""
        try:
            handles = self._local.__dict__.setdefault("tars", {})
            tf = handles.get(item.path)
            if tf is None:
                tf = handles[item.path] = tarfile.open(item.path)
            return _decode(tf.extractfile(item.member).read())
        except Exception as e:  # noqa: BLE001
            raise ImageError(item.name, f"{type(e).__name__}: {e}") from e

    def __getstate__(self):  # open tar handles do not cross process boundaries
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()  # force the full decode so truncation raises now
    return img


def build_source(kind: str, inputs: List[str], class_map: Optional[str] = None):
    """``imagefolder`` (one root) or ``tar`` (tar files and/or directories of tars)."""
    if kind == "imagefolder":
        if len(inputs) != 1:
            raise ValueError(f"imagefolder source takes one root directory, got {inputs}")
        return ImageFolderSource(inputs[0], class_map)
    if kind == "tar":
        tars = []
        for p in inputs:
            if os.path.isdir(p):
                tars += [os.path.join(p, f) for f in sorted(os.listdir(p)) if f.endswith(".tar")]
            elif os.path.isfile(p):
                tars.append(p)
            else:
                raise FileNotFoundError(f"tar input not found: {p!r}")
        if not tars:
            raise FileNotFoundError(f"no .tar files in {inputs}")
        return TarImageSource(tars, class_map)
    raise ValueError(f"source kind {kind!r}: expected 'imagefolder' or 'tar'")
