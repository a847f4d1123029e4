"""The build and the op registry: readable import errors, every op registered with fake + autograd."""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

import fastcascade
from fastcascade import _ops

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_against_another_torch_names_both_versions(tmp_path):
    r = _run("import torch; torch.__version__ = '0.0.1'; import fastcascade", tmp_path)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "0.0.1" in r.stderr and _ops.BUILD_INFO.TORCH_VERSION in r.stderr
    assert "pip install" in r.stderr


def test_import_from_an_unbuilt_source_tree_says_so():
    r = _run("import fastcascade", REPO)
    if r.returncode == 0:  # an in-place build exists: nothing to check
        assert "fastcascade" in _run("import fastcascade; print(fastcascade.__file__)", REPO).stdout
        return
    assert "not built" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available() or not _ops.HAS_TRITON, reason="off-GPU behaviour with triton installed")
def test_triton_loads_lazily_off_gpu(tmp_path):
    """Importing Triton costs about a second: without a GPU (and no interpreter) import skips it."""
    code = "import sys, fastcascade; print('triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCASCADE_BACKEND")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr
    code += "; fastcascade._ops.load_triton_ops(); print('triton' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.split() == ["False", "True"], r.stdout + r.stderr


def test_build_info_matches_the_extension():
    assert _ops.BUILD_INFO.TORCH_VERSION == torch.__version__
    assert _ops.CUDA_COMPILED == _ops.BUILD_INFO.WITH_CUDA
    assert fastcascade.__version__


def test_every_op_runs_on_meta_tensors_and_records_autograd():
    """Each op (C++ and Triton twins) has a fake kernel (meta tensors run) and an autograd formula."""
    suffixes = ("", "_triton") if _ops.HAS_TRITON else ("",)
    if _ops.HAS_TRITON:
        _ops.load_triton_ops()
    x = torch.empty(4, 3, device="meta", requires_grad=True)
    for suffix in suffixes:
        loss, grad, scale = getattr(torch.ops.fastcascade, "sigmoid_focal" + suffix)(
            x, torch.empty(4, 3, device="meta"), 0.25, 2.0, 0.0, 1, True)
        assert loss.shape == () and grad.shape == (4, 3) and scale.dtype == torch.float32
        assert loss.grad_fn is not None
        loss, grad, scale = getattr(torch.ops.fastcascade, "softmax_focal" + suffix)(
            x, torch.empty(4, dtype=torch.long, device="meta"), None, 2.0, 0.0, -100, 0, True)
        assert loss.shape == (4,) and grad.shape == (4, 3) and loss.grad_fn is not None


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_cpu_sources_compile_as_one_translation_unit(tmp_path):
    """setup.py compiles groups of CPU sources as one translation unit (which group depends on MAX_JOBS):
    no two sources may define the same name outside their own namespace."""
    from torch.utils.cpp_extension import include_paths

    sources = [REPO / "csrc" / "fastcascade.cpp", *sorted((REPO / "csrc").glob("*/*_cpu.cpp"))]
    unit = tmp_path / "all_cpu.cpp"
    unit.write_text("".join(f'#include "{s.relative_to(REPO / "csrc")}"\n' for s in sources))
    cmd = ["c++", "-std=c++20", "-fsyntax-only", "-fopenmp", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H",
           "-DTORCH_EXTENSION_NAME=_C", f"-I{REPO / 'csrc'}", f"-I{sysconfig.get_paths()['include']}",
           *(f"-I{p}" for p in include_paths()), str(unit)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
