"""CPU tests of the MSDCN CUDA build machinery: the sources compile with nvcc (no GPU needed), the cache key
follows the sources, missing pieces give clear errors, the build lock serialises processes, fake impls."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cuda_ext.msdcn import build

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~40 s of nvcc on the 2-core CPU machine
@pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not installed")
def test_kernel_sources_compile_for_sm90(tmp_path):
    """nvcc compiles the kernel translation unit for sm_90 with torch's headers (the JIT build's flags)."""
    extra = []
    # A CPU-only torch ships c10/cuda headers without the CMake-generated macros header: provide it.
    inc = Path(torch.utils.cpp_extension.include_paths()[0])
    if not (inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        extra.append(str(tmp_path / "shim"))
    out = tmp_path / "msdcn_cuda.o"
    cmd = build.nvcc_compile_command(out, arch="9.0", extra_includes=tuple(extra))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert out.stat().st_size > 0
    # Hopper's vector float atomics must be in the machine code (the fast grad_value path).
    dump = shutil.which("cuobjdump") or (Path(cmd[0]).parent / "cuobjdump")
    if Path(dump).exists():
        sass = subprocess.run([str(dump), "--dump-sass", str(out)], capture_output=True, text=True, timeout=300).stdout
        assert "msdcn_backward_kernel" in sass and "msdcn_forward_kernel" in sass
        assert "RED.E.ADD.F32x4" in sass or "REDG.E.ADD.F32x4" in sass or ".F32x4" in sass


def test_cache_key_follows_sources_and_arch(tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(build.CSRC, csrc)
    key = build.build_key("9.0", csrc)
    assert key == build.build_key("9.0", csrc)             # deterministic
    assert key == build.build_key("9.0", build.CSRC)       # content, not location
    assert key != build.build_key("8.0", csrc)             # another GPU arch builds another module
    header = csrc / "msdcn_kernels.cuh"
    header.write_text(header.read_text() + "\n// changed\n")
    assert build.build_key("9.0", csrc) != key             # any source or header change rebuilds
    assert build.module_name("9.0", csrc).startswith("flowdcn_msdcn_sm90_")


def test_ext_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWDCN_EXT_DIR", str(tmp_path / "ext"))
    assert build.ext_root() == tmp_path / "ext"
    monkeypatch.delenv("FLOWDCN_EXT_DIR")
    assert build.ext_root() == Path.home() / ".cache" / "flowdcn_ext"


@pytest.fixture
def fresh_cuda_backend(monkeypatch):
    from cuda_ext.msdcn import cuda

    monkeypatch.setitem(cuda._state, "error", None)  # forget any cached result
    monkeypatch.setitem(cuda._state, "ok", False)
    return cuda


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_clear_errors_without_gpu_or_nvcc(fresh_cuda_backend, monkeypatch):
    cuda = fresh_cuda_backend
    if torch.version.cuda is None:
        with pytest.raises(RuntimeError, match="CPU-only build"):
            cuda.require()
    monkeypatch.setitem(cuda._state, "error", None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        cuda.require()
    assert cuda.available() is False  # never raises
    monkeypatch.setitem(cuda._state, "error", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    # With a GPU present the failure is also a warning: impl="auto" would fall back to the reference.
    with pytest.warns(RuntimeWarning, match="uses the PyTorch reference"), pytest.raises(RuntimeError, match="nvcc not found"):
        cuda.require()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_dispatch_without_gpu(fresh_cuda_backend):
    import cuda_ext
    from cuda_ext.msdcn.reference import msdcn_ref

    g = torch.Generator().manual_seed(0)
    value = torch.randn(1, 4, 5, 2, 8, generator=g)
    offsets = torch.randn(1, 4, 5, 2, 3, 2, generator=g) * 2
    weights = torch.randn(1, 4, 5, 2, 3, generator=g)
    assert not cuda_ext.cuda_available()
    torch.testing.assert_close(cuda_ext.msdcn(value, offsets, weights, impl="auto"), msdcn_ref(value, offsets, weights))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cuda_ext.msdcn(value, offsets, weights, impl="cuda")


def test_file_lock_excludes_and_times_out(tmp_path):
    lock = tmp_path / "x.lock"
    with build.file_lock(lock):
        with pytest.raises(build.BuildError, match="x.lock"):
            with build.file_lock(lock, timeout_s=0.3):
                pass
    with build.file_lock(lock, timeout_s=0.3):  # released: free again
        pass


def test_file_lock_serialises_processes(tmp_path):
    """Two processes racing for the build lock run their critical sections one after the other."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from cuda_ext.msdcn import build
        with build.file_lock(__import__("pathlib").Path({str(tmp_path / 'b.lock')!r})):
            t0 = time.time(); time.sleep(0.6); t1 = time.time()
        print(t0, t1)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    spans = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        spans.append(tuple(map(float, out.split())))
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0 + 1e-3, f"critical sections overlap: {spans}"


def test_fake_impls_give_shapes_and_dtypes():
    """The registered fake impls (used by torch.compile) return the right shapes and dtypes without running kernels."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cuda_ext.msdcn import cuda  # noqa: F401  (registers the ops)

    with FakeTensorMode():
        B, H, W, G, C, K = 2, 3, 5, 4, 72, 9
        value = torch.empty(B, H, W, G, C, dtype=torch.bfloat16)
        delta = torch.empty(B, H, W, G, K, 2, dtype=torch.bfloat16)
        scale = torch.empty(B, H, W, G, K, dtype=torch.bfloat16)
        weights = torch.empty(B, H, W, G, K, dtype=torch.float32)
        prior, s0, s_max = torch.empty(K, 2), torch.empty(G), torch.empty(2)
        out = torch.ops.flowdcn.msdcn_deform_cuda(value, delta, scale, weights, prior, s0, s_max, "floor")
        assert out.shape == value.shape and out.dtype == torch.bfloat16
        grads = torch.ops.flowdcn.msdcn_deform_cuda_backward(out, value, delta, scale, weights, prior, s0, s_max, "floor")
        for g, ref in zip(grads, (value, delta, scale, weights, s0)):
            assert g.shape == ref.shape and g.dtype == ref.dtype
        offsets = torch.empty(B, H, W, G, K, 2)
        gv, go, gw = torch.ops.flowdcn.msdcn_cuda_backward(out, value, offsets, weights, "trunc")
        assert (gv.dtype, go.dtype, gw.dtype) == (torch.bfloat16, torch.float32, torch.float32)


def test_kernel_availability_checks_do_not_break_compiled_graphs(monkeypatch):
    """The first compiled call may have to build the kernels (file IO, hashing): dynamo must not trace into that.

    Traced, every call site of the op would be cut into several graphs for good (measured on an H200: 5 graphs
    per FlowDCN block and a 2x slower compiled training step). The availability checks run once in Python instead.
    """
    import sys as _sys

    msdcn_pkg = _sys.modules["cuda_ext.msdcn"]
    builds = []

    class FakeBackend:
        """Stands in for cuda_ext.msdcn.cuda on a fresh process: the first check 'builds' (does file IO)."""

        @staticmethod
        def available():
            builds.append(os.stat(build.__file__).st_size)   # an untraceable call, as in build.load()
            return True

        require = available

    monkeypatch.setattr(msdcn_pkg, "_cuda_backend", lambda: FakeBackend)
    monkeypatch.setattr(msdcn_pkg, "_gpu_present", lambda: True)   # same answer with or without a real GPU

    def f(x):
        a = 2.0 if msdcn_pkg.cuda_available() else 3.0
        b = 5.0 if msdcn_pkg._require_cuda() else 7.0
        return x * a + b

    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(torch.ones(3))
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1
    assert len(builds) == 2, "both availability checks must run (once each, in plain Python)"
    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(torch.ones(3)), torch.full((3,), 7.0))


def _call_args(text: str, start: int) -> list[str]:
    """Top-level comma-separated arguments of the call whose '(' is at text[start]."""
    depth, args, cur, i, in_str = 0, [], [], start, False
    while True:
        ch = text[i]
        if in_str:
            cur.append(ch)
            if ch == "\\":
                cur.append(text[i + 1])
                i += 1
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
            cur.append(ch)
        elif ch in "([{":
            depth += 1
            if depth > 1:
                cur.append(ch)
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                args.append("".join(cur).strip())
                return args
            cur.append(ch)
        elif ch == "," and depth == 1:
            args.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1


def test_torch_checks_pass_one_prebuilt_message():
    """Every TORCH_CHECK in csrc/ passes one message: a string literal or errmsg(...) (numbers via std::to_string).
    On the GPU machine a TORCH_CHECK given a number (c10::str's ostringstream in extension code) crashed the process
    with SIGSEGV instead of raising; this keeps such a check from coming back."""
    import re

    checked = 0
    for src in build.source_files():
        if src.suffix not in (".cu", ".cpp", ".cuh", ".h"):
            continue
        text = src.read_text()
        for m in re.finditer(r"\bTORCH_CHECK\s*\(", text):
            args = _call_args(text, m.end() - 1)
            checked += 1
            where = f"{src.name}:{text.count(chr(10), 0, m.start()) + 1}"
            assert len(args) <= 2, f"{where}: TORCH_CHECK with {len(args) - 1} message pieces; use errmsg(...)"
            if len(args) == 2:
                msg = args[1]
                assert msg.startswith("errmsg(") or re.fullmatch(r'"(?:[^"\\]|\\.)*"', msg), f"{where}: message {msg[:60]!r}"
    assert checked >= 20  # the launchers' checks were found
