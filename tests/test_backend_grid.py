"""The backend grid must be able to fail: a backend that is slightly wrong is caught."""
import pytest
import torch

import backend_grid as grid
from amos_fused import backends
from amos_fused.reference import reference_step


def _install(monkeypatch, name, fn):
    monkeypatch.setattr(backends, "BACKENDS", backends.BACKENDS + (name,))
    monkeypatch.setitem(backends._BACKENDS, name, lambda device: (fn, None))


def test_grid_catches_a_wrong_coefficient(monkeypatch):
    def off_by_one_percent(params, grads, states, group, grad_scale, guarded=None):
        reference_step(params, grads, states, dict(group, d_coef=group["d_coef"] * 1.01), grad_scale, guarded)

    _install(monkeypatch, "wrong_coef", off_by_one_percent)
    case = next(c.values[0] for c in grid.CASES if c.id == "row-amos-m0.0")
    with pytest.raises(AssertionError):
        grid.assert_matches_reference("wrong_coef", case)


def test_grid_catches_truncating_bf16(monkeypatch):
    def truncating(params, grads, states, group, grad_scale, guarded=None):
        wide = [p.float() for p in params]
        reference_step(wide, grads, states, group, grad_scale, guarded)
        for p, w in zip(params, wide):  # round toward zero instead of to nearest even
            p.copy_((w.view(torch.int32) & ~0xFFFF).view(torch.float32))

    _install(monkeypatch, "truncating", truncating)
    case = next(c.values[0] for c in grid.CASES if c.id.startswith("bfloat16-bfloat16-amos"))
    with pytest.raises(AssertionError, match="RTNE"):
        grid.assert_matches_reference("truncating", case)


def test_reference_against_itself_on_the_whole_grid_is_finite():
    # Not a comparison (it would be trivial): every case runs and stays finite on the reference.
    for param in grid.CASES:
        for params, states in grid.run("reference", param.values[0]):
            assert all(torch.isfinite(p.float()).all() for p in params)
            assert all(torch.isfinite(v.float()).all() for s in states for v in s.values() if torch.is_tensor(v))
