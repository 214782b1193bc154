"""Packaging: one version, and `pip wheel` / `pip install` of the repository work offline.

The build test compiles the CPU extension once (AMOS_FUSED_CUDA=0, about a minute of CPU) in a
copy of the sources under tmp_path; the wheel and the install share its objects. It runs with the
suite (CI), is marked `build` (`pytest -m "not build"` leaves it out of a quick local run), and
is skipped, saying why, where such a build cannot run (no pip, an old setuptools, no C++ compiler).
"""
import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

import amos_fused

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = ["setup.py", "pyproject.toml", "LICENSE", "README.md", "amos_fused", "kernels", "csrc"]


def test_the_version_lives_in_one_place():
    """amos_fused.__version__; pyproject.toml reads it, setup.py does not repeat it, and the
    installed metadata agrees."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = {attr = "amos_fused.__version__"}' in pyproject
    assert "version=" not in (ROOT / "setup.py").read_text()
    assert re.fullmatch(r"\d+\.\d+\.\d+", amos_fused.__version__)
    assert importlib.metadata.version("amos_fused") == amos_fused.__version__
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]


def _cannot_build():
    """Why an offline build cannot run here, or None."""
    # by its metadata: importlib.util.find_spec("pip") would make setuptools' distutils shim step
    # aside for the rest of the process (it does so for pip), and a later import of setuptools
    # (torch.compile's Inductor builds with it) then fails
    try:
        importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        return "pip is not installed in this interpreter"
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return "setuptools is not installed (pyproject.toml's build backend)"
    if tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < (77, 0):
        return f"setuptools {version} is too old: pyproject.toml's license expression needs setuptools>=77"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++, or $CXX) to build the extension"
    return None


def _pip(args, cwd):
    env = {**os.environ, "AMOS_FUSED_CUDA": "0", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run = subprocess.run([sys.executable, "-m", "pip", *args, "--no-build-isolation", "--no-deps", "--no-index",
                          "--no-cache-dir", "."], cwd=cwd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.build
@pytest.mark.skipif(_cannot_build() is not None, reason=f"offline build impossible: {_cannot_build()}")
def test_wheel_and_install_build_offline_and_work(tmp_path):
    src = tmp_path / "src"
    for name in SOURCES:  # the sources only: no build outputs (amos_fused/_C*.so) of this checkout
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)

    _pip(["wheel", "-w", str(tmp_path / "wheels")], src)
    wheel, = (tmp_path / "wheels").glob("amos_fused-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    version = amos_fused.__version__
    info = f"amos_fused-{version}.dist-info"
    assert any(re.fullmatch(r"amos_fused/_C\..*\.so", n) for n in names), names
    assert {"amos_fused/__init__.py", "amos_fused/optimizer.py", "amos_fused/kernels/amos_triton.py",
            "amos_fused/kernels/tables.py", f"{info}/licenses/LICENSE"} <= set(names)
    assert not any(n.startswith(("tests/", "benchmarks/", "csrc/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    for line in (f"Version: {version}", "License-Expression: Apache-2.0", "Provides-Extra: bench",
                 "Provides-Extra: examples", "Requires-Dist: torch>=2.4"):
        assert line in metadata.splitlines(), line

    site = tmp_path / "site"
    _pip(["install", "--target", str(site)], src)  # the same build directory: nothing compiles again
    check = ("import amos_fused, torch\n"
             "from amos_fused import Amos, cpp_backend\n"
             "assert cpp_backend.unavailable('cpu') is None, cpp_backend.unavailable('cpu')\n"
             "p = torch.nn.Parameter(torch.ones(3, 4)); p.grad = torch.ones(3, 4)\n"
             "Amos([p], backend='cpu').step()\n"
             "assert torch.isfinite(p).all() and (p < 1).all()\n"
             "print(amos_fused.__file__, amos_fused.__version__)\n")
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert run.returncode == 0, run.stderr[-3000:]
    where, got = run.stdout.split()
    assert pathlib.Path(where).is_relative_to(site) and got == version
