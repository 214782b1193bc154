"""The plug-in examples of examples/ (docs/integrations.md), each run here.

- plain loop: Amos with `total_steps` learns a teacher, and its schedule ends with the run.
- Lightning `configure_optimizers` and HF `Trainer` (a subclass building Amos): `lightning` and
  `transformers` are in requirements.txt (the test environment), not dependencies of the package;
  skipped where they are absent. Each must train with OUR optimizer, its lr scheduled over the
  run's optimizer steps: the parameters equal a plain loop with `total_steps` over the same
  batches, and with epochs and gradient accumulation `total_steps` counts optimizer steps, not batches.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))

from amos_fused import Amos  # noqa: E402

ROOT = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))


def import_beside_kernels(name):
    """Import `name` while the repository's kernels/ folder cannot stand in for a top-level
    `kernels` package: `python -m pytest` from the root puts the root on sys.path, and recent
    transformers import Hugging Face's `kernels` when it is installed. That one is imported first,
    from sys.path without the root, so later imports find it in sys.modules."""
    import importlib
    import importlib.metadata

    if "kernels" not in sys.modules:
        try:
            importlib.metadata.distribution("kernels")
        except importlib.metadata.PackageNotFoundError:
            pass
        else:
            saved = sys.path[:]
            sys.path[:] = [x for x in sys.path if os.path.realpath(x or os.curdir) != ROOT]
            try:
                importlib.import_module("kernels")
            finally:
                sys.path[:] = saved
    return pytest.importorskip(name)

STEPS = 6


def batches(n=STEPS, size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 1, generator=gen)
    xs = [torch.randn(size, 16, generator=gen) for _ in range(n)]
    return [(x, torch.tanh(x @ teacher)) for x in xs]


def mse(net, x, y):
    return torch.nn.functional.mse_loss(net(x), y)


def plain_reference(net, data, loss=mse, clip=None):
    """What the framework examples must do: Amos at its defaults with total_steps = the batches,
    one step per batch (`clip`: the global gradient norm clipped first, as HF Trainer does)."""
    opt = Amos(net.named_parameters(), total_steps=len(data))
    for x, y in data:
        loss(net, x, y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return opt


def schedule(opt):
    """(total_steps, steps taken) of the lr schedule of every param group."""
    return {tuple(g["lr_schedule"][1:3]) for g in opt.param_groups}


def test_plain_loop_learns():
    import plain_loop

    model, opt, losses = plain_loop.train(steps=100)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # measured: ~0.73 -> ~0.15 over 100 steps; an optimizer that does not learn stays near 0.75
    assert last < 0.4 * first, f"loss {first:.3f} -> {last:.3f}"
    assert opt.state[model[0].weight]["step"].item() == 100
    assert schedule(opt) == {(100, 100)}  # the schedule spans the run, and its lr is 0 after it


def test_lightning_configure_optimizers():
    pytest.importorskip("lightning")
    import lightning_module

    data = batches()
    torch.manual_seed(0)
    model, trainer = lightning_module.fit(torch.utils.data.DataLoader(data, batch_size=None), max_steps=STEPS)
    opt = trainer.optimizers[0]
    assert isinstance(opt, Amos) and opt.state[model.net[0].weight]["step"].item() == STEPS
    assert schedule(opt) == {(STEPS, STEPS)}
    torch.manual_seed(0)
    net = lightning_module.Regressor().net
    plain_reference(net, data)
    for p, q in zip(model.net.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # same ops in the same order: bitwise


def test_lightning_total_steps_counts_optimizer_steps():
    pytest.importorskip("lightning")
    import lightning_module

    loader = torch.utils.data.DataLoader(batches(), batch_size=None)  # 6 batches per epoch
    model, trainer = lightning_module.fit(loader, max_epochs=2, accumulation=2)  # 12 batches, 6 steps
    opt = trainer.optimizers[0]
    assert opt.state[model.net[0].weight]["step"].item() == 6
    assert schedule(opt) == {(6, 6)}


class _Dataset(torch.utils.data.IterableDataset):
    """Iterable: Trainer keeps its order (a map-style dataset would be shuffled)."""

    def __init__(self, data):
        self.rows = [{"x": x[i], "labels": y[i]} for x, y in data for i in range(len(x))]

    def __iter__(self):
        return iter(self.rows)


class _HFRegressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


def hf_trainer(tmp_path, model, dataset, **kw):
    import_beside_kernels("transformers")
    pytest.importorskip("accelerate")
    import hf_trainer

    return hf_trainer.make_trainer(model, dataset, os.fspath(tmp_path), **kw)


def amos_of(trainer):
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, Amos)
    return opt


def test_hf_trainer_amos_with_total_steps(tmp_path):
    data = batches()
    torch.manual_seed(0)
    model = _HFRegressor()
    net = _HFRegressor()
    net.load_state_dict(model.state_dict())
    trainer = hf_trainer(tmp_path, model, _Dataset(data), max_steps=STEPS)
    trainer.train()
    opt = amos_of(trainer)
    assert opt.state[model.net[0].weight]["step"].item() == STEPS and schedule(opt) == {(STEPS, STEPS)}
    from amos_fused import TotalStepsLR

    assert isinstance(trainer.lr_scheduler, TotalStepsLR) and trainer.lr_scheduler.get_last_lr() == [0.0]

    # Trainer clips the global gradient norm to args.max_grad_norm (1.0)
    plain_reference(net, data, loss=lambda net, x, y: net(x, y)["loss"], clip=1.0)
    # Trainer may compute the loss and clip norm through other kernels (accelerate): a few ulps
    for p, q in zip(model.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_hf_trainer_total_steps_counts_optimizer_steps(tmp_path):
    rows = _Dataset(batches()).rows  # 48 rows: 6 batches of 8 per epoch
    trainer = hf_trainer(tmp_path, _HFRegressor(), rows, epochs=2, accumulation=2)  # 12 batches, 6 steps
    trainer.train()
    assert schedule(amos_of(trainer)) == {(6, 6)}


def test_hf_trainer_resumes_the_schedule_from_a_checkpoint(tmp_path):
    """A run stopped at step 3 and resumed from Trainer's checkpoint ends where the whole run ends:
    the optimizer's state_dict carries the schedule (total, steps taken), the stand-in scheduler
    saves nothing."""
    data = batches()
    torch.manual_seed(0)
    whole, resumed = _HFRegressor(), _HFRegressor()
    resumed.load_state_dict(whole.state_dict())
    start = {k: v.clone() for k, v in whole.state_dict().items()}
    hf_trainer(tmp_path / "whole", whole, _Dataset(data), max_steps=STEPS).train()

    first = hf_trainer(tmp_path / "run", resumed, _Dataset(data), max_steps=STEPS, save_strategy="steps", save_steps=3)
    first.train()
    resumed.load_state_dict(start)  # a fresh process: the model as built, then the checkpoint
    second = hf_trainer(tmp_path / "run", resumed, _Dataset(data), max_steps=STEPS)
    second.train(resume_from_checkpoint=os.fspath(tmp_path / "run" / "checkpoint-3"))
    assert schedule(amos_of(second)) == {(STEPS, STEPS)}
    for p, q in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
