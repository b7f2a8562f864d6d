"""AttentionKit from Python: transformer attention on NumPy arrays and CPU torch tensors, zero-copy.

    import attentionkit
    out = attentionkit.attention(q, k, v, causal=True)      # q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]
    out, lse = attentionkit.attention(q, k, v, return_lse=True)

Operands may have any strides whose last dimension is contiguous (a `.transpose(1, 2)` view of a
[B, N, H, D] tensor, a view of a cache with spare capacity) and may be float32, float16 or bfloat16
(Q, K/V and the output chosen independently; K and V alike). Arithmetic is float32. The result is of
the kind (NumPy or torch) and dtype of `q`. The C library (`libAttentionKitC.so`) is loaded with
ctypes, which releases the GIL during the call.

`attentionkit.transformers.register()` makes `attn_implementation="attentionkit"` available to
Hugging Face transformers.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

from . import _abi, _arrays
from .errors import (
    ArgumentError,
    AttentionKitError,
    BackendError,
    ConfigurationError,
    DeviceError,
    DTypeError,
    OptionError,
    ShapeError,
    UnsupportedError,
    from_status,
)

_lib, library_path = _abi.load()

__version__ = _lib.attentionkit_version_string().decode()

__all__ = [
    "attention",
    "attention_varlen",
    "attention_with_kvcache",
    "Context",
    "context",
    "library_path",
    "AttentionKitError",
    "ArgumentError",
    "ShapeError",
    "DTypeError",
    "OptionError",
    "DeviceError",
    "UnsupportedError",
    "BackendError",
    "ConfigurationError",
]


def _options(causal: bool, window: Any, scale: Any, softcap: Any, mask_tensor: Any) -> _abi.Options:
    o = _abi.Options()
    o.struct_size = ctypes.sizeof(_abi.Options)
    o.causal = 1 if causal else 0
    if window is None:
        o.window_left, o.window_right = -1, -1
    else:
        try:
            left, right = window
            o.window_left, o.window_right = int(left), int(right)
        except (TypeError, ValueError):
            raise OptionError(f"window must be None or (left, right) with -1 for unbounded, got {window!r}") from None
    if scale is not None:
        if float(scale) == 0:
            raise OptionError("scale must be nonzero (None means 1/sqrt(D))")
        o.scale = float(scale)
    if softcap:
        o.softcap = float(softcap)
    if mask_tensor is not None:
        o.mask = ctypes.pointer(mask_tensor)
    return o


class Context:
    """A backend choice: "auto" (the dispatcher picks per call, by hardware and problem, and says
    why), "naive" (the float64 reference), "blas", "opencl" or "opencl:N". `threads` = 0 uses every
    core. A context may be shared by threads; `last_backend` / `last_reason` are per thread."""

    def __init__(self, backend: str = "auto", *, threads: int = 0, cpu_isa: str | None = None,
                 use_environment: bool = True) -> None:
        options = _abi.ContextOptions()
        options.struct_size = ctypes.sizeof(_abi.ContextOptions)
        options.backend = backend.encode()
        options.threads = threads
        options.cpu_isa = cpu_isa.encode() if cpu_isa else None
        options.use_environment = 1 if use_environment else 0
        handle = ctypes.c_void_p()
        status = _lib.attentionkit_context_create(ctypes.byref(options), ctypes.byref(handle))
        if status != _abi.OK:
            raise from_status(status, _lib.attentionkit_last_error(None).decode())
        self._handle = handle
        self.backend = backend

    def close(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            _lib.attentionkit_context_free(handle)

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"attentionkit.Context({self.backend!r})"

    @property
    def last_backend(self) -> str:
        """The backend of this thread's last successful call ("blas", "opencl:0", ...)."""
        return _lib.attentionkit_last_backend(self._handle).decode()

    @property
    def last_reason(self) -> str:
        """Why that backend ran: the dispatcher's one-line reason, or "requested"."""
        return _lib.attentionkit_last_reason(self._handle).decode()

    def _raise(self, status: int) -> None:
        raise from_status(status, _lib.attentionkit_last_error(self._handle).decode())

    def attention(self, q: Any, k: Any, v: Any, *, causal: bool = False, window: tuple[int, int] | None = None,
                  scale: float | None = None, softcap: float | None = None, mask: Any = None,
                  return_lse: bool = False, out: Any = None) -> Any:
        """Attention of q [B, Hq, Nq, D] over k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (or the same
        without B). Causal is bottom-right aligned; `window` = (left, right), -1 unbounded; `mask`
        (bool: True may attend, or float: added) broadcasts over [B, Hq, Nq, Nk]. Returns O
        [B, Hq, Nq, Dv] (into `out` when given), and the log-sum-exp [B, Hq, Nq] (float32) with
        `return_lse`."""
        unbatched = len(getattr(q, "shape", ())) == 3
        if out is not None and unbatched != (len(getattr(out, "shape", ())) == 3):
            raise ShapeError("out must have the rank of q")
        if unbatched:
            q, k, v = q[None], k[None], v[None]
            if out is not None:
                out = out[None]
        qt = _arrays.describe(q, "query", 4)
        kt = _arrays.describe(k, "key", 4)
        vt = _arrays.describe(v, "value", 4)
        if out is None:
            out = _arrays.empty_like_kind(q, (q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
        ot = _arrays.describe(out, "out", 4, writable=True)
        mask_tensor = None
        if mask is not None:
            mask = _arrays.as_mask(mask, q)
            mask_tensor = _arrays.describe(mask, "mask", (2, 3, 4), mask=True)
        options = _options(causal, window, scale, softcap, mask_tensor)
        lse = _arrays.empty_like_kind(q, (q.shape[0], q.shape[1], q.shape[2]), float32=True) if return_lse else None
        status = _lib.attentionkit_attention(
            self._handle, ctypes.byref(qt), ctypes.byref(kt), ctypes.byref(vt), ctypes.byref(ot),
            _arrays.float_pointer(lse) if lse is not None else None, ctypes.byref(options))
        if status != _abi.OK:
            self._raise(status)
        if unbatched:
            out = out[0]
            lse = lse[0] if lse is not None else None
        return (out, lse) if return_lse else out

    def _sequences(self, form: int, count: int, arrays: dict[str, Any], q: Any, k: Any, v: Any, out: Any,
                   lse: Any, rank: int, causal: bool, window: Any, scale: Any, softcap: Any) -> None:
        seq = _abi.Sequences()
        seq.struct_size = ctypes.sizeof(_abi.Sequences)
        seq.form = form
        seq.count = count
        for field, array in arrays.items():
            setattr(seq, field, _arrays.int32_pointer(array))
        if "block_table" in arrays:
            seq.max_pages = arrays["block_table"].shape[1]
        qt = _arrays.describe(q, "query", rank)
        kt = _arrays.describe(k, "key", rank)
        vt = _arrays.describe(v, "value", rank)
        ot = _arrays.describe(out, "out", rank, writable=True)
        options = _options(causal, window, scale, softcap, None)
        status = _lib.attentionkit_attention_sequences(
            self._handle, ctypes.byref(seq), ctypes.byref(qt), ctypes.byref(kt), ctypes.byref(vt), ctypes.byref(ot),
            _arrays.float_pointer(lse) if lse is not None else None, ctypes.byref(options))
        if status != _abi.OK:
            self._raise(status)

    def attention_varlen(self, q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, *,
                         causal: bool = False, window: tuple[int, int] | None = None, scale: float | None = None,
                         softcap: float | None = None, return_lse: bool = False, out: Any = None) -> Any:
        """Sequences packed end to end (flash_attn_varlen_func): q [totalQ, Hq, D], k/v [totalK, Hkv, D],
        cu_seqlens_* the S + 1 offsets. Returns O [totalQ, Hq, Dv] (and LSE [totalQ, Hq])."""
        cuq = _arrays.int32_array(cu_seqlens_q, "cu_seqlens_q")
        cuk = _arrays.int32_array(cu_seqlens_k, "cu_seqlens_k")
        if cuq.ndim != 1 or cuk.ndim != 1 or cuq.shape != cuk.shape or cuq.size < 1:
            raise ShapeError(f"cu_seqlens_q and cu_seqlens_k must be two 1-D arrays of S + 1 offsets, "
                             f"got shapes {list(cuq.shape)} and {list(cuk.shape)}")
        for x, name in ((q, "query"), (k, "key"), (v, "value")):
            _arrays.check_rank(x, name, 3)
        if out is None:
            out = _arrays.empty_like_kind(q, (q.shape[0], q.shape[1], v.shape[2]))
        lse = _arrays.empty_like_kind(q, (q.shape[0], q.shape[1]), float32=True) if return_lse else None
        self._sequences(_abi.VARLEN, cuq.size - 1, {"query_offsets": cuq, "key_offsets": cuk}, q, k, v, out, lse, 3,
                        causal, window, scale, softcap)
        return (out, lse) if return_lse else out

    def attention_with_kvcache(self, q: Any, k_cache: Any, v_cache: Any, cache_seqlens: Any, *,
                               block_table: Any = None, causal: bool = False,
                               window: tuple[int, int] | None = None, scale: float | None = None,
                               softcap: float | None = None, return_lse: bool = False, out: Any = None) -> Any:
        """Per-sequence caches (flash_attn_with_kvcache): q [B, Hq, Nq, D]; k/v caches [B, Hkv, C, D]
        (any strides), sequence b seeing keys [0, cache_seqlens[b]); or, with `block_table` [B, maxPages],
        pools of pages [numPages, pageSize, Hkv, D]. Returns O [B, Hq, Nq, Dv] (and LSE [B, Hq, Nq])."""
        lengths = _arrays.int32_array(cache_seqlens, "cache_seqlens")
        if lengths.ndim != 1:
            raise ShapeError(f"cache_seqlens must be 1-D, got shape {list(lengths.shape)}")
        arrays = {"lengths": lengths}
        form = _abi.CACHE_LENGTHS
        if block_table is not None:
            table = _arrays.int32_array(block_table, "block_table")
            if table.ndim != 2 or table.shape[0] != lengths.size or table.shape[1] < 1:
                raise ShapeError(f"block_table must be [{lengths.size}, maxPages], got {list(table.shape)}")
            arrays["block_table"] = table
            form = _abi.PAGED
        for x, name in ((q, "query"), (k_cache, "key"), (v_cache, "value")):
            _arrays.check_rank(x, name, 4)
        dv = v_cache.shape[3]
        if out is None:
            out = _arrays.empty_like_kind(q, (q.shape[0], q.shape[1], q.shape[2], dv))
        lse = _arrays.empty_like_kind(q, (q.shape[0], q.shape[1], q.shape[2]), float32=True) if return_lse else None
        self._sequences(form, lengths.size, arrays, q, k_cache, v_cache, out, lse, 4, causal, window, scale, softcap)
        return (out, lse) if return_lse else out


_contexts: dict[str, Context] = {}
_contexts_lock = threading.Lock()


def context(backend: str = "auto") -> Context:
    """The shared context of `backend` (created on first use, default options)."""
    with _contexts_lock:
        if backend not in _contexts:
            _contexts[backend] = Context(backend)
        return _contexts[backend]


def attention(q: Any, k: Any, v: Any, *, causal: bool = False, window: tuple[int, int] | None = None,
              scale: float | None = None, softcap: float | None = None, mask: Any = None, return_lse: bool = False,
              out: Any = None, backend: str = "auto") -> Any:
    """`Context.attention` on the shared context of `backend`."""
    return context(backend).attention(q, k, v, causal=causal, window=window, scale=scale, softcap=softcap,
                                      mask=mask, return_lse=return_lse, out=out)


def attention_varlen(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, *, backend: str = "auto",
                     **options: Any) -> Any:
    """`Context.attention_varlen` on the shared context of `backend`."""
    return context(backend).attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, **options)


def attention_with_kvcache(q: Any, k_cache: Any, v_cache: Any, cache_seqlens: Any, *, backend: str = "auto",
                           **options: Any) -> Any:
    """`Context.attention_with_kvcache` on the shared context of `backend`."""
    return context(backend).attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, **options)
