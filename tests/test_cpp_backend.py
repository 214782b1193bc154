"""backend="cpu" (the compiled extension amos_fused._C) against the reference, and the op's contract."""
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
        for n in (1, 2, 1):  # the same result whatever at::parallel_for's split
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
    vs = [torch.zeros(4) for _ in range(n)]
    bs = [torch.zeros(4) for _ in range(n)]
    ms = [torch.zeros(4, 5) for _ in range(n)] if momentum else []
    steps = [torch.ones(()) for _ in range(n)]
    return (params, grads, vs, bs, ms, steps, [0.3] * n, 0.1, None, torch.tensor(2.0),
            cpp_backend.SCHEDULE_CODE["amos"], 0.999, 2.0**-125, momentum, 0.5, 0.25, 0.25, 0.0, 1.0, 0.0)


def test_op_passes_torch_library_opcheck():
    # schema (mutations declared), fake implementation, and tracing through AOT dispatch
    torch.library.opcheck(torch.ops.amos_fused.amos_step_.default, _op_args())


def test_op_traces_under_torch_compile_fullgraph():
    eager, compiled = _op_args(), _op_args()
    options = eager[6:]  # floats, ints and the grad_scale tensor: the same for both calls

    def step(params, grads, vs, bs, ms, steps):
        torch.ops.amos_fused.amos_step_(params, grads, vs, bs, ms, steps, *options)
        return params[0].sum()

    torch._dynamo.reset()
    fn = torch.compile(step, fullgraph=True, backend="aot_eager")  # fake-tensor tracing, no codegen
    want = step(*eager[:6])
    got = fn(*compiled[:6])
    assert torch.equal(got, want)
    for a, b in zip(eager[:5], compiled[:5]):  # the mutations of params, v, b, m survive functionalization
        assert all(torch.equal(x, y) for x, y in zip(a, b))


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
