"""Shared helpers: a float64 reference written here in NumPy (independent of the library), the
tolerance rule of ATTENTION.md, and the backends this machine has."""

from __future__ import annotations

import numpy as np
import pytest

import attentionkit as ak


def reference(q, k, v, *, causal=False, window=None, scale=None, softcap=None, mask=None):
    """O [B, Hq, Nq, Dv] and LSE [B, Hq, Nq] in float64 of the (already rounded) inputs."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    s = np.einsum("bhid,bhjd->bhij", q, k) * (scale if scale is not None else 1 / np.sqrt(d))
    if softcap:
        s = softcap * np.tanh(s / softcap)
    i = np.arange(nq)[:, None] + (nk - nq)
    j = np.arange(nk)[None, :]
    visible = np.ones((nq, nk), dtype=bool)
    if causal:
        visible &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
    visible = np.broadcast_to(visible, s.shape).copy()
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype == bool:
            visible &= np.broadcast_to(m, s.shape)
        else:
            s = s + np.broadcast_to(m.astype(np.float64), s.shape)
            visible &= np.broadcast_to(np.isfinite(m) | (m > 0), s.shape)
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    safe = np.where(np.isfinite(m), m, 0)
    p = np.where(visible, np.exp(s - safe), 0)
    total = p.sum(axis=-1, keepdims=True)
    o = np.einsum("bhij,bhjd->bhid", p, v) / np.where(total > 0, total, 1)
    lse = np.where(total[..., 0] > 0, safe[..., 0] + np.log(np.where(total[..., 0] > 0, total[..., 0], 1)), -np.inf)
    return o, lse


def assert_close(out, ref, dtype_unit=0.0, what="output"):
    """ATTENTION.md: |o - ref| <= 3e-4 + 2e-5 |ref| (+ one rounding of a 16-bit output type)."""
    out = np.asarray(out, dtype=np.float64)
    excess = np.abs(out - ref) - (3e-4 + 2e-5 * np.abs(ref) + dtype_unit * np.abs(ref))
    assert np.isfinite(out).all(), f"{what}: non-finite values"
    assert excess.max() <= 0, f"{what}: exceeds the tolerance by {excess.max():.3g}"


def assert_lse(lse, ref):
    lse = np.asarray(lse, dtype=np.float64)
    both_inf = np.isneginf(lse) & np.isneginf(ref)
    with np.errstate(invalid="ignore"):
        diff = np.where(both_inf, 0, np.abs(lse - ref))
    assert np.all(diff <= 1e-4 * (1 + np.abs(np.where(both_inf, 0, ref)))), f"lse off by {np.nanmax(diff):.3g}"


def _backends():
    names = ["naive", "blas", "auto"]
    try:
        ak.Context("opencl:0", use_environment=False)
        names.append("opencl:0")
    except ak.ConfigurationError:
        pass
    return names


BACKENDS = _backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return ak.Context(request.param, use_environment=False)


@pytest.fixture
def rng():
    return np.random.default_rng(20261123)


def values(rng, shape, dtype=np.float32):
    """Random values exact in fp16 and bf16 (k / 64, |k| <= 100), so every storage type holds them."""
    return (rng.integers(-100, 101, size=shape) / 64).astype(dtype)
