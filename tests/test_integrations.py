"""The plug-in examples of examples/ (docs/integrations.md), each run here.

- plain loop: runs in CI; Amos with a tensor lr and a warm-up scheduler learns a teacher.
- Lightning `configure_optimizers` and HF `Trainer(optimizers=(opt, sched))`: `lightning` and
  `transformers` are in requirements.txt (the test environment), not dependencies of the package;
  skipped where they are absent. Each must train with OUR optimizer and scheduler: the
  parameters equal a plain loop over the same batches.
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
WARMUP = 20  # the examples' warm-up length


def batches(n=STEPS, size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 1, generator=gen)
    xs = [torch.randn(size, 16, generator=gen) for _ in range(n)]
    return [(x, torch.tanh(x @ teacher)) for x in xs]


def plain_reference(net, data):
    """What the framework examples must do: Amos at its defaults + the warm-up, one step per batch."""
    opt = Amos(net.parameters())
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / WARMUP))
    for x, y in data:
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        warmup.step()
    return opt


def test_plain_loop_learns():
    import plain_loop

    model, opt, losses = plain_loop.train(steps=100)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # measured: ~0.9 -> ~0.15 over 100 steps; an optimizer that does not learn stays near 0.9
    assert last < 0.4 * first, f"loss {first:.3f} -> {last:.3f}"
    assert opt.state[model[0].weight]["step"].item() == 100
    assert opt.param_groups[0]["lr"].item() == pytest.approx(0.1)  # the warm-up reached 1


def test_lightning_configure_optimizers():
    pytest.importorskip("lightning")
    import lightning_module

    data = batches()
    torch.manual_seed(0)
    model, trainer = lightning_module.fit(torch.utils.data.DataLoader(data, batch_size=None), STEPS)
    opt = trainer.optimizers[0]
    assert isinstance(opt, Amos) and opt.state[model.net[0].weight]["step"].item() == STEPS
    torch.manual_seed(0)
    net = lightning_module.Regressor().net
    plain_reference(net, data)
    for p, q in zip(model.net.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # same ops in the same order: bitwise


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


def test_hf_trainer_optimizers(tmp_path):
    import_beside_kernels("transformers")
    pytest.importorskip("accelerate")
    import hf_trainer

    data = batches()
    torch.manual_seed(0)
    model = _HFRegressor()
    net = _HFRegressor()
    net.load_state_dict(model.state_dict())
    trainer = hf_trainer.make_trainer(model, _Dataset(data), os.fspath(tmp_path), STEPS)
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, Amos) and opt.state[model.net[0].weight]["step"].item() == STEPS

    # Trainer clips the global gradient norm to args.max_grad_norm (1.0) before each step
    ref = Amos(net.parameters())
    warmup = torch.optim.lr_scheduler.LambdaLR(ref, lambda k: min(1.0, (k + 1) / WARMUP))
    for x, y in data:
        net(x, y)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        ref.step()
        ref.zero_grad()
        warmup.step()
    # Trainer may compute the loss and clip norm through other kernels (accelerate): a few ulps
    for p, q in zip(model.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
