"""Amos built by torchtitan's own optimizer code (amos_fused.torchtitan), on FSDP2 + tensor parallel.

4 gloo ranks on a 2x2 (dp, tp) mesh, as torchtitan composes them: ColwiseParallel and
RowwiseParallel on the tp dimension, then fully_shard on dp, which gives the placements
(_StridedShard(0), Shard(0)), (Shard(0), Shard(1)) and (Shard(0), Replicate), and a LayerNorm on
the dp submesh alone. Checked:
- `AmosOptimizersContainer.Config(...).build(model_parts=...)` builds Amos (names from torchtitan);
- training matches the same model trained unsharded with Amos (fp32 tolerance of
  tests/test_distributed.py: TP and FSDP2 reorder the gradients' sums, ~1e-7 relative);
- torchtitan's state initialisation (`init_optim_state`: a zero-gradient, lr-0 step when an
  optimizer's state is empty) leaves the parameters unchanged;
- a DCP checkpoint of the container (torchtitan's flat, name-keyed optimizer state) resumes the
  run bit for bit.
"""
import copy

import pytest
import torch
import torch.distributed as dist

from dist_util import full, spawn

pytest.importorskip("torchtitan.components.optimizer", reason="torchtitan is not installed")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

TOL = dict(rtol=1e-5, atol=1e-6)


def _model():
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 6),
                               torch.nn.LayerNorm(6))


def _parallel(model, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return model


def _container(model, **kwargs):
    from torchtitan.components.optimizer import ParamGroupConfig

    from amos_fused.torchtitan import AmosOptimizersContainer

    config = AmosOptimizersContainer.Config(param_groups=[
        ParamGroupConfig(pattern=r"\.bias$", optimizer_name="Amos",
                         optimizer_kwargs=dict(lr=0.05, granularity="tensor", **kwargs)),
        ParamGroupConfig(pattern=r".*", optimizer_name="Amos", optimizer_kwargs=dict(lr=0.05, **kwargs)),
    ])
    return config.build(model_parts=[model])


def _batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)


def _train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        x, y = _batch(step)  # the same batch on every rank: FSDP2's average is the full-batch gradient
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def worker(rank, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.tensor.placement_types import _StridedShard
    from torchtitan.components.optimizer.utils import init_optim_state

    from amos_fused import Amos

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    single = _model()
    model = _parallel(copy.deepcopy(single), mesh)
    placements = {name: tuple(p.placements) for name, p in model.named_parameters()}
    assert any(isinstance(pl, _StridedShard) for pls in placements.values() for pl in pls), placements

    for options in (dict(), dict(schedule="inverse_time", half_life=3, momentum=0.0)):
        torch.manual_seed(0)
        single, model = _model(), None
        model = _parallel(copy.deepcopy(single), mesh)
        opt = _container(model, **options)
        assert all(isinstance(o, Amos) for o in opt.optimizers), opt.optimizers
        ref = _container(single, backend="reference", **options)

        # torchtitan's state initialisation changes no parameter: its own call (a no-op, Amos' state
        # holds eta), and the zero-gradient, lr-0 step it takes for an optimizer without state
        before = [full(p).clone() for p in model.parameters()]
        for o in opt.optimizers:
            init_optim_state(o)
            lrs = [g["lr"] for g in o.param_groups]
            for g in o.param_groups:
                g["lr"] = 0.0
                for p in g["params"]:
                    p.grad = torch.zeros_like(p)
            o.step()
            o.zero_grad()
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr
            for st in o.state.values():  # as if that step had not been taken
                st["step"].zero_()
        assert all(torch.equal(full(p), b) for p, b in zip(model.parameters(), before)), "a zero, lr-0 step moved params"

        _train(model, opt, 3)
        _train(single, ref, 3)
        for (name, p), q in zip(model.named_parameters(), single.parameters()):
            torch.testing.assert_close(full(p), q, **TOL, msg=lambda m: f"rank {rank}, {options}, {name}: {m}")

    # a DCP checkpoint of the container resumes bit for bit (a fresh model: another init and eta)
    dcp.save({"model": model.state_dict(), "optimizer": opt}, checkpoint_id=path)
    _train(model, opt, 2, start=3)
    expected = [full(p).clone() for p in model.parameters()]
    torch.manual_seed(1)
    model = _parallel(_model(), mesh)
    opt = _container(model, schedule="inverse_time", half_life=3, momentum=0.0)
    state = {"model": model.state_dict(), "optimizer": opt}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    _train(model, opt, 2, start=3)
    for (name, p), e in zip(model.named_parameters(), expected):
        assert torch.equal(full(p), e), f"rank {rank}, {name}: the resumed run differs"


def test_amos_through_torchtitan_on_fsdp2_and_tensor_parallel(tmp_path):
    spawn(worker, str(tmp_path / "ckpt"), world=4)


def test_the_example_configs_select_amos():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "torchtitan_amos.py")
    spec = importlib.util.spec_from_file_location("torchtitan_amos", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    from amos_fused.torchtitan import AmosOptimizersContainer

    for make in (example.llama3_debugmodel_amos, example.llama3_8b_amos):
        config = make()
        assert isinstance(config.optimizer, AmosOptimizersContainer.Config), make.__name__
        assert {g.optimizer_name for g in config.optimizer.param_groups} == {"Amos"}
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    container = example.amos_optimizer().build(model_parts=[model])
    groups = [g for o in container.optimizers for g in o.param_groups]
    assert [g["granularity"] for g in groups] == ["tensor", "row"], groups
