"""Just-in-time build of the MSDCN CUDA extension, cached by a hash of the sources, torch and the GPU arch.

The extension is built with ``torch.utils.cpp_extension.load`` into
``$FLOWDCN_EXT_DIR`` (default ``~/.cache/flowdcn_ext``)/``<name>``, where the name carries a hash of
every file in csrc/, the torch and CUDA versions, the target architecture and the compiler flags, so
a changed source (or a different GPU) builds a fresh module and never reuses a stale one. A file
lock makes concurrent ranks build once: the first takes the lock and compiles, the others wait on
the lock and then load the finished module.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("msdcn.cpp", "msdcn_cuda.cu")
# No --use_fast_math: accurate expf (sigmoid of the scale logits) keeps parity with the reference.
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills")
CXX_FLAGS = ("-O3", "-std=c++17")


class BuildError(RuntimeError):
    """The MSDCN extension cannot be built or loaded here (the message names what is missing)."""


def ext_root() -> Path:
    """Directory holding the cached builds: $FLOWDCN_EXT_DIR or ~/.cache/flowdcn_ext."""
    return Path(os.environ.get("FLOWDCN_EXT_DIR", Path.home() / ".cache" / "flowdcn_ext")).expanduser()


def source_files(csrc: Path = CSRC) -> list[Path]:
    """Every source and header the build depends on, sorted (all of them enter the hash)."""
    files = sorted(p for p in csrc.iterdir() if p.suffix in (".cpp", ".cu", ".cuh", ".h"))
    if not files:
        raise BuildError(f"msdcn build: no sources found in {csrc}")
    return files


def arch_of(device: int | None = None) -> str:
    """TORCH_CUDA_ARCH_LIST entry of a CUDA device, e.g. '9.0' on Hopper."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def build_key(arch: str, csrc: Path = CSRC) -> str:
    """Hash of the sources, torch/CUDA versions, the architecture and the flags (16 hex digits)."""
    h = hashlib.sha256()
    for path in source_files(csrc):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for part in (torch.__version__, str(torch.version.cuda), arch, " ".join(NVCC_FLAGS), " ".join(CXX_FLAGS), sys.version):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def module_name(arch: str, csrc: Path = CSRC) -> str:
    """Python module name of a build: flowdcn_msdcn_sm<arch>_<hash>."""
    return f"flowdcn_msdcn_sm{arch.replace('.', '')}_{build_key(arch, csrc)}"


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float = 1800.0, poll_s: float = 0.2):
    """Exclusive advisory lock on ``path`` (created if needed); waits up to timeout_s, then raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BuildError(f"msdcn build: timed out after {timeout_s:.0f} s waiting for the build lock {path}")
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def find_nvcc() -> str | None:
    """Path of nvcc from CUDA_HOME (as torch resolves it) or PATH, or None."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def check_prerequisites() -> None:
    """Raise BuildError naming the first missing piece: CUDA torch, a GPU, nvcc, ninja."""
    if torch.version.cuda is None:
        raise BuildError(f"msdcn build: this torch ({torch.__version__}) is a CPU-only build; the CUDA kernels need a CUDA build of torch")
    if not torch.cuda.is_available():
        raise BuildError("msdcn build: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if find_nvcc() is None:
        raise BuildError("msdcn build: nvcc not found; install the CUDA toolkit and set CUDA_HOME (or put nvcc on PATH)")
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package provides the binary)
        except ImportError:
            raise BuildError("msdcn build: ninja not found; `pip install ninja` (torch.utils.cpp_extension needs it)") from None


_MODULES: dict[str, object] = {}


def load(device: int | None = None, verbose: bool = False):
    """Build (once, under a file lock) or load the cached extension for this GPU; returns the module."""
    check_prerequisites()
    arch = arch_of(device)
    name = module_name(arch)
    if name in _MODULES:
        return _MODULES[name]
    from torch.utils import cpp_extension

    build_dir = ext_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    with file_lock(ext_root() / f"{name}.lock"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch  # build for this GPU only (sm_90 on Hopper)
        try:
            module = cpp_extension.load(
                name=name,
                sources=[str(CSRC / s) for s in SOURCES],
                extra_cflags=list(CXX_FLAGS),
                extra_cuda_cflags=list(NVCC_FLAGS),
                build_directory=str(build_dir),
                verbose=verbose,
            )
        except Exception as exc:  # compile or link failure: keep the compiler's output next to the build
            log.write_text(f"{type(exc).__name__}: {exc}\n")
            raise BuildError(f"msdcn build: compiling the CUDA extension {name} failed; compiler output in {log}") from exc
        finally:
            if old_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
    _MODULES[name] = module
    return module


def nvcc_compile_command(out: Path, arch: str = "9.0", extra_includes: tuple[str, ...] = ()) -> list[str]:
    """nvcc command that compiles the kernel translation unit to an object file (no GPU needed)."""
    import sysconfig

    from torch.utils import cpp_extension

    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("msdcn build: nvcc not found; install the CUDA toolkit and set CUDA_HOME (or put nvcc on PATH)")
    sm = arch.replace(".", "")
    includes = [f"-I{p}" for p in (*extra_includes, *cpp_extension.include_paths(), sysconfig.get_paths()["include"])]
    # The same half/bf16 guards torch adds, so the CPU check sees what the JIT build sees.
    guards = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
    return [nvcc, "-c", str(CSRC / "msdcn_cuda.cu"), "-o", str(out), f"-gencode=arch=compute_{sm},code=sm_{sm}", *NVCC_FLAGS, *guards, *includes]
