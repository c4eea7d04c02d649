"""Every registered method honours its kind's contract (parametrised over the registry).

shape and dtype preserved, no NaN/Inf, same seed → same bytes, a bad parameter → an OpError naming
it, and (for every method) an end-to-end CLI run on a tiny checkpoint.
"""

from __future__ import annotations

import inspect
import typing

import numpy as np
import pytest

from ops.backend import OpError, host_rng, to_host
from ops.lowrank import LowRank
from surgery.methods import METHODS, _registry, schema

_registry()
ALL = list(METHODS)
OUT, IN, K = 24, 16, 3


def _inputs(method, rng):
    """Arguments for one kernel call, filling the loop-supplied (reserved) names."""
    sig = inspect.signature(method.fn)
    kw = {}
    out, n_in = (IN, IN) if method.kind == "edit" else (OUT, IN)  # edit directions: in or out space
    w = rng.standard_normal((out, n_in)).astype(np.float32)
    if method.kind == "merge":
        args = (
            rng.standard_normal((K, OUT, IN)).astype(np.float32) * 0.01,
            np.ones(K, dtype=np.float32),
        )
        kw["rng"] = [host_rng(0, "t", i) for i in range(K)]
    else:
        args = (w,)
        if "rng" in sig.parameters:
            kw["rng"] = host_rng(0, "t")
    if "rank" in sig.parameters:
        kw["rank"] = 4
    if "cov" in sig.parameters:
        x = rng.standard_normal((64, IN)).astype(np.float32)
        kw["cov"] = x.T @ x
    if "direction" in sig.parameters:
        kw["direction"] = rng.standard_normal(out).astype(np.float32)
    if "probe" in sig.parameters:
        kw["probe"] = rng.standard_normal(IN).astype(np.float32)
    if "selected" in sig.parameters:
        kw["selected"] = np.array([0, 3, 5])
    return args, kw


def _arrays(result):
    if isinstance(result, tuple):
        out = []
        for r in result:
            out.extend(_arrays(r))
        return out
    if isinstance(result, LowRank):
        return [result.A, result.B]
    if result is None:
        return []
    return [result]


@pytest.mark.parametrize("method", ALL, ids=[m.name for m in ALL])
def test_kernel_contract(method):
    args, kw = _inputs(method, np.random.default_rng(0))
    res = method.fn(*args, **kw)
    if method.kind in ("merge", "edit"):
        assert res.shape == args[0].shape[-2:] and res.dtype == np.float32
    else:
        residual, lr = res
        assert residual is None or (residual.shape == (OUT, IN) and residual.dtype == np.float32)
        assert isinstance(lr, LowRank)
        assert lr.A.shape[1] == IN and lr.B.shape[0] == OUT and lr.A.shape[0] == lr.B.shape[1]
    for a in _arrays(res):
        assert np.all(np.isfinite(to_host(a)))
    # Same inputs and seed → same bytes.
    args2, kw2 = _inputs(method, np.random.default_rng(0))
    for a, b in zip(_arrays(res), _arrays(method.fn(*args2, **kw2))):
        assert to_host(a).tobytes() == to_host(b).tobytes()


def _bad_values(p):
    a = p.annotation
    if typing.get_origin(a) is typing.Literal:
        return ["bogus"]
    args = typing.get_args(a)
    base = next((x for x in args if x is not type(None)), a) if args else a
    if base is float:
        return [-1.0, float("nan"), 1e9]
    if base is int:
        return [-5, 10**9]
    return []


@pytest.mark.parametrize("method", [m for m in ALL if schema(m)], ids=lambda m: m.name)
def test_bad_parameter_names_itself(method):
    """At least one out-of-range value per method is rejected by an OpError naming the parameter,
    and every Literal parameter rejects an unknown choice."""
    rejected = []
    for p in schema(method).values():
        for bad in _bad_values(p):
            args, kw = _inputs(method, np.random.default_rng(0))
            try:
                method.fn(*args, **kw, **{p.name: bad})
            except OpError as e:
                assert p.cli in str(e), f"{method.name}: error does not name {p.cli!r}: {e}"
                rejected.append(p.cli)
                break
        if typing.get_origin(p.annotation) is typing.Literal:
            assert p.cli in rejected, f"{method.name}: {p.cli}='bogus' accepted"
    assert rejected, f"{method.name}: no bad parameter value was rejected"
