"""Build the extension amos_fused._C (the package, its metadata and version: pyproject.toml).

Install with `pip install --no-build-isolation -e .` (or `.` without -e, or
`pip wheel --no-build-isolation --no-deps .`) so the build sees the installed torch.

amos_fused._C always holds the CPU kernels (backend="cpu"). The CUDA kernels (backend="cuda") are
added when torch is a CUDA build and a CUDA toolkit is found. Switches (environment):
  AMOS_FUSED_CUDA=1      CUDA kernels required: a missing toolkit or a CPU torch is an error
  AMOS_FUSED_CUDA=0      CPU kernels only
  CUDA_HOME              the toolkit (default: /usr/local/cuda, else the nvcc on PATH)
  TORCH_CUDA_ARCH_LIST   GPU architectures (default here: "8.0;9.0", A100 and H100/H200)
  MAX_JOBS               parallel compile jobs (default 2: each takes about 2 GB)
"""
import os
import shutil
import sys

from setuptools import setup


def _cuda_home():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _want_cuda(torch):
    """(build the CUDA kernels?, why) from AMOS_FUSED_CUDA, torch's build and the toolkit."""
    switch = os.environ.get("AMOS_FUSED_CUDA", "").strip()
    if switch not in ("", "0", "1"):
        sys.exit(f"amos_fused: AMOS_FUSED_CUDA={switch!r} is invalid; use 1 (require CUDA), 0 (CPU only) or unset")
    if switch == "0":
        return False, "AMOS_FUSED_CUDA=0"
    home = _cuda_home()
    missing = None
    if torch.version.cuda is None:
        missing = f"torch {torch.__version__} is not a CUDA build"
    elif home is None:
        missing = "no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)"
    if missing and switch == "1":
        sys.exit(f"amos_fused: AMOS_FUSED_CUDA=1 but {missing}")
    if missing:
        return False, missing
    os.environ["CUDA_HOME"] = home  # before cpp_extension reads it (its own guess can be wrong)
    return True, f"CUDA toolkit at {home}, torch {torch.__version__}"


_SUMMARY = []  # the one line saying what is built and why, printed when the build runs


def _ext_modules():
    import torch
    from torch.utils import cpp_extension

    cuda, why = _want_cuda(torch)
    os.environ.setdefault("MAX_JOBS", "2")
    # -ffp-contract=off / --fmad=false: no fused multiply-adds, so each formula rounds like the
    # reference's separate tensor ops, and host and device agree (csrc/amos_math.h).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    sources = ["csrc/ops.cpp", "csrc/amos_cpu.cpp", "csrc/checks_cpu.cpp", "csrc/steps_cpu.cpp",
               "csrc/two_phase.cpp", "csrc/plan_cache_trace.cpp"]
    headers = ["csrc/amos_math.h", "csrc/ops.h", "csrc/pieces.h", "csrc/plan_cache.h"]  # rebuild when they change; shipped in an sdist
    if cuda:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        _SUMMARY.append(f"amos_fused: building amos_fused._C with CPU + CUDA kernels (arch "
                        f"{os.environ['TORCH_CUDA_ARCH_LIST']}): {why}")
        return [cpp_extension.CUDAExtension(
            "amos_fused._C", sources + ["csrc/amos_cuda.cu"],
            depends=headers, define_macros=[("AMOS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]},
            extra_link_args=["-fopenmp"])]
    _SUMMARY.append(f"amos_fused: building amos_fused._C with CPU kernels only: {why}")
    return [cpp_extension.CppExtension("amos_fused._C", sources, depends=headers, extra_compile_args=cxx,
                                       extra_link_args=["-fopenmp"])]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        def run(self):
            print(*_SUMMARY, file=sys.stderr)
            super().run()

    return Build


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": _build_ext()})
