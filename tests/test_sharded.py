"""DTensor parameters on every placement against the unsharded reference, on gloo CPU workers.

The parameters of one optimizer take, together, every placement torch produces for FSDP2, HSDP,
tensor parallel and FSDP2 + TP, with uneven and empty local shards:
  2 ranks, 1-D mesh: Shard(0) (FSDP2, ColwiseParallel), Shard(1) and Shard(2) (RowwiseParallel:
    rows split across ranks), Replicate, a 1-D Shard(0) (one slice across ranks), a (1, 6) matrix
    whose second shard is empty, and a plain tensor beside the DTensors;
  4 ranks, 2x2 mesh: (Replicate, Shard(0)) (HSDP), (_StridedShard(0), Shard(0)) (FSDP2 on top of
    ColwiseParallel), (Shard(0), Shard(1)) (FSDP2 on top of RowwiseParallel), (Shard(0), Replicate),
    and Shard(0) on the 1-D submesh of the first dimension (a norm gain FSDP2 shards alone).
The gradients are the same global tensors in both runs (split like their parameters), so the two
runs differ only in the order of the sums that span ranks (partial S_r and ||u||**2 added by the
all-reduce) and in the backends' own order: the backend grid's tolerances apply
(tests/backend_grid.py: fp32 1e-5 relative; 16-bit storage 2 ulps and at most 1 % flips).
After EVERY step, params and every state entry (v, b, m, step, eta; gathered with full_tensor)
are compared, and skipped_steps. Each step counts the optimizer's all-reduces: at most one per
mesh dimension, exactly one per dimension when ranks must agree on a verdict (guard="step" or a
GradScaler), none for "amos" with element slices under guard="slice".
"""
import itertools

import pytest
import torch
import torch.distributed as dist

from amos_fused import Amos, cpp_backend
from backend_grid import SCALE, TOL, _tol, assert_close, poison
from dist_util import all_reduces, count_all_reduces, full, spawn

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
STEPS = 4

# (shape, placements) per parameter; "S0" Shard(0), "SS0" _StridedShard(0, split_factor=2),
# "R" Replicate, "dp:S0" Shard(0) on the submesh of the first mesh dimension, None a plain tensor
LAYOUTS = {
    2: [((5, 6), ("S0",)), ((7, 3), ("S1",)), ((9,), ("S0",)), ((1, 6), ("S0",)), ((2, 3, 4), ("S2",)),
        ((4, 5), ("R",)), ((3,), None)],
    4: [((5, 6), ("R", "S0")), ((10, 6), ("SS0", "S0")), ((6, 7), ("S0", "S1")), ((6,), ("S0", "R")),
        ((10,), ("SS0", "S0")), ((9,), "dp:S0"), ((1, 6), ("S0", "S1")), ((3,), ("S0", "S0"))],
}


def _configs():
    out = []
    for sched, gran, mom in itertools.product(("amos", "inverse_time"), ("row", "tensor", "element"), (0.0, 0.9)):
        out.append(dict(schedule=sched, granularity=gran, momentum=mom))
    out += [
        dict(momentum_dtype=BF16, dtype=(BF16, BF16)),
        dict(schedule="inverse_square", half_life=2, dtype=(F16, F32), momentum_dtype=F16),
        dict(schedule="constant", q=2.5, clip_value=0.05, momentum=0.5),
        dict(clip_value=0.05, scaler="finite"),
        dict(schedule="inverse_time", scaler="inf"),
        dict(guard="slice", poison=True),
        dict(guard="slice", schedule="inverse_time", granularity="tensor", momentum=0.0, poison=True),
        dict(guard="slice", schedule="constant", granularity="element", poison=True),
        dict(guard="slice", granularity="element", momentum=0.0),  # nothing to communicate at all
        dict(guard="step", poison=True),  # a NaN on one rank: every rank skips
        dict(capturable=True, guard="slice", poison=True),  # the verdict on the device: no host read
        dict(capturable=True, schedule="inverse_time", scaler="inf"),
        dict(dtype=(F64, F64), schedule="inverse_time"),  # the reference path's buckets
        dict(lr=torch.tensor(0.05), granularity="tensor"),
    ]
    for c in out:
        if c.get("schedule") in ("inverse_time", "inverse_square"):
            c.setdefault("half_life", 3)
        # what these configs mean unless they say otherwise: the whole-step verdict, m in the compute dtype
        c.setdefault("guard", "step")
        c.setdefault("momentum_dtype", None)
    out.append(dict(lr=None, total_steps=STEPS))  # the lr rule's schedule, counted by the sharded step
    out.append(DEFAULTS)
    return out


DEFAULTS = {}  # Amos(params, lr=...): guard="slice", bf16 m, the eta rule, as the unsharded default


def _fp64(config):
    return config.get("dtype", (F32,))[0] == F64


CONFIGS = _configs()


def _placements(spec, mesh):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if spec == "dp:S0":
        return mesh["dp"], [Shard(0)]
    make = {"R": Replicate, "SS0": lambda: _StridedShard(0, split_factor=2)}
    return mesh, [make[s]() if s in make else Shard(int(s[1:])) for s in spec]


def shard(full_tensor, spec, mesh):
    """`full_tensor` (the same on every rank) as a DTensor placed by `spec`, or itself (spec None)."""
    from torch.distributed.tensor import DTensor, Replicate

    if spec is None:
        return full_tensor
    sub, placements = _placements(spec, mesh)
    return DTensor.from_local(full_tensor, sub, [Replicate()] * sub.ndim, run_check=False).redistribute(
        sub, placements)


def make_full(world, config, step=None):
    """The global params (step None) or the gradients of `step`, the same on every rank."""
    gen = torch.Generator().manual_seed(7 if step is None else 100 + step)
    pd, gd = config.get("dtype", (F32, F32))
    out = []
    for shape, _ in LAYOUTS[world]:
        if step is None:
            out.append((torch.randn(shape, generator=gen) * (0.5 if len(shape) <= 1 else 0.1) + 0.01).to(pd))
        else:
            g = torch.randn(shape, generator=gen) * 0.1
            if len(shape) == 2 and shape[0] > 1:
                g[1] = 0.0  # a slice with an exactly zero gradient
            out.append(g.to(gd))
    return out


def _options(config):
    return {k: v for k, v in config.items() if k not in ("dtype", "scaler", "poison")}


def run_config(rank, world, mesh, config, backend):
    opts = _options(config)
    lr = opts.pop("lr", 0.1)
    full_params = make_full(world, config)
    plain = [p.clone() for p in full_params]
    sharded = [shard(p.clone(), spec, mesh) for p, (_, spec) in zip(full_params, LAYOUTS[world])]
    for p in plain + sharded:
        if hasattr(p, "grad_dtype"):
            p.grad_dtype = None
    ref = Amos(plain, lr=lr.clone() if torch.is_tensor(lr) else lr, backend="reference",
               **{k: v for k, v in opts.items() if k != "capturable"})
    opt = Amos(sharded, lr=lr.clone() if torch.is_tensor(lr) else lr, backend=backend, **opts)
    for step in range(STEPS):
        grads = make_full(world, config, step)
        if config.get("poison"):
            poison(grads, step)
        scaled = config.get("scaler")
        if scaled:
            for g in grads:
                g.mul_(SCALE)
            inf = scaled == "inf" and step == 2
            if inf:
                grads[2].view(-1)[0] = float("inf")
            for o in (ref, opt):
                o.grad_scale = torch.tensor(SCALE)
                o.found_inf = torch.tensor(1.0 if inf else 0.0)
        for p, q, g, (_, spec) in zip(plain, sharded, grads, LAYOUTS[world]):
            p.grad = g.clone()
            q.grad = shard(g.clone(), spec, mesh)
        ref.step()
        before = all_reduces()
        opt.step()
        count = all_reduces() - before
        _check_count(count, mesh, config)
        where = f"{world} ranks, rank {rank}, backend={backend}, {config}, step {step + 1}"
        _compare(plain, sharded, ref, opt, config, step + 1, where)
    return opt


def _check_count(count, mesh, config):
    agree = config.get("guard", "slice") == "step" or config.get("scaler")
    if agree:
        assert count == mesh.ndim, f"{config}: {count} all-reduces, expected one per mesh dimension ({mesh.ndim})"
    elif config.get("granularity") == "element" and config.get("schedule", "amos") == "amos":
        assert count == 0, f"{config}: {count} all-reduces, expected none"
    else:
        assert count <= mesh.ndim, f"{config}: {count} all-reduces, more than one per mesh dimension"


def _compare(plain, sharded, ref, opt, config, step, where):
    assert opt.skipped_steps == ref.skipped_steps, f"{where}: skipped {opt.skipped_steps} vs {ref.skipped_steps}"
    for i, (p, q) in enumerate(zip(plain, sharded)):
        at = f"{where}, tensor {i} {tuple(p.shape)} {getattr(q, 'placements', 'plain')}"
        rtol, atol = _tol(p.dtype)
        sp, sq = ref.state[p], opt.state[q]
        m = sp.get("m")
        mom = config.get("momentum", 0.9)
        if m is not None and m.dtype in (BF16, F16) and m.numel():  # backend_grid: a flipped 16-bit m moves theta
            atol = max(atol, step * mom * TOL[m.dtype][0] * m.float().abs().max().item())
        assert_close(full(q).detach(), p.detach(), (rtol, atol), f"{at}: param")
        assert sorted(sq) == sorted(sp), f"{at}: state keys {sorted(sq)} != {sorted(sp)}"
        for key, want in sp.items():
            got = sq[key]
            if key == "eta":
                assert got == pytest.approx(want, rel=1e-12), f"{at}: eta {got} vs {want}"
            elif key == "m":
                m_rtol, m_atol = _tol(want.dtype, p.dtype)
                if want.dtype in (BF16, F16) and want.numel():
                    m_atol = max(m_atol, step * mom * TOL[want.dtype][0] * want.float().abs().max().item())
                assert_close(full(got), want, (m_rtol, m_atol), f"{at}: state m")
            elif key == "step":
                assert torch.equal(got, want), f"{at}: step {got} vs {want}"
            else:
                assert_close(full(got).reshape(-1), want.reshape(-1), _tol(want.dtype), f"{at}: state {key}")


def _mesh(world):
    from torch.distributed.tensor import init_device_mesh

    return init_device_mesh("cpu", (world,)) if world == 2 else init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))


# a subset that still covers both families, every granularity, 16-bit storage, the guard,
# GradScaler and the device verdict: for the reference path (whose sharded step shares its code
# with the cpu backend's, which runs the whole grid on 2 ranks, and on 4 ranks every family x
# granularity x momentum and the subset's options) and triton (under the interpreter on CPU: slow)
SUBSET = [c for i, c in enumerate(CONFIGS) if i in (1, 8, 11, 12, 16, 17, 22)] + [DEFAULTS]


def grid_worker(rank, world, backends, configs=None):
    import warnings

    warnings.simplefilter("ignore")  # the skip and guard warnings
    count_all_reduces()
    mesh = _mesh(world)
    for backend in backends:
        for config in configs or (SUBSET + [c for c in CONFIGS if _fp64(c)] if backend == "reference" else
                                  CONFIGS if world == 2 else CONFIGS[:12] + SUBSET[3:]):
            if backend != "reference" and _fp64(config):
                continue  # fp64 runs the reference path on every backend
            run_config(rank, world, mesh, config, backend)


def fast_path_worker(rank):
    """FSDP2's common case: "amos" on matrices sharded by rows takes the one-pass kernel on the local
    shard; only the 1-D parameters (one slice across ranks) take the two-phase path."""
    count_all_reduces()
    mesh = _mesh(2)
    opt = run_config(rank, 2, mesh, dict(guard="slice"), "cpu")
    plan = opt._sharded
    two_phase = [plan.params[i] for bk in plan.buckets for i in bk.entries]
    assert all(p.ndim <= 1 or p.placements[0].dim != 0 for p in two_phase if hasattr(p, "placements")), \
        f"rank {rank}: a dim-0 sharded matrix took the two-phase path"
    assert [tuple(p.shape) for p in two_phase] == [(7, 3), (9,), (2, 3, 4)], [tuple(p.shape) for p in two_phase]
    # a copy leaves the plan (it holds process groups) behind and makes its own at its first step
    import copy

    twin = copy.deepcopy(opt)
    assert twin._sharded is None and twin.guard == "slice"
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for p, (_, spec) in zip(twin_params, LAYOUTS[2]):
        p.grad = shard(torch.ones(p.shape), spec, mesh)
    twin.step()
    assert all(torch.equal(full(opt.state[q]["step"]), torch.tensor(float(STEPS))) for q in plan.params)


BACKENDS = ["reference"] + (["cpu"] if cpp_backend.unavailable("cpu") is None else [])


def edits_worker(rank):
    """What the sharded step keeps between steps (local views of the state, the op's lists) follows
    state entries replaced by hand and a plain parameter turned fp64 in place, as plain tensors do."""
    count_all_reduces()
    mesh = _mesh(2)
    config = dict(guard="slice")
    opt = run_config(rank, 2, mesh, config, "cpu")
    ref = Amos([q.full_tensor().clone() if hasattr(q, "full_tensor") else q.detach().clone() for q in
                [p for g in opt.param_groups for p in g["params"]]], lr=0.1, backend="reference")
    plain, sharded = ref.param_groups[0]["params"], opt.param_groups[0]["params"]
    for p, q in zip(plain, sharded):  # the same state as the sharded run's, gathered
        ref.state[p] = {k: (full(v).clone() if torch.is_tensor(v) else v) for k, v in opt.state[q].items()}
    for o, params in ((ref, plain), (opt, sharded)):
        for p in params:
            st = o.state[p]
            st["step"] = st["step"] + 10  # new tensors and values in the same state dicts
            st["b"] = st["b"] * 0.5
            st["eta"] = st["eta"] * 2
        params[-1].data = params[-1].data.double()  # the plain parameter beside the DTensors
        params[-1].grad_dtype = None  # its gradient stays fp32
    for step in range(STEPS, STEPS + 2):
        grads = make_full(2, config, step)
        for p, q, g, (_, spec) in zip(plain, sharded, grads, LAYOUTS[2]):
            p.grad = g.clone()
            q.grad = shard(g.clone(), spec, mesh)
        ref.step()
        opt.step()
        _compare(plain, sharded, ref, opt, config, step + 1, f"rank {rank}, after the edits, step {step + 1}")


def _triton_runs():
    try:
        import amos_fused.triton_backend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _triton_runs(), reason="triton is not importable")
def test_every_placement_matches_the_unsharded_reference_triton():
    # 2 ranks: the kernels see local parts and slice counts only (placements are the shared
    # code's business, which the 4-rank grid covers); every path (one-pass, two-phase) runs, and
    # the verdict's paths (GradScaler, capturable) are the shared code's too
    spawn(grid_worker, 2, ["triton"], SUBSET[:4] + SUBSET[5:6], world=2)


@pytest.mark.parametrize("world", [2, 4])
def test_every_placement_matches_the_unsharded_reference(world):
    spawn(grid_worker, world, BACKENDS, world=world)


@pytest.mark.skipif(cpp_backend.unavailable("cpu") is not None, reason="the cpu backend is not built")
def test_rows_whole_on_their_rank_take_the_one_pass_kernel():
    spawn(fast_path_worker)


def test_the_sharded_step_follows_state_entries_replaced_and_a_dtype_changed():
    spawn(edits_worker)


def sabotage_worker(rank):
    """The comparison has teeth: without the all-reduce's sums, the sharded run must fail it."""
    count_all_reduces()
    mesh = _mesh(2)
    original = dist.all_reduce
    # the collective runs (on a copy), the statistics stay as they were: partial
    dist.all_reduce = lambda tensor, *args, **kwargs: original(tensor.clone(), *args, **kwargs)
    try:
        with pytest.raises(AssertionError, match="param|state"):
            run_config(rank, 2, mesh, dict(guard="slice"), BACKENDS[-1])
    finally:
        dist.all_reduce = original


def test_the_comparison_catches_sums_left_partial():
    spawn(sabotage_worker)


# ---- checkpoints ---------------------------------------------------------------------------------

DCP_CONFIGS = [dict(momentum=0.9), dict(schedule="inverse_time", half_life=3, granularity="element"),
               dict(granularity="tensor", momentum_dtype=BF16)]


def _module(world, mesh, seed, config):
    """The layout's parameters, sharded, in a module (DCP names state by parameter name)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Module()
    for k, (shape, spec) in enumerate(LAYOUTS[world]):
        full_value = torch.randn(shape, generator=gen) * 0.1 + 0.01
        model.register_parameter(f"p{k}", torch.nn.Parameter(shard(full_value, spec, mesh)))
    return model, Amos(model.parameters(), lr=torch.tensor(0.05), **config)


def _train(world, mesh, model, opt, steps, start):
    for step in range(start, start + steps):
        for p, g, (_, spec) in zip(model.parameters(), make_full(world, {}, step), LAYOUTS[world]):
            p.grad = shard(g, spec, mesh)
        opt.step()


def dcp_worker(rank, world, path):
    """Save after 2 steps, go on 2 steps; a fresh model and optimizer (another initialisation, so
    another measured eta, and another lr) loaded from the checkpoint go on the same 2 steps: every
    parameter bit for bit the same."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from amos_fused.distributed import init_state

    mesh = _mesh(world)
    for k, config in enumerate(DCP_CONFIGS):
        where = f"{world} ranks, rank {rank}, {config}"
        ckpt = f"{path}/{k}"
        model, opt = _module(world, mesh, 0, config)
        _train(world, mesh, model, opt, 2, 0)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
        _train(world, mesh, model, opt, 2, 2)
        expected = [full(p).clone() for p in model.parameters()]

        model, opt = _module(world, mesh, 1, config)
        opt.param_groups[0]["lr"] = torch.tensor(0.5)
        init_state(opt)  # the template DCP loads into must hold v, b, m, step
        msd, osd = get_state_dict(model, opt)
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=ckpt)
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
        _train(world, mesh, model, opt, 2, 2)
        for i, (p, e) in enumerate(zip(model.parameters(), expected)):
            assert torch.equal(full(p), e), f"{where}: parameter {i} {tuple(p.shape)} differs after the resume"


@pytest.mark.parametrize("world", [2, 4])
def test_dcp_checkpoint_of_every_placement_resumes_bit_for_bit(world, tmp_path):
    spawn(dcp_worker, world, str(tmp_path), world=world)
