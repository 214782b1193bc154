"""Install amos_fused (with kernels/ as amos_fused.kernels).

Install with `pip install --no-build-isolation -e .` so the build sees the installed torch.
"""
from setuptools import setup

setup(
    name="amos_fused",
    version="0.1.0",
    description="Fused Amos optimizers for PyTorch",
    packages=["amos_fused", "amos_fused.kernels"],
    package_dir={"amos_fused": "amos_fused", "amos_fused.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
)
