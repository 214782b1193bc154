"""Train with Amos in torchtitan (0.3): the config functions torchtitan's launcher picks by name.

torchtitan reads a trainer config from a function in a "config registry" module; these take
torchtitan's own Llama 3 configs and swap the optimizer for Amos (amos_fused.torchtitan). Every
parallelism torchtitan composes (FSDP2, HSDP, tensor parallel, FSDP2 + TP) stays as configured:
Amos steps the DTensor parameters on their local shards. From the repository root:

    PYTHONPATH=. torchrun --nproc_per_node 8 -m torchtitan.train \\
        --module examples.torchtitan_amos --config llama3_8b_amos

(`llama3_debugmodel_amos` is the small model torchtitan tests with.) Per-group options go in
`optimizer_kwargs`; the biases and norm gains here get "tensor" slices, the matrices one slice per
output row, the official recipe's default. torchtitan's warmup and decay schedule scales lr as it
does for AdamW. Running this file checks that the configs build.
"""
from torchtitan.components.optimizer import ParamGroupConfig
from torchtitan.models.llama3.config_registry import llama3_8b, llama3_debugmodel

from amos_fused.torchtitan import AmosOptimizersContainer


def amos_optimizer(lr=0.02, **options):
    """An optimizer config: Amos for every parameter (1-D ones with one slice per tensor)."""
    return AmosOptimizersContainer.Config(param_groups=[
        ParamGroupConfig(pattern=r"(norm|bias)", optimizer_name="Amos",
                         optimizer_kwargs=dict(lr=lr, granularity="tensor", **options)),
        ParamGroupConfig(pattern=r".*", optimizer_name="Amos", optimizer_kwargs=dict(lr=lr, **options)),
    ])


def llama3_debugmodel_amos():
    config = llama3_debugmodel()
    config.optimizer = amos_optimizer()
    return config


def llama3_8b_amos():
    config = llama3_8b()
    config.optimizer = amos_optimizer()
    return config


if __name__ == "__main__":
    for make in (llama3_debugmodel_amos, llama3_8b_amos):
        print(make.__name__, "->", type(make().optimizer).__qualname__)
