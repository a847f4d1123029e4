"""Build fastcascade._C: C++ CPU kernels always; CUDA kernels when a GPU is visible (or forced).

Compiling the CUDA kernels about doubles a build, so a machine that cannot run them skips them.

Environment:
  FASTCASCADE_FORCE_CUDA=1   build the CUDA kernels or fail, GPU or not (CI uses this so a broken
                             .cu fails); =0 builds CPU kernels only. Unset: CUDA kernels when torch
                             is a CUDA build, a toolkit is found and torch sees a GPU.
  TORCH_CUDA_ARCH_LIST       target archs; default "9.0" when no GPU is visible (a forced build).
  MAX_JOBS                   parallel compile jobs (read by torch's ninja build).
  CUDA_HOME                  CUDA toolkit; found from nvcc on PATH when unset.
"""

import glob
import importlib.util
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_of(nvcc):
    """The toolkit folder behind an nvcc, following symlinks and `exec /…/bin/nvcc` wrapper scripts."""
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if not head.startswith(b"\x7fELF"):
            for m in re.finditer(rb"(/[^\s\"']+)/bin/nvcc\b", head):
                candidates.insert(0, m.group(1).decode())
    except OSError:
        pass
    for c in candidates:
        if os.path.isfile(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def _find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return _toolkit_of(nvcc)
    default = "/usr/local/cuda"
    return default if os.path.isfile(os.path.join(default, "include", "cuda_runtime.h")) else None


def _nvidia_wheel_includes():
    """Headers such as cusparse.h that CUDA 13 torch wheels ship under site-packages/nvidia/cu13/include."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for loc in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(loc, "cu*", "include")))
    return dirs


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: resolve it first.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

force = os.environ.get("FASTCASCADE_FORCE_CUDA")
can_cuda = torch.version.cuda is not None and _cuda_home is not None
if force == "1" and not can_cuda:
    sys.exit(
        "FASTCASCADE_FORCE_CUDA=1 but CUDA kernels cannot be built: "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={_cuda_home}. "
        "Install a CUDA build of torch and a CUDA toolkit (nvcc), or set CUDA_HOME."
    )
gpu_visible = torch.version.cuda is not None and torch.cuda.is_available()
with_cuda = (can_cuda and gpu_visible) if force is None else force == "1"

if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"


def _cpu_units(sources: list[str], jobs: int) -> list[str]:
    """The CPU sources as `jobs` translation units (each #includes a group of sources), one compile job each.

    Every source parses the same torch headers (~12 s of the 15-47 s each takes), so with fewer cores than
    sources the build mostly re-reads them: on the 2-core machine two units build in 72 s where the eight
    sources took 94 s. Groups balance the sources' sizes. With a job per source they compile as they are.
    """
    if jobs >= len(sources):
        return sources
    groups, sizes = [[] for _ in range(jobs)], [0] * jobs
    for src in sorted(sources, key=lambda s: (-os.path.getsize(s), s)):
        k = sizes.index(min(sizes))
        groups[k].append(src)
        sizes[k] += os.path.getsize(src)
    os.makedirs(os.path.join("build", "units"), exist_ok=True)
    units = []
    for k, group in enumerate(groups):
        unit = os.path.join("build", "units", f"cpu_{k}.cpp")
        text = "// Written by setup.py: CPU sources compiled as one translation unit.\n" + "".join(
            f'#include "{os.path.relpath(src, "csrc")}"\n' for src in sorted(group))
        old = None
        if os.path.exists(unit):
            with open(unit) as f:
                old = f.read()
        if old != text:  # an unchanged unit keeps its mtime, so ninja does not rebuild it
            with open(unit, "w") as f:
                f.write(text)
        units.append(unit)
    return units


jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
cpu_sources = _cpu_units(["csrc/fastcascade.cpp"] + sorted(glob.glob("csrc/*/*_cpu.cpp")), max(jobs, 1))
cuda_sources = sorted(glob.glob("csrc/*/*_cuda.cu"))
include_dirs = [os.path.join(ROOT, "csrc")]
# no-trapping-math lets the compiler if-convert guarded divisions, so the CPU loops vectorise;
# at::parallel_for is inline OpenMP in ATen's headers: without -fopenmp it runs on one thread.
# -g0 undoes the -g that Python's own CFLAGS put first: debug info for torch's templates was about a
# quarter of the build's compile time.
cxx_flags = ["-O3", "-g0", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
link_flags = ["-fopenmp"]

if with_cuda:
    include_dirs += _nvidia_wheel_includes()
    ext = CUDAExtension(
        "fastcascade._C",
        cpu_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=[("FASTCASCADE_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension("fastcascade._C", cpu_sources, include_dirs=include_dirs,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

# Recorded next to the package so that an import against another torch can say which versions differ.
with open(os.path.join(ROOT, "fastcascade", "_build_info.py"), "w") as f:
    f.write(
        "# Written by setup.py at build time.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST', '') if with_cuda else ''!r}\n"
    )

def _why_cuda() -> str:
    if force is not None:
        return f"FASTCASCADE_FORCE_CUDA={force}"
    if not can_cuda:
        return f"no CUDA build of torch or no toolkit: torch CUDA {torch.version.cuda}, CUDA_HOME={_cuda_home}"
    if not gpu_visible:
        return "no GPU visible; FASTCASCADE_FORCE_CUDA=1 builds them anyway"
    return f"GPU visible, CUDA_HOME={_cuda_home}"


print(
    "fastcascade build configuration:\n"
    f"  torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}\n"
    f"  CUDA kernels: {'yes' if with_cuda else 'no'} ({_why_cuda()})\n"
    f"  TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')} MAX_JOBS={os.environ.get('MAX_JOBS', '')}\n"
    f"  sources: {' '.join(cpu_sources + (cuda_sources if with_cuda else []))}",
    flush=True,
)

setup(
    packages=find_packages(include=["fastcascade", "fastcascade.*"]) + ["fastcascade.kernels"],
    package_dir={"fastcascade": "fastcascade", "fastcascade.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
