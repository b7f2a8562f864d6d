"""ctypes mirror of Sources/CAttentionKitABI/include/attentionkit.h (ABI version 1).

The struct layouts are checked against the header's `_Static_assert`s by the tests (sizes and offsets).
"""

from __future__ import annotations

import ctypes
import os
import pathlib

ABI_VERSION = 1

# attentionkit_status
OK = 0
INVALID_ARGUMENT = 1
INVALID_SHAPE = 2
INVALID_DTYPE = 3
INVALID_OPTION = 4
UNSUPPORTED = 5
BACKEND_FAILURE = 6
INVALID_CONFIGURATION = 7

# attentionkit_dtype
FLOAT32 = 0
FLOAT16 = 1
BFLOAT16 = 2
BOOL = 3

# attentionkit_sequence_form
VARLEN = 1
CACHE_LENGTHS = 2
PAGED = 3


class Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int32),
        ("rank", ctypes.c_int32),
        ("shape", ctypes.c_int64 * 4),
        ("strides", ctypes.c_int64 * 4),
    ]


class Options(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("causal", ctypes.c_int32),
        ("window_left", ctypes.c_int64),
        ("window_right", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("softcap", ctypes.c_float),
        ("mask", ctypes.POINTER(Tensor)),
    ]


class ContextOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("backend", ctypes.c_char_p),
        ("threads", ctypes.c_int32),
        ("cpu_isa", ctypes.c_char_p),
        ("use_environment", ctypes.c_int32),
    ]


class Sequences(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("form", ctypes.c_int32),
        ("count", ctypes.c_int64),
        ("query_offsets", ctypes.POINTER(ctypes.c_int32)),
        ("key_offsets", ctypes.POINTER(ctypes.c_int32)),
        ("lengths", ctypes.POINTER(ctypes.c_int32)),
        ("block_table", ctypes.POINTER(ctypes.c_int32)),
        ("max_pages", ctypes.c_int64),
    ]


def _candidates() -> list[pathlib.Path]:
    """Where libAttentionKitC.so may be: $ATTENTIONKIT_LIBRARY, inside the installed package, or the
    release build of the repository this package sits in (running from a checkout)."""
    here = pathlib.Path(__file__).resolve().parent
    names = ["libAttentionKitC.so", "libAttentionKitC.dylib"]
    found: list[pathlib.Path] = []
    explicit = os.environ.get("ATTENTIONKIT_LIBRARY")
    if explicit:
        found.append(pathlib.Path(explicit))
    found += [here / "_lib" / name for name in names]
    found += [here.parent.parent / ".build" / "release" / name for name in names]
    return found


def load() -> tuple[ctypes.CDLL, pathlib.Path]:
    tried = []
    for path in _candidates():
        if path.is_file():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as error:  # a broken file or a missing dependency: say which
                raise ImportError(f"attentionkit: cannot load {path}: {error}") from error
            _declare(lib)
            abi = lib.attentionkit_abi_version()
            if abi != ABI_VERSION:
                raise ImportError(f"attentionkit: {path} has C ABI version {abi}, this package needs {ABI_VERSION}")
            return lib, path
        tried.append(str(path))
    raise ImportError(
        "attentionkit: libAttentionKitC.so not found (tried: " + ", ".join(tried) + "). "
        "Install with `scripts/install-python`, build it with `swift build -c release --product AttentionKitC`, "
        "or point ATTENTIONKIT_LIBRARY at it."
    )


def _declare(lib: ctypes.CDLL) -> None:
    T = ctypes.POINTER(Tensor)
    lib.attentionkit_version.restype = ctypes.c_uint32
    lib.attentionkit_version.argtypes = []
    lib.attentionkit_version_string.restype = ctypes.c_char_p
    lib.attentionkit_version_string.argtypes = []
    lib.attentionkit_abi_version.restype = ctypes.c_uint32
    lib.attentionkit_abi_version.argtypes = []
    lib.attentionkit_context_create.restype = ctypes.c_int
    lib.attentionkit_context_create.argtypes = [ctypes.POINTER(ContextOptions), ctypes.POINTER(ctypes.c_void_p)]
    lib.attentionkit_context_free.restype = None
    lib.attentionkit_context_free.argtypes = [ctypes.c_void_p]
    for name in ("attentionkit_last_error", "attentionkit_last_backend", "attentionkit_last_reason"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.attentionkit_attention.restype = ctypes.c_int
    lib.attentionkit_attention.argtypes = [
        ctypes.c_void_p, T, T, T, T, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(Options)]
    lib.attentionkit_attention_sequences.restype = ctypes.c_int
    lib.attentionkit_attention_sequences.argtypes = [
        ctypes.c_void_p, ctypes.POINTER(Sequences), T, T, T, T, ctypes.POINTER(ctypes.c_float),
        ctypes.POINTER(Options)]
