"""Amos in torchtitan: an optimizer container that builds Amos through torchtitan's own code.

torchtitan (0.3) builds its optimizers from `OptimizersContainer.Config`: param groups matched by
regex on parameter names, each naming an optimizer. `AmosOptimizersContainer` adds the name
"Amos" to the names torchtitan knows, so a trainer config selects it like this:

    from amos_fused.torchtitan import AmosOptimizersContainer
    from torchtitan.components.optimizer import ParamGroupConfig

    optimizer = AmosOptimizersContainer.Config(param_groups=[
        ParamGroupConfig(pattern=r".*", optimizer_name="Amos", optimizer_kwargs={"lr": 0.02}),
    ])

(the `optimizer` field of torchtitan's `Trainer.Config`; torchtitan calls
`config.optimizer.build(model_parts=...)` after parallelising the model, so Amos sees the
FSDP2 / HSDP / tensor-parallel DTensors and steps them on their local shards). Other param groups
may still name torchtitan's own optimizers. `implementation` ("fused", "foreach") is torch's
switch for its own optimizers: Amos ignores it and picks its backend itself (`backend="auto"`).

Checkpoints: torchtitan flattens optimizer state by parameter name for DCP, and first creates
missing state with a zero-gradient, lr-0 step when an optimizer's state is empty. Amos' state is
never empty (it holds each parameter's eta from construction), so this container creates Amos'
moments with `distributed.init_state` (zeros, exactly as a first step makes them) before
torchtitan saves or loads, and a resumed run continues bit for bit.

torchtitan is not a dependency of amos_fused: importing this module imports it.
"""
from dataclasses import dataclass

from torchtitan.components.optimizer import OptimizersContainer

from .distributed import init_state
from .optimizer import Amos

# torch's switches for its own optimizers, set on every group by torchtitan: not Amos options
_TORCH_ONLY = ("fused", "foreach")


def build_amos(param_groups, **kwargs):
    """Amos from torchtitan's param group dicts (params, param_names and optimizer_kwargs)."""
    groups = [{k: v for k, v in group.items() if k not in _TORCH_ONLY} for group in param_groups]
    return Amos(groups, **kwargs)


class AmosOptimizersContainer(OptimizersContainer):
    """torchtitan's OptimizersContainer that also knows "Amos" (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    @staticmethod
    def _resolve_optimizer_factory(name):
        if name == "Amos":
            return build_amos
        return OptimizersContainer._resolve_optimizer_factory(name)

    def _amos_state(self):
        for optimizer in self.optimizers:
            if isinstance(optimizer, Amos):
                init_state(optimizer)

    def state_dict(self):
        self._amos_state()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        self._amos_state()
        super().load_state_dict(state_dict)
