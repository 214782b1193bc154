"""Bad input gets an exception that names the argument (or parameter) and the fix, and changes nothing.

Every case snapshots the parameters, gradients, optimizer state, param groups and counters with
clones first and compares them afterwards with torch.equal: bit-for-bit unchanged. Inputs that are
unusual but legal (non-contiguous and channels-last tensors, gradients in another float dtype) must
instead give the reference's result on a contiguous copy, on every backend that runs here.
"""
import copy
import math
import re

import pytest
import torch

from amos_fused import Amos, backends

try:
    from amos_fused.triton_backend import K as triton_kernels
except ImportError:  # no triton installed: its test is skipped
    triton_kernels = None

# a message must name what is wrong AND say what to do: one of these verbs of a fix
FIX = re.compile(r"\b(use|leave|needs?|pass|set|move|list|materialise|split|build|load|give|must)\b", re.I)


def cpu_backends(device="cpu"):
    """The explicit backends that can run on `device` here (on CPU: triton only under the interpreter)."""
    out = []
    for name in backends.BACKENDS:
        try:
            if name != "auto" and backends.resolve(name, torch.device(device)):
                out.append(name)
        except RuntimeError:
            pass
    return out


def backend_devices():
    """(backend, device) pairs that can run here: every CPU backend, and on a GPU machine every CUDA one."""
    pairs = [(name, "cpu") for name in cpu_backends()]
    if torch.cuda.is_available():
        pairs += [(name, "cuda") for name in cpu_backends("cuda")]
    return pairs


# ---- snapshots -------------------------------------------------------------------------------
def _clone(x):
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def snapshot(opt, params):
    """Clones of everything a failed call could have touched."""
    return dict(params=[_clone(p) for p in params],
                grads=[_clone(p.grad) for p in params],
                state={i: _clone(dict(opt.state[p])) for i, p in enumerate(params) if p in opt.state},
                groups=[{k: _clone(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
                group_params=[[id(p) for p in g["params"]] for g in opt.param_groups],
                skipped=getattr(opt, "skipped_steps", None))


def assert_identical(a, b, where="snapshot"):
    """Bitwise equality of nested dicts/lists of tensors (NaN == NaN) and plain values."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and (a.dtype, a.shape, a.device, a.layout) == (b.dtype, b.shape, b.device, b.layout), \
            f"{where}: {a!r} vs {b!r}"
        if a.is_sparse:
            a, b = a.coalesce().to_dense(), b.coalesce().to_dense()
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))), f"{where} changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_clear(err, *names):
    msg = str(err.value)
    for name in names:
        assert name in msg, f"the message does not name {name!r}: {msg}"
    assert FIX.search(msg), f"the message says no fix: {msg}"


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).requires_grad_() for shape in ((4, 3), (5,), (2, 3, 2, 2))]


def set_grads(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def stepped(params, backend="reference", **options):
    """An optimizer over `params` that has taken one step (so it has state) and has fresh grads."""
    opt = Amos(params, lr=0.1, backend=backend, **options)
    set_grads(params, 1)
    opt.step()
    set_grads(params, 2)
    return opt


# ---- hyper-parameters: (name, bad value, options it needs to be bad) ----------------------------
NAN, INF = float("nan"), float("inf")
DECAY = dict(schedule="inverse_time", half_life=10)
BAD_OPTIONS = [
    ("lr", -0.1, {}), ("lr", NAN, {}), ("lr", INF, {}), ("lr", "0.1", {}), ("lr", True, {}),
    ("lr", torch.tensor([0.1, 0.2]), {}), ("lr", torch.tensor(1), {}),
    ("schedule", "adam", {}), ("schedule", None, {}),
    ("granularity", "column", {}), ("granularity", None, {}),
    ("half_life", None, dict(schedule="inverse_time")), ("half_life", 0, dict(schedule="inverse_square")),
    ("half_life", -3.0, dict(schedule="inverse_time")), ("half_life", INF, dict(schedule="inverse_time")),
    ("half_life", 10, {}),  # "amos" does not decay
    ("half_life", 10, dict(schedule="constant")),
    ("beta", 1.0, {}), ("beta", -0.1, {}), ("beta", NAN, {}), ("beta", "0.9", {}),
    ("momentum", 1.0, {}), ("momentum", -0.5, {}), ("momentum", NAN, {}),
    ("momentum_dtype", torch.float64, {}), ("momentum_dtype", "bf16", {}), ("momentum_dtype", torch.int8, {}),
    ("clip_value", 0.0, {}), ("clip_value", -1.0, {}), ("clip_value", INF, {}),
    ("d_coef", -1.0, {}), ("c_coef", NAN, {}), ("extra_l2", -0.1, {}), ("extra_l2", INF, {}),
    ("d_coef", 0.5, DECAY), ("c_coef", 0.5, dict(schedule="constant")), ("extra_l2", 0.1, DECAY),
    ("q", 2.0, {}),  # "amos" has no q
    ("q", 0.0, dict(schedule="constant")), ("q", -1.0, DECAY), ("q", NAN, DECAY),
    ("eps", 0.0, {}), ("eps", -1e-8, {}), ("eps", INF, {}),
    ("eta", 0.0, {}), ("eta", -1.0, {}), ("eta", NAN, {}), ("eta", "0.5", {}),
]
OPTION_IDS = [f"{name}={value!r}{'-' + extra['schedule'] if extra else ''}" for name, value, extra in BAD_OPTIONS]


@pytest.mark.parametrize("name,value,extra", BAD_OPTIONS, ids=OPTION_IDS)
def test_bad_option_in_constructor(name, value, extra):
    params = make_params()
    before = [p.detach().clone() for p in params]
    with pytest.raises((ValueError, TypeError)) as err:
        Amos(params, **{"lr": 0.1, **extra, name: value})
    assert_clear(err, name)
    assert_identical([p.detach() for p in params], before)


@pytest.mark.parametrize("name,value,extra", BAD_OPTIONS, ids=OPTION_IDS)
def test_bad_option_in_a_group_override(name, value, extra):
    params = make_params()
    with pytest.raises((ValueError, TypeError)) as err:
        Amos([{"params": params[:1]}, {"params": params[1:], **extra, name: value}], lr=0.1)
    assert_clear(err, name, "param group 1")


@pytest.mark.parametrize("name,value,extra", BAD_OPTIONS, ids=OPTION_IDS)
def test_bad_option_in_add_param_group_changes_nothing(name, value, extra):
    params = make_params()
    opt = stepped(params[:2])
    before = snapshot(opt, params)
    with pytest.raises((ValueError, TypeError)) as err:
        opt.add_param_group({"params": params[2:], **extra, name: value})
    assert_clear(err, name, "param group 1")
    assert_identical(snapshot(opt, params), before)
    assert params[2] not in opt.state


@pytest.mark.parametrize("name,value,extra", BAD_OPTIONS, ids=OPTION_IDS)
def test_group_edited_after_construction_raises_at_step_before_changing_anything(name, value, extra):
    params = make_params()
    opt = stepped(params)
    opt.param_groups[0].update(extra)
    opt.param_groups[0][name] = value
    before = snapshot(opt, params)
    with pytest.raises((ValueError, TypeError)) as err:
        opt.step()
    assert_clear(err, name, "param group 0")
    assert_identical(snapshot(opt, params), before)


FOREIGN_OPTIONS = [("weight_decay", 0.1), ("betas", (0.9, 0.999)), ("amsgrad", True), ("maximize", True),
                   ("nesterov", True), ("foreach", True), ("fused", True), ("differentiable", True)]


@pytest.mark.parametrize("name,value", FOREIGN_OPTIONS, ids=[name for name, _ in FOREIGN_OPTIONS])
def test_options_of_torchs_optimizers_raise_rather_than_being_ignored(name, value):
    params = make_params()
    with pytest.raises(TypeError) as err:  # what Python raises for an unknown keyword, with the fix
        Amos(params, lr=0.1, **{name: value})
    assert_clear(err, name)
    with pytest.raises(TypeError) as err:
        Amos([{"params": params[:1]}, {"params": params[1:], name: value}], lr=0.1)
    assert_clear(err, name, "param group 1")
    opt = stepped(params[:2])
    before = snapshot(opt, params)
    with pytest.raises(TypeError) as err:
        opt.add_param_group({"params": params[2:], name: value})
    assert_clear(err, name, "param group 1")
    assert_identical(snapshot(opt, params), before)
    assert len(opt.param_groups) == 1


def test_unknown_options_raise_and_other_group_keys_are_kept():
    params = make_params()
    with pytest.raises(TypeError) as err:
        Amos(params, lr=0.1, lrr=0.2)
    assert_clear(err, "lrr")
    opt = Amos([{"params": params, "name": "body"}], lr=0.1)  # a key of the caller's own, as torch keeps it
    assert opt.param_groups[0]["name"] == "body"


def test_granularity_changed_after_state_exists():
    params = make_params()
    opt = stepped(params)
    opt.param_groups[0]["granularity"] = "element"  # a valid value, but v/b have one entry per row
    before = snapshot(opt, params)
    with pytest.raises(ValueError) as err:
        opt.step()
    assert_clear(err, "granularity", "param_groups[0]['params'][0]")
    assert_identical(snapshot(opt, params), before)


def test_eta_fn_errors():
    params = make_params()
    with pytest.raises(TypeError) as err:
        Amos(params, eta_fn=0.5)
    assert_clear(err, "eta_fn")
    for bad in (0.0, -1.0, NAN, INF, "0.5"):
        with pytest.raises(ValueError) as err:
            Amos(params, eta_fn=lambda name, p, bad=bad: bad if p.ndim == 1 else None)
        assert_clear(err, "eta", "(5,)")
    # through add_param_group: nothing is added when one parameter's eta is bad
    opt = stepped(params[:2], eta_fn=lambda name, p: 0.0 if p.ndim == 4 else None)
    before = snapshot(opt, params)
    with pytest.raises(ValueError) as err:
        opt.add_param_group({"params": params[2:]})
    assert_clear(err, "eta", "(2, 3, 2, 2)")
    assert_identical(snapshot(opt, params), before)
    assert params[2] not in opt.state


# ---- parameters and gradients -------------------------------------------------------------------
def test_complex_and_integer_parameters():
    params = make_params()
    z = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError) as err:
        Amos([params[0], z])
    assert_clear(err, "params[1]", "complex", "view_as_real")
    opt = stepped(params)
    before = snapshot(opt, params)
    with pytest.raises(TypeError) as err:
        opt.add_param_group({"params": [z]})
    assert_clear(err, "params[0]", "complex")
    with pytest.raises(TypeError) as err:
        opt.add_param_group({"params": [torch.zeros(3, dtype=torch.int64)]})
    assert_clear(err, "params[0]", "int64")
    with pytest.raises(TypeError) as err:
        opt.add_param_group({"params": [[1.0, 2.0]]})
    assert_clear(err, "params[0]", "not a tensor")
    assert_identical(snapshot(opt, params), before)
    assert len(opt.param_groups) == 1


def test_duplicate_parameters():
    params = make_params()
    with pytest.raises(ValueError) as err:
        Amos([params[0], params[1], params[0]])  # torch itself only warns within a group
    assert_clear(err, "params[2]", "(4, 3)")
    with pytest.raises(ValueError) as err:
        Amos([{"params": params[:2]}, {"params": [params[2], params[1]]}])
    assert_clear(err, "param group 1", "params[1]", "(5,)")
    opt = stepped(params)
    before = snapshot(opt, params)
    with pytest.raises(ValueError) as err:
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True), params[2]]})
    assert_clear(err, "param group 1", "params[1]")
    assert_identical(snapshot(opt, params), before)
    assert len(opt.param_groups) == 1


def test_sparse_gradient():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.randn(4, requires_grad=True)
    opt = Amos([dense, emb.weight], lr=0.1)
    (emb(torch.tensor([1, 2])).sum() + dense.sum()).backward()
    assert emb.weight.grad.is_sparse
    params = [dense, emb.weight]
    before = snapshot(opt, params)
    with pytest.raises(TypeError) as err:
        opt.step()
    assert_clear(err, "sparse", "param_groups[0]['params'][1]", "sparse=False")
    assert_identical(snapshot(opt, params), before)


@pytest.mark.parametrize("make_bad", ["int-dtype", "shape"])
def test_gradient_of_wrong_dtype_or_shape(make_bad):
    params = make_params()
    opt = stepped(params)
    if make_bad == "int-dtype":
        params[1].grad_dtype = None  # torch >= 2.10 otherwise refuses the assignment itself
        params[1].grad = torch.ones(5, dtype=torch.int32)
    else:
        params[1].grad.data = torch.randn(6)  # .data bypasses the setter's shape check
    before = snapshot(opt, params)
    with pytest.raises(ValueError) as err:
        opt.step()
    assert_clear(err, "param_groups[0]['params'][1]", "(5,)", "gradient")
    assert_identical(snapshot(opt, params), before)


def test_parameter_on_the_meta_device_in_a_group():
    """A meta tensor stands in for a second device: it holds no data, so it cannot be stepped."""
    params = make_params()
    meta = torch.empty(3, 2, device="meta", requires_grad=True)
    with pytest.raises(ValueError) as err:
        Amos([params[0], meta])
    assert_clear(err, "params[1]", "meta", "to_empty")
    opt = stepped(params)
    before = snapshot(opt, params)
    with pytest.raises(ValueError) as err:
        opt.add_param_group({"params": [torch.empty(4, device="meta")]})
    assert_clear(err, "params[0]", "meta")
    assert_identical(snapshot(opt, params), before)


# ---- state_dict ----------------------------------------------------------------------------------
def _other_state_dict(kind):
    """A state dict that does not fit `make_params()` in Amos with default options."""
    other = {"fewer": make_params()[:2],
             "transposed": [torch.randn(3, 4, requires_grad=True)] + make_params()[1:],
             "longer": [make_params()[0], torch.randn(6, requires_grad=True), make_params()[2]]}.get(kind)
    if kind == "granularity":  # v and b saved for "element" slices, the group saying "row"
        sd = stepped(make_params(), granularity="element").state_dict()
        sd["param_groups"][0]["granularity"] = "row"
        return sd, "'v'"
    if kind == "bad-option":
        sd = stepped(make_params()).state_dict()
        sd["param_groups"][0]["beta"] = 1.5
        return sd, "beta"
    if kind == "no-eta":
        sd = stepped(make_params()).state_dict()
        del sd["state"][1]["eta"]
        return sd, "eta"
    if kind == "groups":
        p = make_params()
        opt = Amos([{"params": p[:1]}, {"params": p[1:]}], lr=0.1)
        return opt.state_dict(), "param groups"
    sd = stepped(other).state_dict()
    return sd, {"fewer": "parameters", "transposed": "(4, 3)", "longer": "(5,)"}[kind]


@pytest.mark.parametrize("kind", ["fewer", "transposed", "longer", "granularity", "bad-option", "no-eta", "groups"])
def test_state_dict_that_does_not_fit_is_rejected_before_loading(kind):
    params = make_params()
    opt = stepped(params)
    sd, named = _other_state_dict(kind)
    before = snapshot(opt, params)
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(sd)
    assert_clear(err, named)
    assert_identical(snapshot(opt, params), before)
    opt.step()  # still usable


# ---- backends ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cuda", "nonexistent", "Reference", ""])
def test_unknown_or_unavailable_backend(name):
    params = make_params()
    before = [p.detach().clone() for p in params]
    with pytest.raises((ValueError, RuntimeError)) as err:
        Amos(params, backend=name)
    assert_clear(err, f"backend={name!r}")
    assert_identical([p.detach() for p in params], before)


@pytest.mark.skipif(triton_kernels is None, reason="triton is not installed")
def test_triton_on_cpu_without_the_interpreter(monkeypatch):
    params = make_params()
    opt = stepped(params, backend="triton") if triton_kernels.INTERPRET else None
    monkeypatch.setattr(triton_kernels, "INTERPRET", False)
    with pytest.raises(RuntimeError) as err:
        Amos(params, backend="triton")
    assert_clear(err, "backend='triton'", "TRITON_INTERPRET")
    if opt is None:
        return
    # the backend became unavailable after construction: the step raises before changing anything
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError) as err:
        opt.step()
    assert_clear(err, "backend='triton'")
    assert_identical(snapshot(opt, params), before)
    with pytest.raises(RuntimeError):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    assert_identical(snapshot(opt, params), before)


# ---- legal but unusual layouts and dtypes: correct on every backend ----------------------------
def _layouts():
    gen = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(shape, generator=gen)

    return {
        "transposed-param": (rnd(3, 5).t(), None),
        "strided-view-param": (rnd(4, 10)[:, ::2], None),
        "channels-last-param": (rnd(2, 3, 4, 5).to(memory_format=torch.channels_last), None),
        "channels-last-grad": (rnd(2, 3, 4, 5), lambda g: g.to(memory_format=torch.channels_last)),
        "transposed-grad": (rnd(5, 3), lambda g: g.t().contiguous().t()),
        "expanded-grad": (rnd(4, 6), lambda g: g[:1].expand(4, 6)),
        "channels-last-both": (rnd(3, 2, 3, 3).to(memory_format=torch.channels_last),
                               lambda g: g.to(memory_format=torch.channels_last)),
    }


LAYOUTS = list(_layouts())


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("granularity", ["row", "element"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_layouts_match_the_reference_on_contiguous_copies(backend, granularity, layout):
    from backend_grid import TOL, assert_close

    odd, grad_layout = _layouts()[layout]  # the layout under test
    plain = odd.clone(memory_format=torch.contiguous_format)
    assert odd.is_contiguous() == layout.endswith("-grad")
    opts = dict(lr=0.1, granularity=granularity, momentum=0.9)
    opt_odd, opt_plain = Amos([odd], backend=backend, **opts), Amos([plain], backend="reference", **opts)
    strides = odd.stride()
    for step in range(3):
        g = torch.randn(odd.shape, generator=torch.Generator().manual_seed(step))
        odd.grad = grad_layout(g) if grad_layout else g
        plain.grad = odd.grad.clone(memory_format=torch.contiguous_format)
        opt_odd.step()
        opt_plain.step()
        assert odd.stride() == strides, "the parameter's layout must not change"
        assert_close(odd.detach(), plain.detach(), TOL[torch.float32], f"{backend} {layout} step {step}: param")
        for key in ("v", "b", "m"):
            assert_close(opt_odd.state[odd][key].contiguous(), opt_plain.state[plain][key],
                         TOL[torch.float32], f"{backend} {layout} step {step}: state {key}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_gradient_in_another_float_dtype_matches_the_reference(backend, grad_dtype):
    """The spec lets g have another dtype than theta: the step reads it as g.to(compute dtype)."""
    from backend_grid import TOL, assert_close

    theta = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    a, b = theta.clone(), theta.clone()
    a.grad_dtype = None
    opt_a, opt_b = Amos([a], lr=0.1, backend=backend), Amos([b], lr=0.1, backend="reference")
    for step in range(3):
        g = torch.randn(6, 5, generator=torch.Generator().manual_seed(step)).to(grad_dtype)
        a.grad = g
        b.grad = g.float()  # the same values, widened exactly
        opt_a.step()
        opt_b.step()
        assert_close(a, b, TOL[torch.float32], f"{backend} grad {grad_dtype} step {step}: param")
        for key in ("v", "b", "m"):
            assert_close(opt_a.state[a][key], opt_b.state[b][key], TOL[torch.float32], f"state {key}")


def test_add_param_group_takes_a_dict_only():
    params = [torch.nn.Parameter(torch.ones(3, 2)) for _ in range(2)]
    opt = Amos(params[:1], lr=0.1)
    before = copy.deepcopy(opt.state_dict())
    for bad in ((p for p in params[1:]), params[1:], params[1]):
        with pytest.raises(TypeError, match="param_group must be a dict"):
            opt.add_param_group(bad)
    assert len(opt.param_groups) == 1 and opt.state_dict() == before
