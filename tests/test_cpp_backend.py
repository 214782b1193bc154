"""backend="cpu" (the compiled extension amos_fused._C) against the reference, and the op's contract."""
import os

import pytest
import torch

import backend_grid as grid
from amos_fused import Amos, backends, cpp_backend
from amos_fused.reference import reference_step

pytestmark = pytest.mark.skipif(cpp_backend.unavailable("cpu") is not None,
                                reason=f"amos_fused._C: {cpp_backend.unavailable('cpu')}")


def test_extension_imports_and_auto_picks_it_on_cpu():
    from amos_fused import _C

    assert _C.with_cuda in (0, 1)
    assert hasattr(torch.ops.amos_fused, "amos_step_")
    assert backends.resolve("auto", torch.device("cpu")) is cpp_backend.fused_step


@pytest.mark.parametrize("case", grid.CASES)
def test_matches_reference(case):
    grid.assert_matches_reference("cpu", case, device="cpu")


# Big enough for many pieces, long rows split into blocks (C > 65536) and every reduction path.
DET_SHAPES = [(300, 200), (3, 70000), (140000,), (1000, 1), (7,)]


@pytest.mark.parametrize("options", [
    dict(schedule="amos", momentum=0.9),
    dict(schedule="inverse_time", half_life=3, momentum=0.0),
    dict(schedule="amos", granularity="tensor", momentum=0.0),
    dict(schedule="constant", granularity="element", momentum=0.9, momentum_dtype=torch.bfloat16),
], ids=["amos-row", "closed-row", "amos-tensor", "closed-element"])
def test_bitwise_deterministic_across_runs_and_thread_counts(options):
    # a fixed eta: the default one is measured by torch reductions whose order follows the thread count
    case = dict(shapes=DET_SHAPES, options=dict(options, eta=0.1), dtypes=(torch.float32, torch.float32), scaler=None, steps=3)
    threads = torch.get_num_threads()
    try:
        runs = []
        # the same result whatever the split: more threads than cores are preempted, so pieces
        # move between threads (csrc/pieces.h)
        for n in (1, 2, 3, 5, 1):
            torch.set_num_threads(n)
            runs.append(grid.run("cpu", case, device="cpu"))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for (p0, s0), (p1, s1) in zip(runs[0], other):
            assert all(torch.equal(a, b) for a, b in zip(p0, p1)), "params differ between runs"
            for a, b in zip(s0, s1):
                assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_fp64_and_noncontiguous_params_take_the_reference_path_bitwise():
    shapes_dtypes = [((4, 6), torch.float64), ((6, 4), torch.float32), ((5,), torch.float32)]

    def make():
        gen = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=gen, dtype=d) for s, d in shapes_dtypes]
        ps[1] = ps[1].t().contiguous().t()  # same values, not contiguous
        assert not ps[1].is_contiguous()
        return ps

    got, want = make(), make()
    for ps, be in ((got, "cpu"), (want, "reference")):
        opt = Amos(ps, lr=0.1, backend=be)
        for step in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step), dtype=p.dtype)
            opt.step()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # both on the reference path
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-7)  # kernels: reduction order differs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_backend_without_gpu_raises_clearly():
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run.*(no CUDA device|without its CUDA kernels)"):
        Amos([torch.zeros(3, requires_grad=True)], lr=0.1, backend="cuda")


def _op_args(n=3, momentum=0.9):
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(4, 5, generator=gen) for _ in range(n)]
    grads = [torch.randn(4, 5, generator=gen) for _ in range(n)]
    grads[-1][2, 3] = float("nan")  # a guarded row: the op mutates its `guarded` counter too
    vs = [torch.zeros(4) for _ in range(n)]
    bs = [torch.zeros(4) for _ in range(n)]
    ms = [torch.zeros(4, 5) for _ in range(n)] if momentum else []
    steps = [torch.ones(()) for _ in range(n)]
    return (params, grads, vs, bs, ms, steps, [0.3] * n, 0.1, None, torch.tensor(2.0), torch.zeros(()),
            torch.zeros((), dtype=torch.int64), cpp_backend.SCHEDULE_CODE["amos"], 0.999, 2.0**-125, momentum, 0.5, 0.25, 0.25, 0.0, 1.0, 0.0)


def test_op_passes_torch_library_opcheck():
    # schema (mutations declared), fake implementation, and tracing through AOT dispatch
    torch.library.opcheck(torch.ops.amos_fused.amos_step_.default, _op_args())


def test_op_traces_under_torch_compile_fullgraph():
    eager, compiled = _op_args(), _op_args()
    options = eager[6:]  # floats, ints, the grad_scale, skip and guarded tensors: the same for both calls

    def step(params, grads, vs, bs, ms, steps):
        torch.ops.amos_fused.amos_step_(params, grads, vs, bs, ms, steps, *options)
        return params[0].sum()

    torch._dynamo.reset()
    fn = torch.compile(step, fullgraph=True, backend="aot_eager")  # fake-tensor tracing, no codegen
    want = step(*eager[:6])
    got = fn(*compiled[:6])
    assert torch.equal(got, want)
    for a, b in zip(eager[:5], compiled[:5]):  # the mutations of params, v, b, m survive functionalization
        assert all(torch.allclose(x, y, rtol=0, atol=0, equal_nan=True) for x, y in zip(a, b))
    assert int(options[5]) == 2, "the guarded row, counted by the eager and the compiled call"


def test_add_one_advances_cpu_counters_like_an_in_place_add():
    """The CPU step counters' op: +1 on each (other dtypes through the general add), the version
    bumped as by add_(1), and it passes opcheck (mutation declared, fake implementation)."""
    steps = [torch.full((), float(k)) for k in range(5)] + [torch.zeros((), dtype=torch.float64), torch.zeros(1)]
    want = [s + 1 for s in steps]
    versions = [s._version for s in steps]
    cpp_backend.add_one(steps)
    assert all(torch.equal(s, w) and s.dtype == w.dtype for s, w in zip(steps, want))
    assert all(s._version > v for s, v in zip(steps, versions))
    torch.library.opcheck(torch.ops.amos_fused.add_one_.default, ([torch.zeros(()), torch.ones(())],))


def test_step_counters_advance_with_or_without_the_op(monkeypatch):
    """Amos' counters without the op (torch's foreach add, as on CUDA) and with it agree."""
    runs = []
    for op in (cpp_backend.add_one, None):
        monkeypatch.setattr(cpp_backend, "add_one", op)
        params = [torch.nn.Parameter(torch.ones(3, 4)), torch.nn.Parameter(torch.ones(5))]
        opt = Amos(params, lr=0.1, backend="cpu")
        for _ in range(3):
            for p in params:
                p.grad = torch.full_like(p, 0.5)
            opt.step()
        runs.append([opt.state[p]["step"].item() for p in params] + [p.detach().clone() for p in params])
    assert runs[0][:2] == runs[1][:2] == [3.0, 3.0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2:], runs[1][2:]))


# ---- CUDA (skipped without a GPU; backend="cuda" must then raise, tested above) ----------------
requires_cuda = pytest.mark.skipif(cpp_backend.unavailable("cuda") is not None,
                                   reason=f"backend='cuda': {cpp_backend.unavailable('cuda')}")


@requires_cuda
@pytest.mark.parametrize("case", grid.CASES)
def test_cuda_matches_reference(case):
    grid.assert_matches_reference("cuda", case, device="cuda")


@requires_cuda
@pytest.mark.parametrize("options", [dict(schedule="amos", momentum=0.9),
                                     dict(schedule="inverse_time", half_life=3, momentum=0.0)])
def test_cuda_bitwise_deterministic(options):
    case = dict(shapes=DET_SHAPES, options=dict(options, eta=0.1), dtypes=(torch.bfloat16, torch.float32),
                scaler="finite", steps=3)
    first, second = grid.run("cuda", case, device="cuda"), grid.run("cuda", case, device="cuda")
    for (p0, s0), (p1, s1) in zip(first, second):
        assert all(torch.equal(a, b) for a, b in zip(p0, p1))
        for a, b in zip(s0, s1):
            assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


@requires_cuda
def test_cuda_step_replays_from_a_cuda_graph():
    # t, lr and the grad scale are read on the device, so a captured step replays correctly.
    def setup():
        gen = torch.Generator().manual_seed(5)
        ps = [torch.randn(s, generator=gen).cuda() for s in [(64, 300), (3, 9000), (5000,)]]
        opt = Amos(ps, lr=torch.tensor(0.1, device="cuda"), backend="cuda", momentum=0.9)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).cuda()
        opt.step()  # creates the state (and the cached launch plan)
        return ps, opt

    def step(ps, opt):
        group = opt.param_groups[0]
        cpp_backend.fused_step(ps, [p.grad for p in ps], [opt.state[p] for p in ps], group, None)

    eager_ps, eager_opt = setup()
    step(eager_ps, eager_opt)
    ps, opt = setup()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        step(ps, opt)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(ps, eager_ps):
        assert torch.equal(a, b)
        assert all(torch.equal(opt.state[a][k], eager_opt.state[b][k]) for k in ("v", "b", "m"))


# ---- amos_fused::max_abs, the non-finite gradient check on CPU (csrc/checks_cpu.cpp) ---------------
PIECE = 1 << 16  # checks_cpu.cpp's kPiece: lengths around it cross the split into pieces
CHECK_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _want_max_abs(xs):
    return torch.stack([x.detach().abs().amax().float() if x.numel() else torch.zeros(()) for x in xs])


@pytest.mark.parametrize("dtype", CHECK_DTYPES, ids=str)
def test_max_abs_matches_torch_exactly(dtype):
    # a max is exact: any order gives the very value torch gives
    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (15,), (64, 33), (PIECE - 1,), (PIECE,), (PIECE + 1,), (3 * PIECE + 17,), (0,), (0, 5), ()]
    xs = [(torch.randn(s, generator=gen) * 3).to(dtype) for s in shapes]
    xs.append((torch.randn(40, 50, generator=gen)).to(dtype).t())  # not contiguous
    xs.append(torch.randn(300, generator=gen).to(dtype)[::3])  # strided
    xs.append(-torch.rand(1000, generator=gen).to(dtype) - 5)  # all negative: the max is a |x|
    got = torch.ops.amos_fused.max_abs(xs)
    assert got.dtype == torch.float32 and got.shape == (len(xs),) and got.device.type == "cpu"
    assert torch.equal(got, _want_max_abs(xs))
    assert got[shapes.index((0,))] == 0 and got[shapes.index((0, 5))] == 0


def test_max_abs_of_many_tensors_and_of_none():
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(int(n), generator=gen).to(CHECK_DTYPES[i % 3])
          for i, n in enumerate(torch.randint(0, 3000, (500,), generator=gen))]
    assert torch.equal(torch.ops.amos_fused.max_abs(xs), _want_max_abs(xs))
    empty = torch.ops.amos_fused.max_abs([])
    assert empty.shape == (0,) and empty.dtype == torch.float32


@pytest.mark.parametrize("dtype", CHECK_DTYPES, ids=str)
def test_max_abs_propagates_nan_and_inf_from_any_position(dtype):
    n = 2 * PIECE + 100
    # lanes, cache lines, the four sub-streams a piece is read as, pieces, and the tail of the last
    positions = [0, 1, 15, 16, 31, 32, 63, 64, PIECE // 4 - 1, PIECE // 4, PIECE // 2 + 7, 3 * PIECE // 4 + 33,
                 PIECE - 1, PIECE, n - 101, n - 37, n - 1]
    base = torch.linspace(-2, 2, n).to(dtype)
    for pos in positions:
        for bad, want in ((float("nan"), float("nan")), (float("inf"), float("inf")), (-float("inf"), float("inf"))):
            x = base.clone()
            x[pos] = bad
            got = torch.ops.amos_fused.max_abs([torch.ones(3, dtype=dtype), x])
            torch.testing.assert_close(got, torch.tensor([1.0, want]), rtol=0, atol=0, equal_nan=True,
                                       msg=f"{bad} at {pos}")
        for inf_pos in (0, pos // 2, n - 1):  # NaN wins over Inf, whichever comes first
            x = base.clone()
            x[inf_pos] = -float("inf")
            x[pos] = float("nan")
            assert torch.ops.amos_fused.max_abs([x])[0].isnan(), f"nan at {pos}, -inf at {inf_pos}"


def test_max_abs_same_bits_whatever_the_thread_count():
    xs = [torch.randn(5 * PIECE + 3, generator=torch.Generator().manual_seed(2)), torch.randn(77, 9)]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.amos_fused.max_abs(xs))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32], ids=str)
def test_max_abs_rejects_other_dtypes_naming_the_tensor(dtype):
    xs = [torch.ones(3), torch.ones(4, dtype=dtype)]
    with pytest.raises(RuntimeError, match=r"max_abs: xs\[1\] is (Double|Int); this op takes fp32, bf16 or fp16"):
        torch.ops.amos_fused.max_abs(xs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_params_and_momentum_round_like_torch_for_every_finite_value(dtype):
    # amos_cpu.cpp converts fp16 and fp32 -> bf16 with its own branch-free code (c10's fp16 does
    # not vectorise; its bf16 store takes more instructions). With lr = 0 the update is exactly 0,
    # so theta' = half(theta + 0.9 m) and m' = half(0.9 m) in fp32: every finite nonzero value of
    # the dtype goes through the kernel's loads and both roundings (ties to even included).
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    m0 = halves[halves.isfinite() & (halves != 0)]
    p0 = m0.flip(0)
    p, m = p0.clone(), m0.clone()
    g = torch.randn(p.shape, generator=torch.Generator().manual_seed(4))
    _lr0_step(p, g, m)
    mm = m0.float() * torch.tensor(0.9)
    assert torch.equal(m.view(torch.int16), mm.to(dtype).view(torch.int16))
    assert torch.equal(p.view(torch.int16), (p0.float() + mm).to(dtype).view(torch.int16))


def _lr0_step(p, g, m):
    torch.ops.amos_fused.amos_step_([p], [g], [torch.zeros(1)], [torch.zeros(1)], [m], [torch.ones(())], [0.1], 0.0,
                                    None, None, None, None, cpp_backend.SCHEDULE_CODE["amos"], 0.999, 2.0**-125, 0.9,
                                    0.0, 0.25, 0.25, 0.0, 1.0, 0.0)


def test_a_nan_momentum_is_stored_as_c10_stores_it():
    # c10 stores a NaN as one quiet pattern: bf16 0x7FC0 whatever its sign or payload, fp16 0x7E00
    # with its sign; the kernel's own conversions do the same
    for dtype, quiet, signed in ((torch.bfloat16, 0x7FC0, False), (torch.float16, 0x7E00, True)):
        bits = torch.tensor([0x7FC0, -0x0040, 0x7F81, 0x7E01, -0x01FF, 0x7C01], dtype=torch.int16)
        nans = bits.view(dtype)[bits.view(dtype).isnan()].repeat(8)  # whole vectors and a tail
        p, m = torch.ones(len(nans), dtype=dtype), nans.clone()
        _lr0_step(p, torch.ones(len(nans)), m)
        expected = [quiet | (b & 0x8000 if signed else 0) for b in nans.view(torch.int16).tolist()]
        assert [b & 0xFFFF for b in m.view(torch.int16).tolist()] == expected, dtype
        assert p.isnan().all(), dtype


# ---- the plain x86-64 loops (the CPU kernels pick an AVX2 build at run time) ----------------------
_ISA_SCRIPT = r"""
import hashlib, torch
import backend_grid as grid
from amos_fused import cpp_backend
h = hashlib.sha256()
for case in (grid.CASES[:16] + [c for c in grid.CASES if "float16" in c.id][:4]
             + [c for c in grid.CASES if c.id.startswith("guard-") or c.id.endswith("mbfloat16")]):
    for params, states in grid.run("cpu", case.values[0], device="cpu"):
        for t in params + [v for s in states for v in s.values() if torch.is_tensor(v)]:
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
import test_two_phase as two_phase  # the sharded protocol's phases on every dtype pair
for case in two_phase.CASES:
    S, params, states, _ = two_phase._run("cpu", case, "cpu")
    for t in [S] + params + [v for s in states for v in s.values() if torch.is_tensor(v)]:
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
gen = torch.Generator().manual_seed(0)
xs = [torch.randn(n, generator=gen).to(dt) for n in (5, 70001, 300000) for dt in (torch.float32, torch.bfloat16, torch.float16)]
xs[4][123] = float("nan")
h.update(cpp_backend.max_abs(xs).numpy().tobytes())
print(h.hexdigest())
"""


def test_every_cpu_build_gives_the_same_bits():
    """AMOS_FUSED_CPU_ISA=generic forces the plain loops and =avx2 the AVX2 ones; on a machine with
    AVX512-BF16 (CI's) the default run takes that build for bf16 momentum, so the three digests
    compare the builds over a slice of the grid (dtypes, schedules, granularities, momentum in
    fp32 and bf16, fp16, guarded slices), the two-phase protocol's cases and max_abs."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    digests = []
    for isa in (None, "avx2", "generic"):
        env = {k: v for k, v in os.environ.items() if k != "AMOS_FUSED_CPU_ISA"}
        if isa:
            env["AMOS_FUSED_CPU_ISA"] = isa
        env["PYTHONPATH"] = os.pathsep.join([str(here), env.get("PYTHONPATH", "")])
        res = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], capture_output=True, text=True, env=env,
                             timeout=600, cwd=here)
        assert res.returncode == 0, res.stderr[-3000:]
        digests.append(res.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1], "the AVX512-BF16 build and the AVX2 one differ"
    assert digests[1] == digests[2], "the plain x86-64 loops and the AVX2 ones differ"
