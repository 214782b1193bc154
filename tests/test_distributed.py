"""DDP and FSDP2: 2 CPU processes with gloo, spawned by the tests.

- DDP: each rank trains on half of a global batch; the parameters after 5 steps equal single-
  process training on the whole batch, and the optimizer communicates nothing.
- FSDP2 (`fully_shard`, DTensor parameters split on dim 0): a small transformer whose shards are
  uneven (11 embedding rows, a (7, 6) feed-forward matrix, 1-D biases and norm gains of odd
  size, a (1, 6) head whose second shard is empty) trains 5 steps and matches unsharded training
  for both families and every granularity, and for four param groups that mix them (one holding
  only a frozen tensor): parameters, v and b. Each step issues exactly one all-reduce from the
  optimizer, whatever the number of groups and parameters: one flat vector of the partial
  statistics and the skip flag (the flag alone when nothing spans ranks: "amos" with "element").
- Skips: a NaN gradient on one rank's shard, a finite gradient whose S overflows only once the
  ranks' partial sums are added, and GradScaler's found_inf each skip the step on every rank and
  change nothing (params, v, b, m, step; no state made on a skipped first step), still with one
  all-reduce per step.
- DCP: a checkpoint of model + optimizer saved sharded with torch.distributed.checkpoint
  resumes to the bitwise same trajectory, and resumes an unsharded model to the same
  trajectory within fp32 tolerance.
Workers assert; a failed assertion in a worker fails the test with its traceback.
"""
import copy
import os

import pytest
import torch
import torch.distributed as dist

from amos_fused import Amos
from dist_util import all_reduces, count_all_reduces, full, spawn

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
STEPS = 5
BATCH = 8  # global batch; each rank takes BATCH // WORLD

# Sharded vs unsharded fp32: the two differ by the order of sums only (FSDP's reduce-scatter
# averages two half-batch gradients, the all-reduce adds two partial S), ~1e-7 relative per
# step. Amos normalises by sqrt(v), so relative errors in g pass through unamplified; after 5
# steps the largest parameter difference measured over all six configs is 1.2e-7 absolute
# (parameters are O(0.1-1)), under the atol 1e-6 with margin. A missing all-reduce or a local
# slice length changes S/C by a factor ~2 and fails by orders of magnitude (measured 5e-3).
TOL = dict(rtol=1e-5, atol=1e-6)

CONFIGS = [dict(schedule=s, granularity=g, **({"half_life": 3} if s == "inverse_time" else {}))
           for s in ("amos", "inverse_time") for g in ("row", "tensor", "element")]
MIXED = "mixed param groups"  # a config: the groups of `mixed_groups`
# What the FSDP2 comparisons mean: the whole-step verdict (its flag rides on one all-reduce at every
# step) and m in fp32 (TOL above); the defaults (guard="slice", bf16 m) on DTensors: test_sharded.py
EXPLICIT = dict(guard="step", momentum_dtype=None)


# ---- model, data, counting ----------------------------------------------------------------------

class Tiny(torch.nn.Module):
    """A transformer block between an embedding and a head, with odd sizes for uneven shards."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.block = torch.nn.TransformerEncoderLayer(6, 3, dim_feedforward=7, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(6, 1)
        # The key third of this bias has a gradient that is zero in exact arithmetic (softmax
        # ignores a shift shared by all keys), so its computed gradient is rounding noise whose
        # sign differs between sharded and unsharded runs, and "element" slices turn noise into
        # full-size updates. Frozen: it stays in the optimizer as a parameter without gradient.
        self.block.self_attn.in_proj_bias.requires_grad_(False)

    def forward(self, tokens):
        return self.head(self.block(self.embed(tokens))).mean(dim=(1, 2))


def mixed_groups(model):
    """Four param groups: both families, three granularities, and one group whose only tensor is
    frozen (an empty list in the step): the statistics of all of them share one all-reduce."""
    named = dict(model.named_parameters())
    frozen = "block.self_attn.in_proj_bias"
    block = [n for n in named if n.startswith("block.") and n != frozen]
    pick = lambda names: [named[n] for n in names]  # noqa: E731
    return [dict(params=pick(["embed.weight", "head.weight", "head.bias"]), granularity="element"),
            dict(params=pick([n for n in block if named[n].ndim == 2]), schedule="inverse_time", half_life=3),
            dict(params=pick([n for n in block if named[n].ndim == 1]), schedule="constant", granularity="tensor"),
            dict(params=pick([frozen]))]


def optimizer(model, cfg, **options):
    options = {**EXPLICIT, **options}
    if cfg == MIXED:
        return Amos(mixed_groups(model), **options)
    return Amos(model.parameters(), **cfg, **options)


def batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 11, (BATCH, 5), generator=gen), torch.randn(BATCH, generator=gen)


def train(model, opt, rank, steps, counts=None, start=0):
    """`steps` steps; rank None trains on the whole batch, else on this rank's half."""
    for step in range(start, start + steps):
        x, y = batch(step)
        if rank is not None:
            x, y = x[rank::WORLD], y[rank::WORLD]
        torch.nn.functional.mse_loss(model(x), y).backward()
        before = all_reduces()
        opt.step()
        if counts is not None:
            counts.append(all_reduces() - before)
        opt.zero_grad()


# ---- workers ------------------------------------------------------------------------------------

def ddp_worker(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    count_all_reduces()
    torch.manual_seed(0)
    single = Tiny()
    model = DDP(copy.deepcopy(single))
    opt, ref_opt = Amos(model.parameters()), Amos(single.parameters(), backend="reference")
    counts = []
    # DDP averages the half-batch gradients: the mean loss over the whole batch
    train(model, opt, rank, STEPS, counts)
    train(single, ref_opt, None, STEPS)
    assert counts == [0] * STEPS, f"the optimizer communicated under DDP: {counts}"
    for (name, p), q in zip(model.module.named_parameters(), single.parameters()):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m: f"DDP rank {rank}, {name}: {m}")


def fsdp_worker(rank, configs):
    from torch.distributed.fsdp import fully_shard

    count_all_reduces()
    for cfg in configs:
        torch.manual_seed(0)
        single = Tiny()
        model = copy.deepcopy(single)
        fully_shard(model.block)
        fully_shard(model)
        opt, ref_opt = optimizer(model, cfg), optimizer(single, cfg, backend="reference")
        counts = []
        train(model, opt, rank, STEPS, counts)
        train(single, ref_opt, None, STEPS)
        for (name, p), q in zip(model.named_parameters(), single.parameters()):
            where = f"FSDP2 {cfg} rank {rank}, {name} {tuple(p.shape)}"
            assert type(p).__name__ == "DTensor", where
            torch.testing.assert_close(full(p), q, **TOL, msg=lambda m: f"{where}: {m}")
            sp, sq = opt.state[p], ref_opt.state[q]
            assert sp["eta"] == pytest.approx(sq["eta"], rel=1e-12), f"{where}: eta measured on a shard"
            if not q.requires_grad:
                assert "v" not in sp and torch.equal(full(p), q), f"{where}: frozen, yet stepped"
                continue
            for key in ("v", "b"):
                torch.testing.assert_close(full(sp[key]).reshape(-1), sq[key], **TOL,
                                           msg=lambda m: f"{where}, state {key}: {m}")
        # the statistics of every group and the skip flag in one vector; the flag alone when
        # nothing spans ranks ("element" slices are local, and "amos" has no per-tensor norm)
        assert counts == [1] * STEPS, f"{cfg}: optimizer all-reduces per step {counts}, expected one each"


def snapshot(model, opt):
    """Every parameter and every state entry, gathered: what a skipped step must leave as it was."""
    return [(name, key, full(value).clone() if torch.is_tensor(value) else value)
            for name, p in model.named_parameters()
            for key, value in [("param", p)] + sorted(opt.state[p].items())]


def assert_unchanged(before, after, where):
    assert [(n, k) for n, k, _ in before] == [(n, k) for n, k, _ in after], f"{where}: state entries changed"
    for (name, key, b), (_, _, a) in zip(before, after):
        assert torch.equal(a, b) if torch.is_tensor(b) else a == b, f"{where}: {name} {key} changed"


def fsdp_edge_worker(rank):
    """A non-finite gradient on ONE rank's shard, or a sum of squares that overflows only over
    the ranks, skips the step on every rank, with or without GradScaler, in one all-reduce; bad
    set-ups raise."""
    import warnings

    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    warnings.simplefilter("ignore")  # the skip warning
    count_all_reduces()
    torch.manual_seed(0)
    model = Tiny()
    fully_shard(model.block)
    fully_shard(model)
    x, y = batch(1)

    def backward(scaler=None):
        loss = torch.nn.functional.mse_loss(model(x[rank::WORLD]), y[rank::WORLD])
        (loss if scaler is None else scaler.scale(loss)).backward()

    def skips(opt, expected_skips, where, scaler=None):
        before, calls = snapshot(model, opt), all_reduces()
        opt.step() if scaler is None else scaler.step(opt)
        where = f"rank {rank}, {where}"
        if scaler is None:
            assert all_reduces() - calls == 1, f"{where}: {all_reduces() - calls} all-reduces, expected one"
        assert opt.skipped_steps == expected_skips, f"{where}: not skipped"
        assert_unchanged(before, snapshot(model, opt), where)
        opt.zero_grad()

    # a NaN on rank 0 at the first step: no state is made on any rank ("amos" with "element":
    # nothing spans ranks, so the all-reduce carries the flag alone)
    opt = Amos(model.parameters(), granularity="element", guard="step")
    backward()
    if rank == 0:
        model.block.linear1.weight.grad.to_local()[0, 0] = float("nan")
    skips(opt, 1, "NaN at the first step")
    assert all(set(opt.state[p]) == {"eta"} for p in model.parameters()), f"rank {rank}: state made by a skip"

    # after a step, the same NaN ("tensor": the spanning sums ride in the same all-reduce)
    opt = Amos(model.parameters(), granularity="tensor", guard="step")
    train(model, opt, rank, 1)
    backward()
    if rank == 0:
        model.block.linear1.weight.grad.to_local()[0, 0] = float("nan")
    skips(opt, 1, "NaN on rank 0")

    # finite gradients whose local sums of squares are finite on each rank (4 and 3 entries of
    # linear1.bias, one slice under "tensor": 4 * 6.4e37 and 3 * 6.4e37) but overflow fp32 once
    # added (4.5e38): unsharded training skips such a step, so sharded training must too
    backward()
    model.block.linear1.bias.grad.to_local().fill_(8e18)
    skips(opt, 2, "S overflowing over the ranks")

    # GradScaler: torch's unscale check of DTensor gradients finds the inf of one rank's shard on
    # every rank, and the step reads that found_inf: all ranks skip and halve the scale together
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    backward(scaler)
    if rank == 0:
        model.block.linear1.weight.grad.to_local()[0, 0] = float("inf")
    skips(opt, 3, "GradScaler's found_inf", scaler)
    scaler.update()
    assert scaler.get_scale() == 512.0, f"rank {rank}: scale not halved"

    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (WORLD,))
    pending = DTensor.from_local(torch.randn(4, 6), mesh, [Partial()], run_check=False)
    with pytest.raises(NotImplementedError, match="Partial"):
        Amos([pending])


def dcp_worker(rank, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    from amos_fused.distributed import init_state

    def build(seed, lr):
        torch.manual_seed(seed)
        model = Tiny()
        fully_shard(model.block)
        fully_shard(model)
        return model, Amos(model.parameters(), lr=lr, schedule="amos", granularity="row")

    model, opt = build(0, torch.tensor(0.05))
    train(model, opt, rank, 2)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    train(model, opt, rank, 3, start=2)
    expected = [full(p).clone() for p in model.parameters()]

    # another init (so another measured eta) and lr: all of it must come from the checkpoint
    model, opt = build(1, torch.tensor(0.5))
    init_state(opt)  # the template DCP loads into must hold v, b, m, step (see init_state)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    train(model, opt, rank, 3, start=2)
    for (name, p), e in zip(model.named_parameters(), expected):
        assert torch.equal(full(p), e), f"rank {rank}, {name}: resumed trajectory differs"

    # the sharded checkpoint also resumes an unsharded model (DCP reshards: under "row", v and b
    # are (R,) DTensors split like the rows, plain (R,) tensors without FSDP; under "element"
    # they have the parameter's shape in FSDP2 runs, so such a checkpoint loads into FSDP2 only)
    torch.manual_seed(1)
    plain = Tiny()
    opt = Amos(plain.parameters(), lr=torch.tensor(0.5), schedule="amos", granularity="row", backend="reference")
    init_state(opt)
    msd, osd = get_state_dict(plain, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=path)
    set_state_dict(plain, opt, model_state_dict=msd, optim_state_dict=osd)
    train(plain, opt, None, 3, start=2)
    for (name, p), e in zip(plain.named_parameters(), expected):
        torch.testing.assert_close(p, e, **TOL, msg=lambda m: f"unsharded resume, rank {rank}, {name}: {m}")


# ---- tests --------------------------------------------------------------------------------------

def test_ddp_matches_single_process():
    spawn(ddp_worker)


def test_fsdp2_matches_unsharded_every_family_and_granularity():
    spawn(fsdp_worker, CONFIGS + [MIXED])


def test_fsdp2_ranks_agree_on_skips_and_bad_setups_raise():
    spawn(fsdp_edge_worker)


def test_fsdp2_dcp_checkpoint_resumes_same_trajectory(tmp_path):
    spawn(dcp_worker, os.fspath(tmp_path / "ckpt"))
