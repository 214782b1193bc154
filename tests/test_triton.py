"""backend="triton" against the reference path, and its own properties.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1 before anything imports them); with one, the same tests run compiled on CUDA.
Tolerances are the shared grid's (tests/backend_grid.py argues them); the tests here that compare
triton with itself are bitwise.
"""
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import backend_grid as grid  # noqa: E402
from amos_fused import Amos, backends, triton_backend  # noqa: E402
from amos_fused.kernels import amos_triton, tables  # noqa: E402

DEVICE = grid.DEVICE
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("case", grid.CASES)
def test_matches_reference(case):
    grid.assert_matches_reference("triton", case)


# Tiny blocks push small tensors through every code path: column-block loops (C > max_colb),
# packed programs mixing tensors, split slices with several chunks (and more chunks than one
# finalize block holds), and several tensors per norm program.
TINY = tables.Heuristic(tile=64, max_colb=16, long_row=40, chunk=16, block=8, norm_tensors=2, num_warps=4)
TINY_SHAPES = [(3, 50), (130,), (2, 41), (5,), (4, 3, 3, 3), (), (2, 17), (1, 1), (0, 3), (9, 2)]


@pytest.mark.parametrize("options", [
    dict(schedule="amos", momentum=0.9, granularity="row", clip_value=0.05),  # loops, packing, split (130,)
    dict(schedule="inverse_square", half_life=2, momentum=0.0, granularity="row"),  # the same, closed form
    dict(schedule="constant", momentum=0.9, granularity="element"),  # C = 1: packing only
], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_every_kernel_path_with_tiny_blocks(monkeypatch, options):
    # 3 steps (not the grid's 5): tiny blocks mean many interpreted programs; the grid covers length
    monkeypatch.setattr(triton_backend, "HEURISTIC", TINY)
    case = dict(shapes=TINY_SHAPES, options=options, dtypes=(grid.F32, grid.BF16), scaler=None, steps=3, tag="tiny")
    grid.assert_matches_reference("triton", case)


@pytest.mark.parametrize("options", [
    dict(schedule="amos", momentum=0.9, granularity="row"),
    dict(schedule="inverse_time", half_life=2, momentum=0.0, granularity="row"),
], ids=lambda o: o["schedule"])
def test_guarded_slices_on_every_kernel_path_with_tiny_blocks(monkeypatch, options):
    # poisoned at the 2nd and 4th step (backend_grid.poison): split slices carry the guard from
    # their finalize to their chunk applies, packed programs guard rows of several tensors
    monkeypatch.setattr(triton_backend, "HEURISTIC", TINY)
    case = dict(shapes=TINY_SHAPES, options=dict(options, guard="slice"), dtypes=(grid.F32, grid.BF16), scaler=None,
                steps=4, tag="tiny-guard", poison=True)
    grid.assert_matches_reference("triton", case)


def test_tiny_heuristic_really_splits_and_packs():
    # guards the test above: with TINY the plan has packed tiles, loops and split slices
    params = [torch.zeros(s) for s in TINY_SHAPES if math.prod(s)]
    states = [dict(v=torch.zeros(s[0] if len(s) >= 2 else 1), b=torch.zeros(1), step=torch.zeros(()), eta=0.5)
              for s in (p.shape for p in params)]
    plan = tables.Plan(params, params, states, closed=True, heuristic=TINY, momentum=False)
    assert plan.chunk_tiles[1] > 0 and plan.kb > 1  # split slices, several chunks per slice
    assert any(not one_block for _, _, one_block, *_ in plan.buckets)
    assert any(packed for _, _, _, packed, *_ in plan.buckets) and any(not b[3] for b in plan.buckets)
    assert plan.norm_tb < plan.n


def test_vector_launches_only_for_aligned_rows_and_gradients():
    """VEC4 promises the compiler that p, g and m rows start on 4 elements: a misaligned tensor
    (a view one element into a buffer, or rows of 4k+2 elements) goes to a plain launch; gradients
    enter the plan's key by their alignment, so a misaligned one gets a plan of its own in which
    only its tensor leaves the vector launch."""
    buf = torch.zeros(1 + 8 * 12)
    params = [torch.zeros(8, 12), buf[1:].view(8, 12), torch.zeros(8, 10), torch.zeros(8, 12), torch.zeros(2, 48)]
    states = [dict(v=torch.zeros(p.shape[0]), b=torch.zeros(p.shape[0]), step=torch.zeros(()), eta=0.5,
                   m=torch.zeros(p.shape)) for p in params]
    states[3]["m"] = torch.zeros(1 + 96)[1:].view(8, 12)  # theta aligned, m not
    grads = [torch.zeros_like(p) for p in params]

    def vector_tensors(plan):  # the tensors of the VEC4 launches
        return sorted({int(t) for b in plan.buckets if b[8] for t in b[4].view(-1, 4)[:, 0]})

    def plan_for(grads):
        return tables.get_plan(params, grads, states, closed=False, heuristic=TINY, momentum=True)
    plan = plan_for(grads)
    assert vector_tensors(plan) == [0] and plan.chunk_vec  # rows of 48 > TINY.long_row: chunk launches
    assert plan_for([torch.zeros_like(p) for p in params]) is plan  # moved, still aligned: the same plan
    misaligned = torch.zeros(1 + 96)[1:].view(8, 12)
    other = plan_for([misaligned] + grads[1:])
    assert other is not plan and vector_tensors(other) == [] and other.chunk_vec
    other = plan_for(grads[:4] + [torch.zeros(1 + 96)[1:].view(2, 48)])
    assert vector_tensors(other) == [0] and not other.chunk_vec
    states[4]["m"] = torch.zeros(1 + 96)[1:].view(2, 48)
    assert not plan_for(grads).chunk_vec


@pytest.mark.parametrize("schedule", ["amos", "inverse_time"])
def test_misaligned_views_beside_aligned_tensors_match_the_reference(monkeypatch, schedule):
    """Parameters, gradients and momentum one element into their buffers (rows of 12 and of 48,
    so C % 4 == 0 and only the start is off) beside aligned ones: the plan must launch them
    without VEC4 (on a GPU a wrong promise is a misaligned vector access) and every tensor must
    follow the reference. TINY splits the rows of 48 (chunk launches) and packs remainders."""
    monkeypatch.setattr(triton_backend, "HEURISTIC", TINY)
    gen = torch.Generator().manual_seed(3)

    def at_offset(x, off):  # x's values in a tensor `off` elements into a fresh buffer
        buf = torch.zeros(x.numel() + off, device=DEVICE)
        out = buf[off:].view(x.shape)
        out.copy_(x)
        return out

    shapes = [(8, 12), (8, 12), (8, 12), (8, 12), (2, 48), (2, 48), (2, 48)]
    p_off, g_off, m_off = [0, 1, 0, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0, 1], [0, 0, 0, 1, 1, 0, 0]
    init = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    runs = {}
    for backend in ("triton", "reference"):
        params = [torch.nn.Parameter(at_offset(x.to(DEVICE), o)) for x, o in zip(init, p_off)]
        assert [p.data_ptr() % 16 != 0 for p in params] == [bool(o) for o in p_off]
        opt = Amos(params, lr=0.1, backend=backend, schedule=schedule, momentum=0.9, momentum_dtype=torch.float32,
                   half_life=None if schedule == "amos" else 3)  # fp32 m: at_offset's buffers
        for step in range(4):
            gens = torch.Generator().manual_seed(100 + step)
            for p, s, o in zip(params, shapes, g_off):
                p.grad = at_offset(torch.randn(s, generator=gens).to(DEVICE) * 0.05, o)
            opt.step()
            if step == 0:  # momentum exists now: move the chosen ones off alignment
                for p, o in zip(params, m_off):
                    if o:
                        opt.state[p]["m"] = at_offset(opt.state[p]["m"], o)
        runs[backend] = ([p.detach().cpu() for p in params], [opt.state[p]["m"].cpu() for p in params])
        if backend == "triton":  # the last plan used: aligned and misaligned launches side by side
            plan = next(reversed(tables._PLANS.entries.values()))
            vec = [b[8] for b in plan.buckets]
            assert any(vec) and not all(vec) and not plan.chunk_vec
    rtol, atol = grid.TOL[grid.F32]
    for name, got, want in (("param", runs["triton"][0], runs["reference"][0]), ("m", runs["triton"][1], runs["reference"][1])):
        for k, (a, e) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=f"{name} {k} ({shapes[k]})")


def test_bitwise_deterministic():
    case = next(c.values[0] for c in grid.CASES if c.id == "tensor-inverse_time-m0.9")
    first, second = grid.run("triton", case), grid.run("triton", case)
    for (p1, s1), (p2, s2) in zip(first, second):
        assert all(torch.equal(a, b) for a, b in zip(p1, p2))
        for a, b in zip(s1, s2):
            assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_plan_is_built_once_and_reused(monkeypatch):
    built = []

    class CountingPlan(tables.Plan):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tables, "Plan", CountingPlan)
    tables.clear_cache()
    params = [torch.randn(4, 5, device=DEVICE), torch.randn(7, device=DEVICE)]
    opt = Amos(params, backend="triton")
    g_tables = []
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)  # new gradient tensors each step, as zero_grad(set_to_none=True)
        opt.step()
        plan = next(iter(tables._PLANS.entries.values()))
        g_tables.append(next(reversed(plan.g_tables.entries)))  # the last table used
    assert len(built) == 1, "the plan must be cached while the parameters are the same tensors"
    assert g_tables[-1] == tuple(p.grad.data_ptr() for p in params), "gradient addresses must follow the grads"
    opt.add_param_group({"params": [torch.randn(3, device=DEVICE, requires_grad=True)]})
    opt.param_groups[1]["params"][0].grad = torch.ones(3, device=DEVICE)
    opt.step()
    assert len(built) == 2  # a new group: a new plan; the first group's plan is still cached
    assert len(tables._PLANS.entries) == 2


def test_fp64_and_non_contiguous_params_use_the_reference_path():
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(4, 3, generator=gen).t(),
            torch.randn(5, generator=gen)]
    final = {}
    for backend in ("triton", "reference"):
        params = [p.clone().to(DEVICE) for p in base]  # clone and .to keep the transposed strides
        assert not params[1].is_contiguous()
        opt = Amos(params, backend=backend, momentum=0.9)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(DEVICE)
            opt.step()
        final[backend] = params
    assert torch.equal(final["triton"][0], final["reference"][0])  # fp64: the reference itself
    assert torch.equal(final["triton"][1], final["reference"][1])  # non-contiguous: likewise
    torch.testing.assert_close(final["triton"][2], final["reference"][2], rtol=1e-5, atol=1e-7)  # kernels


def test_trains_the_main_jobs_model_like_the_reference():
    sys.path.insert(0, str(BENCH))
    try:
        from lm_model import ByteLM
    finally:
        sys.path.remove(str(BENCH))
    data = torch.tensor(list(Path(__file__).read_bytes()[:4096]), dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data) - 17, (4, 4), generator=gen)
    losses = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = ByteLM(layers=1, width=32, heads=2, context=16).to(DEVICE)
        opt = Amos(model.parameters(), backend=backend)  # the defaults: amos, momentum 0.9 (bf16 m), row, guard "slice"
        losses[backend] = []
        for s in starts:
            x = torch.stack([data[i:i + 16] for i in s.tolist()]).to(DEVICE)
            y = torch.stack([data[i + 1:i + 17] for i in s.tolist()]).to(DEVICE)
            loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[backend].append(loss.item())
    # the first loss is before any update (identical); the next 3 follow the first 3 steps
    for ref, tri in zip(losses["reference"], losses["triton"]):
        assert abs(tri - ref) <= 1e-5 * abs(ref), losses


def test_explicit_triton_raises_where_it_cannot_run(monkeypatch):
    p = torch.zeros(3)
    monkeypatch.setattr(amos_triton, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        Amos([p], backend="triton")
    monkeypatch.setattr(amos_triton, "INTERPRET", True)
    fn, why = backends._BACKENDS["triton"](torch.device("cuda"))
    assert fn is None and "interpreter cannot run on CUDA tensors" in why
    fn, why = backends._BACKENDS["triton"](torch.device("meta"))
    assert fn is None and "not meta" in why
    monkeypatch.setitem(sys.modules, "amos_fused.triton_backend", None)  # as if triton were missing
    monkeypatch.delattr("amos_fused.triton_backend", raising=False)
    with pytest.raises(RuntimeError, match="triton is not importable"):
        Amos([p], backend="triton")
    assert backends.resolve("auto", torch.device("cpu")) is not None  # auto still falls back


def test_tables_match_the_kernels_layout():
    assert (tables.NINFO, tables.NFINFO) == (amos_triton.NINFO.value, amos_triton.NFINFO.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_step_is_cuda_graph_capturable():
    torch.manual_seed(0)
    shapes = [(64, 33), (100,), (3, 5, 7)]
    group = dict(lr=torch.tensor(0.05, device="cuda"), schedule="inverse_time", half_life=10.0, q=1.0, beta=0.999,
                 momentum=0.9, momentum_dtype=None, clip_value=0.5, d_coef=0.25, c_coef=0.25, extra_l2=0.0,
                 eps=2.0**-125, eta=None, granularity="row")

    def setup():
        params = [torch.randn(s, device="cuda") for s in shapes]
        grads = [torch.zeros_like(p) for p in params]
        states = [dict(v=torch.zeros(s[0] if len(s) >= 2 else 1, device="cuda"),
                       b=torch.zeros(s[0] if len(s) >= 2 else 1, device="cuda"),
                       m=torch.zeros_like(p), step=torch.zeros((), device="cuda"), eta=0.5) for s, p in zip(shapes, params)]
        return params, grads, states

    def step(params, grads, states):
        for st in states:
            st["step"] += 1
        triton_backend.triton_step(params, grads, states, group, None)

    eager, graphed = setup(), setup()
    for (pe, pg) in zip(eager[0], graphed[0]):
        pg.copy_(pe)
    gen = torch.Generator(device="cuda").manual_seed(1)
    step(*graphed)  # warm-up: compiles and builds the plan outside the capture
    step(*eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(*graphed)
    for _ in range(4):
        g = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
        for dst_e, dst_g, src in zip(eager[1], graphed[1], g):
            dst_e.copy_(src)
            dst_g.copy_(src)
        step(*eager)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager[0] + [s["m"] for s in eager[2]], graphed[0] + [s["m"] for s in graphed[2]]):
        assert torch.equal(a, b)


_COMPILE_SCRIPT = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from amos_fused.kernels import amos_triton as mod
assert not mod.INTERPRET
pointers = {"info": "*i64", "g_addrs": "*i64", "tiles": "*i64", "slot_i": "*i64", "slot_r": "*i64",
            "n_tensors": "i64", "guarded_ptr": "*i64"}
guard = dict(HAS_SKIP=True, HAS_GUARD=True)  # the skip read and the int64 atomic of guarded slices
variants = [
    (mod._rows_kernel, dict(P_DTYPE=tl.bfloat16, G_DTYPE=tl.float16, M_DTYPE=tl.bfloat16, SCHED=0, PHASE=0,
                            MOMENTUM=True, HAS_SCALE=True, CLIP=True, LR_IS_PTR=True, ROWS=4, COLB=1024,
                            ONE_BLOCK=False, PACKED=False, RTNE=False, VEC4=True, **guard)),
    (mod._rows_kernel, dict(P_DTYPE=tl.float32, G_DTYPE=tl.float32, M_DTYPE=tl.float32, SCHED=0, PHASE=0,
                            MOMENTUM=True, HAS_SCALE=False, CLIP=False, LR_IS_PTR=False, ROWS=4, COLB=1024,
                            ONE_BLOCK=False, PACKED=False, RTNE=False, VEC4=True, **guard)),
    (mod._rows_kernel, dict(P_DTYPE=tl.float32, G_DTYPE=tl.float32, M_DTYPE=tl.float32, SCHED=2, PHASE=2,
                            MOMENTUM=False, HAS_SCALE=False, CLIP=False, LR_IS_PTR=False, ROWS=2, COLB=2048,
                            ONE_BLOCK=True, PACKED=False, RTNE=False, VEC4=True, **guard)),
    (mod._rows_kernel, dict(P_DTYPE=tl.float32, G_DTYPE=tl.float32, M_DTYPE=tl.float32, SCHED=2, PHASE=2,
                            MOMENTUM=False, HAS_SCALE=False, CLIP=False, LR_IS_PTR=False, ROWS=4096, COLB=1,
                            ONE_BLOCK=True, PACKED=True, RTNE=False, VEC4=False, **guard)),
    (mod._chunk_kernel, dict(P_DTYPE=tl.float32, G_DTYPE=tl.bfloat16, M_DTYPE=tl.float16, SCHED=3, PHASE=2,
                             MOMENTUM=True, HAS_SCALE=True, HAS_SKIP=True, CLIP=True, LR_IS_PTR=False, CHUNK=16384,
                             BLOCK=2048, RTNE=False, VEC4=True)),
    (mod._split_finalize_kernel, dict(SCHED=0, LR_IS_PTR=True, ROWS=2, KB=4, **guard)),
    (mod._norm_kernel, dict(SCHED=1, LR_IS_PTR=False, TB=8, QB=512)),
]
scalars = {"lr", "beta", "beta_lo", "one_minus_beta", "eps", "c_coef", "d_coef", "extra_l2", "two_q",
           "half_life", "momentum", "one_minus_momentum", "clip"}
for fn, constexprs in variants:
    missing = [n for n in fn.arg_names if n.isupper() and n not in constexprs]
    assert not missing, (fn.__name__, "constexprs not set:", missing)
    signature = {n: "constexpr" if n in constexprs else "fp32" if n in scalars else pointers.get(n, "*fp32")
                 for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert "cubin" in compiled.asm, fn.__name__
    ptx = compiled.asm["ptx"]
    assert ptx.count("st.local") == 0, fn.__name__ + " spills registers"
    if constexprs.get("VEC4"):  # the alignment hints reach the compiler: 4 elements per load and store
        wide = ".v4.b32" if constexprs["P_DTYPE"] == tl.float32 else ".v2.b32"
        assert "ld.global" + wide in ptx and "st.global" + wide in ptx, (fn.__name__, "not vectorised")
    print("compiled", fn.__name__)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter accepts code the compiler rejects (e.g. a global that is not constexpr).
    # Compiling to a cubin for sm_90 (H100/H200) needs no GPU, only triton's bundled ptxas; it
    # runs in a fresh process because triton.language's own jit functions are fixed as
    # interpreted when triton is imported under TRITON_INTERPRET=1.
    import os
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("compiled") == 7


_FINALIZE_SCRIPT = r"""
import os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from amos_fused.kernels import amos_triton as mod
assert not mod.INTERPRET
rows, kb = int(sys.argv[1]), int(sys.argv[2])
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
fn = mod._split_finalize_kernel
types = {"info": "*i64", "tiles": "*i64", "guarded_ptr": "*i64"}
scalars = {"lr", "beta", "beta_lo", "one_minus_beta", "eps", "c_coef", "d_coef", "extra_l2", "half_life"}
for sched in (0, 2):  # amos, and a closed form
    constexprs = dict(SCHED=sched, LR_IS_PTR=True, HAS_SKIP=True, HAS_GUARD=True, ROWS=rows, KB=kb)
    signature = {n: "constexpr" if n in constexprs else "fp32" if n in scalars else types.get(n, "*fp32")
                 for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    arch = re.search(r"\.target\s+(\S+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "k.ptx"), "w").write(ptx)
        out = subprocess.run([ptxas, "-arch=" + arch, "-v", os.path.join(d, "k.ptx"), "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    print("finalize", sched, regs, spills)
"""


def test_split_finalize_fits_in_registers_on_sm90():
    """The plan of a 1-D tensor of 8M elements (512 chunks in one slice) beside a wide matrix (64
    split rows) once gave the finalize 64 x 512 partials per program: 10 KB of spills per thread
    on sm_90. The plan bounds ROWS x KB by `final_tile`; ptxas (bundled with triton, no GPU
    needed) must then report no spills and at most 128 registers."""
    import os
    import re
    import subprocess

    h = tables.COMPILED
    params = [torch.empty(512 * h.chunk), torch.empty(64, 2 * h.long_row)]
    states = [dict(v=torch.zeros(R), b=torch.zeros(R), step=torch.zeros(()), eta=0.5) for R in (1, 64)]
    plan = tables.Plan(params, params, states, closed=False, heuristic=h, momentum=False)
    assert plan.kb == 512 and plan.final_rows * plan.kb <= h.final_tile
    ptxas = Path(triton_backend.K.triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"no ptxas bundled with triton at {ptxas}")
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", _FINALIZE_SCRIPT, str(plan.final_rows), str(plan.kb)],
                         capture_output=True, text=True, env=env, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    found = re.findall(r"finalize (\d) (\d+) (\d+)", res.stdout)
    assert len(found) == 2, res.stdout
    for sched, regs, spills in found:
        assert int(spills) == 0 and int(regs) <= 128, (f"finalize (schedule code {sched}, ROWS={plan.final_rows}, "
                                                       f"KB={plan.kb}): {regs} registers, {spills} bytes spilled")
