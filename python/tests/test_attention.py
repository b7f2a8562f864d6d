"""attentionkit.attention and the batch forms against the float64 reference, on every backend, with
NumPy arrays and torch tensors, strided views and 16-bit storage; and the errors a user meets."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
import torch
from conftest import assert_close, assert_lse, reference, values

import attentionkit as ak
from attentionkit import _abi

CASES = [
    # name, (B, Hq, Hkv, Nq, Nk, D, Dv), options
    ("plain", (1, 2, 2, 5, 7, 16, 16), {}),
    ("gqa causal nq<nk", (2, 8, 2, 9, 33, 32, 32), {"causal": True}),
    ("window", (1, 4, 1, 17, 40, 16, 16), {"causal": True, "window": (6, 0)}),
    ("two-sided window, scale", (1, 2, 1, 12, 12, 8, 8), {"window": (3, 2), "scale": 0.3}),
    ("softcap, large logits", (1, 2, 2, 6, 50, 64, 64), {"softcap": 4.0, "scale": 8.0}),
    ("dv != d, odd sizes", (3, 3, 1, 7, 13, 24, 8), {"causal": True}),
    ("decode", (2, 8, 2, 1, 300, 64, 64), {"causal": True}),
]


@pytest.mark.parametrize("name,dims,options", CASES, ids=[c[0] for c in CASES])
def test_numpy_against_reference(backend, rng, name, dims, options):
    b, hq, hkv, nq, nk, d, dv = dims
    q, k, v = values(rng, (b, hq, nq, d)), values(rng, (b, hkv, nk, d)), values(rng, (b, hkv, nk, dv))
    out, lse = backend.attention(q, k, v, return_lse=True, **options)
    ref, ref_lse = reference(q, k, v, **options)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (b, hq, nq, dv)
    assert lse.shape == (b, hq, nq) and lse.dtype == np.float32
    assert_close(out, ref)
    assert_lse(lse, ref_lse)
    assert backend.last_backend and backend.last_reason


@pytest.mark.parametrize("qtype,kvtype", [(torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float32)])
def test_torch_storage_types_and_strided_views(backend, rng, qtype, kvtype):
    # Q from a [B, N, H, D] projection (transposed view), K/V a view of a cache with spare capacity.
    b, hq, hkv, nq, nk, cap, d = 2, 4, 2, 6, 21, 32, 16
    q_bnhd = torch.from_numpy(values(rng, (b, nq, hq, d))).to(qtype)
    cache_k = torch.from_numpy(values(rng, (b, hkv, cap, d))).to(kvtype)
    cache_v = torch.from_numpy(values(rng, (b, hkv, cap, d))).to(kvtype)
    q, k, v = q_bnhd.transpose(1, 2), cache_k[:, :, :nk], cache_v[:, :, :nk]
    assert not q.is_contiguous() and not k.is_contiguous()
    out = backend.attention(q, k, v, causal=True)
    assert isinstance(out, torch.Tensor) and out.dtype == qtype and out.shape == (b, hq, nq, d)
    ref, _ = reference(q.float().numpy(), k.float().numpy(), v.float().numpy(), causal=True)
    unit = {torch.float32: 0, torch.float16: 2**-11, torch.bfloat16: 2**-8}[qtype]
    assert_close(out.float().numpy(), ref, unit)


def test_output_into_a_bnhd_buffer(rng):
    q, k, v = (torch.from_numpy(values(rng, s)) for s in [(1, 4, 5, 8), (1, 2, 9, 8), (1, 2, 9, 8)])
    buffer = torch.full((1, 5, 4, 8), float("nan"))
    result = ak.attention(q, k, v, causal=True, out=buffer.permute(0, 2, 1, 3))
    assert result.data_ptr() == buffer.data_ptr()
    ref, _ = reference(q.numpy(), k.numpy(), v.numpy(), causal=True)
    assert_close(buffer.permute(0, 2, 1, 3).numpy(), ref)


def test_masks_bool_additive_broadcast_and_fully_masked_rows(backend, rng):
    b, h, nq, nk, d = 2, 2, 5, 11, 8
    q, k, v = values(rng, (b, h, nq, d)), values(rng, (b, h, nk, d)), values(rng, (b, h, nk, d))
    allowed = rng.random((b, 1, nq, nk)) > 0.4
    allowed[0, 0, 2] = False  # a fully masked row: zeros and -inf
    out, lse = backend.attention(q, k, v, mask=allowed, return_lse=True)
    ref, ref_lse = reference(q, k, v, mask=allowed)
    assert_close(out, ref)
    assert_lse(lse, ref_lse)
    assert np.all(out[0, :, 2] == 0) and np.all(np.isneginf(lse[0, :, 2]))
    additive = np.where(rng.random((nq, nk)) > 0.3, rng.standard_normal((nq, nk)), -np.inf).astype(np.float32)
    out = backend.attention(q, k, v, mask=additive, causal=True)
    ref, _ = reference(q, k, v, mask=additive, causal=True)
    assert_close(out, ref)
    # An expanded torch mask (stride 0 over batch and heads) and a float16 mask (converted once).
    tmask = torch.from_numpy(allowed[:1]).expand(b, h, nq, nk)
    out = backend.attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), mask=tmask)
    assert_close(out.numpy(), reference(q, k, v, mask=tmask.numpy())[0])
    out = backend.attention(q, k, v, mask=additive.astype(np.float16))
    assert_close(out, reference(q, k, v, mask=additive.astype(np.float16).astype(np.float32))[0])


def test_unbatched_three_dimensional_inputs(rng):
    q, k, v = values(rng, (4, 3, 16)), values(rng, (2, 7, 16)), values(rng, (2, 7, 16))
    out, lse = ak.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == (4, 3, 16) and lse.shape == (4, 3)
    assert_close(out, reference(q[None], k[None], v[None], causal=True)[0][0])


def test_varlen(backend, rng):
    hq, hkv, d = 4, 2, 16
    cu_q, cu_k = np.array([0, 3, 3, 8, 9]), np.array([0, 5, 9, 9, 30])
    q, k, v = values(rng, (9, hq, d)), values(rng, (30, hkv, d)), values(rng, (30, hkv, d))
    out, lse = backend.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    assert out.shape == (9, hq, d) and lse.shape == (9, hq)
    for s in range(4):
        rq, rk = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        if rq.start == rq.stop:
            continue
        if rk.start == rk.stop:  # no keys: zero rows and -inf
            assert np.all(out[rq] == 0) and np.all(np.isneginf(lse[rq]))
            continue
        ref, ref_lse = reference(q[None, rq].transpose(0, 2, 1, 3), k[None, rk].transpose(0, 2, 1, 3),
                                 v[None, rk].transpose(0, 2, 1, 3), causal=True)
        assert_close(out[rq].transpose(1, 0, 2), ref[0])
        assert_lse(lse[rq].T, ref_lse[0])


@pytest.mark.parametrize("nq", [1, 3])
def test_kvcache_and_paged(backend, rng, nq):
    b, hq, hkv, cap, d, page = 3, 4, 2, 24, 16, 4
    lengths = np.array([5, 24, 1])
    q = torch.from_numpy(values(rng, (b, hq, nq, d)))
    k_bshd = torch.from_numpy(values(rng, (b, cap, hkv, d))).half()  # an engine's [B, C, H, D] fp16 cache
    v_bshd = torch.from_numpy(values(rng, (b, cap, hkv, d))).half()
    k, v = k_bshd.transpose(1, 2), v_bshd.transpose(1, 2)
    out = backend.attention_with_kvcache(q, k, v, lengths, causal=True)
    for s in range(b):
        n = lengths[s]
        ref, _ = reference(q[s:s + 1].numpy(), k[s:s + 1, :, :n].float().numpy(), v[s:s + 1, :, :n].float().numpy(),
                           causal=True)
        assert_close(out[s:s + 1].numpy(), ref)
    # The same keys in shuffled pages of a pool [pages, page, Hkv, D].
    pages_per_seq = cap // page
    order = rng.permutation(b * pages_per_seq)
    table = order.reshape(b, pages_per_seq)
    pool_k = torch.empty(b * pages_per_seq, page, hkv, d, dtype=torch.float16)
    pool_v = torch.empty_like(pool_k)
    for s in range(b):
        for slot in range(pages_per_seq):
            pool_k[table[s, slot]] = k_bshd[s, slot * page:(slot + 1) * page]
            pool_v[table[s, slot]] = v_bshd[s, slot * page:(slot + 1) * page]
    paged = backend.attention_with_kvcache(q, pool_k, pool_v, lengths, block_table=table, causal=True)
    assert_close(paged.numpy(), out.numpy().astype(np.float64))
    with pytest.raises(ak.ShapeError, match="page"):
        bad = table.copy()
        bad[0, 0] = 99
        backend.attention_with_kvcache(q, pool_k, pool_v, lengths, block_table=bad)


def test_errors_are_typed_and_name_the_problem(rng):
    q, k, v = values(rng, (1, 4, 3, 8)), values(rng, (1, 2, 5, 8)), values(rng, (1, 2, 5, 8))
    with pytest.raises(ak.ShapeError, match="heads"):
        ak.attention(q, values(rng, (1, 3, 5, 8)), values(rng, (1, 3, 5, 8)))
    with pytest.raises(ak.ShapeError, match="rank"):
        ak.attention(q[0, 0], k, v)
    with pytest.raises(ak.DTypeError, match="float64"):
        ak.attention(q.astype(np.float64), k, v)
    with pytest.raises(ak.DTypeError, match="K and V"):
        ak.attention(q, k.astype(np.float16), v)
    with pytest.raises(ak.ShapeError, match="contiguous"):
        ak.attention(np.ascontiguousarray(q.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2), k, v)
    with pytest.raises(ak.OptionError, match="window"):
        ak.attention(q, k, v, window=(-3, 0))
    with pytest.raises(ak.OptionError, match="window"):
        ak.attention(q, k, v, window=5)
    with pytest.raises(ak.OptionError, match="softcap"):
        ak.attention(q, k, v, softcap=-1.0)
    with pytest.raises(ak.ShapeError, match="mask"):
        ak.attention(q, k, v, mask=np.ones((2, 2), dtype=bool))
    with pytest.raises(ak.ShapeError, match="output"):
        ak.attention(q, k, v, out=np.empty((1, 4, 3, 4), dtype=np.float32))
    with pytest.raises(ak.ShapeError, match="overlap"):
        ak.attention(q, k, v, out=q)
    with pytest.raises(TypeError, match="numpy.ndarray or a CPU torch.Tensor"):
        ak.attention(q.tolist(), k, v)
    with pytest.raises(ak.DeviceError, match="meta"):
        ak.attention(torch.empty(1, 4, 3, 8, device="meta"), torch.from_numpy(k), torch.from_numpy(v))
    with pytest.raises(ak.ArgumentError, match="requires grad"):
        ak.attention(torch.from_numpy(q).requires_grad_(), torch.from_numpy(k), torch.from_numpy(v))
    with torch.no_grad():
        ak.attention(torch.from_numpy(q).requires_grad_(), torch.from_numpy(k), torch.from_numpy(v))
    with pytest.raises(ak.ConfigurationError, match="tpu"):
        ak.Context("tpu")
    with pytest.raises(ak.ConfigurationError, match="opencl:42|42"):
        ak.Context("opencl:42")
    with pytest.raises(ak.ConfigurationError, match="sse9"):
        ak.Context("blas", cpu_isa="sse9")
    with pytest.raises(ak.ShapeError, match="cu_seqlens"):
        ak.attention_varlen(q[0], k[0], v[0], [0, 1], [0, 1, 2])
    with pytest.raises(ak.ShapeError, match=r"cuSeqlensQ\[1\]"):
        ak.attention_varlen(q[0].transpose(1, 0, 2).copy(), k[0].transpose(1, 0, 2).copy(),
                            v[0].transpose(1, 0, 2).copy(), [0, 4, 3], [0, 2, 5])


def test_abi_layout_matches_the_header():
    # The header's _Static_asserts (Sources/CAttentionKitABI/abi.c) fix these.
    assert ctypes.sizeof(_abi.Tensor) == 80
    assert _abi.Tensor.shape.offset == 16 and _abi.Tensor.strides.offset == 48
    assert ctypes.sizeof(_abi.Options) == 40
    assert _abi.Options.window_left.offset == 8 and _abi.Options.scale.offset == 24 and _abi.Options.mask.offset == 32
    assert ctypes.sizeof(_abi.ContextOptions) == 40
    assert ctypes.sizeof(_abi.Sequences) == 56
    major, minor, patch = (int(x) for x in ak.__version__.split("."))
    assert ak._lib.attentionkit_version() == major * 10000 + minor * 100 + patch


def test_threads_share_a_context_and_keep_their_own_messages(rng):
    context = ak.Context("blas", use_environment=False)
    q, k, v = values(rng, (1, 4, 8, 16)), values(rng, (1, 2, 64, 16)), values(rng, (1, 2, 64, 16))
    ref, _ = reference(q, k, v, causal=True)
    failures = []

    def work(index):
        for _ in range(30):
            if index % 2:
                try:
                    context.attention(q, k, v, softcap=-(index + 1.0))
                    failures.append(f"{index}: no error")
                except ak.OptionError as error:
                    if str(-(index + 1.0)).rstrip("0").rstrip(".") not in str(error):
                        failures.append(f"{index}: another thread's message: {error}")
            else:
                out = context.attention(q, k, v, causal=True)
                if np.abs(out - ref).max() > 1e-3 or context.last_backend != "blas":
                    failures.append(f"{index}: wrong result or backend")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


def test_numpy_bfloat16_through_ml_dtypes(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    q, k, v = (values(rng, s).astype(bf16) for s in [(1, 4, 6, 16), (1, 2, 9, 16), (1, 2, 9, 16)])
    out = ak.attention(q, k, v, causal=True)
    assert out.dtype == np.dtype(bf16) and out.shape == (1, 4, 6, 16)
    ref, _ = reference(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), causal=True)
    assert_close(out.astype(np.float32), ref, 2**-8)


def test_empty_varlen_batches_and_argument_errors(rng):
    q, k = values(rng, (0, 4, 16)), values(rng, (0, 2, 16))
    out = ak.attention_varlen(q, k, k, [0, 0], [0, 0])
    assert out.shape == (0, 4, 16)
    with pytest.raises(ak.ShapeError, match="rank 4"):
        ak.attention_with_kvcache(values(rng, (4, 1, 16)), values(rng, (1, 2, 8, 16)), values(rng, (1, 2, 8, 16)), [3])
    with pytest.raises(ak.ShapeError, match="rank 3"):
        ak.attention_varlen(values(rng, (1, 4, 1, 16)), k, k, [0, 1], [0, 0])
    with pytest.raises(TypeError, match="numpy.ndarray"):
        ak.attention_varlen([[1.0]], k, k, [0, 1], [0, 0])
    readonly = np.frombuffer(bytes(4 * 4 * 3 * 8), dtype=np.float32).reshape(1, 4, 3, 8)
    with pytest.raises(ak.ArgumentError, match="read-only"):
        ak.attention(values(rng, (1, 4, 3, 8)), values(rng, (1, 2, 5, 8)), values(rng, (1, 2, 5, 8)), out=readonly)
