"""NumPy arrays and CPU torch tensors described to the C ABI in place: pointer, dtype, shape and
element strides. Nothing here copies an operand; only small masks of other float types are converted."""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import numpy as np

from . import _abi
from .errors import ArgumentError, DeviceError, DTypeError, ShapeError

_NUMPY_TYPES = {np.dtype(np.float32): _abi.FLOAT32, np.dtype(np.float16): _abi.FLOAT16, np.dtype(np.bool_): _abi.BOOL}
_NAMES = {_abi.FLOAT32: "float32", _abi.FLOAT16: "float16", _abi.BFLOAT16: "bfloat16", _abi.BOOL: "bool"}


def is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


_TORCH_TYPES: dict = {}


def _torch_types() -> dict:
    if not _TORCH_TYPES:
        import torch

        _TORCH_TYPES.update({torch.float32: _abi.FLOAT32, torch.float16: _abi.FLOAT16, torch.bfloat16: _abi.BFLOAT16,
                             torch.bool: _abi.BOOL})
    return _TORCH_TYPES


def dtype_code(x: Any, name: str, *, mask: bool = False) -> int:
    """The C storage type of an array, or a DTypeError naming the operand."""
    if is_torch(x):
        code = _torch_types().get(x.dtype)
        shown = str(x.dtype).replace("torch.", "")
    elif isinstance(x, np.ndarray):
        code = _NUMPY_TYPES.get(x.dtype)
        if code is None and x.dtype.name == "bfloat16" and x.dtype.itemsize == 2:  # ml_dtypes.bfloat16
            code = _abi.BFLOAT16
        shown = x.dtype.name
    else:
        raise TypeError(f"{name} must be a numpy.ndarray or a CPU torch.Tensor, got {type(x).__name__}")
    allowed = (_abi.BOOL, _abi.FLOAT32) if mask else (_abi.FLOAT32, _abi.FLOAT16, _abi.BFLOAT16)
    if code not in allowed:
        names = ", ".join(_NAMES[c] for c in allowed)
        raise DTypeError(f"{name}: dtype {shown} is not supported (one of {names})")
    return code


def check_device(x: Any, name: str) -> None:
    if is_torch(x) and x.device.type != "cpu":
        raise DeviceError(
            f"{name} is on {x.device}; AttentionKit's Python binding reads host memory: move it with .cpu() "
            "(OpenCL devices are chosen through the context's backend, e.g. Context('opencl:0'))"
        )


def check_rank(x: Any, name: str, rank: int) -> None:
    """A TypeError for anything but an array, a ShapeError for the wrong rank: before shapes are read."""
    if not (is_torch(x) or isinstance(x, np.ndarray)):
        raise TypeError(f"{name} must be a numpy.ndarray or a CPU torch.Tensor, got {type(x).__name__}")
    if len(x.shape) != rank:
        raise ShapeError(f"{name} must have rank {rank}, got shape {list(x.shape)}")


def describe(x: Any, name: str, rank: int | tuple[int, ...], *, mask: bool = False,
             writable: bool = False) -> _abi.Tensor:
    """The C descriptor of `x` (no copy). `x` must stay alive while the descriptor is used."""
    check_device(x, name)
    if writable and isinstance(x, np.ndarray) and not x.flags.writeable:
        raise ArgumentError(f"{name} is a read-only array")
    if is_torch(x) and x.requires_grad:
        import torch

        if torch.is_grad_enabled():
            raise ArgumentError(
                f"{name} requires grad: AttentionKit computes the forward pass only (no backward); "
                "call it under torch.no_grad() or torch.inference_mode()"
            )
    code = dtype_code(x, name, mask=mask)
    ranks = (rank,) if isinstance(rank, int) else rank
    shape = tuple(x.shape)
    if len(shape) not in ranks:
        expected = " or ".join(str(r) for r in ranks)
        raise ShapeError(f"{name} must have rank {expected}, got shape {list(shape)}")
    if is_torch(x):
        strides = tuple(x.stride())
        address = x.data_ptr()
    else:
        itemsize = x.dtype.itemsize
        if any(s % itemsize for s in x.strides):
            raise ShapeError(f"{name}: strides {x.strides} (bytes) are not whole elements of {itemsize} bytes")
        strides = tuple(s // itemsize for s in x.strides)
        address = x.ctypes.data
    t = _abi.Tensor()
    t.data = address or None
    t.dtype = code
    t.rank = len(shape)
    for i, (n, s) in enumerate(zip(shape, strides)):
        t.shape[i] = n
        t.strides[i] = s
    return t


def as_mask(mask: Any, kind_of: Any) -> Any:
    """A mask as bool or float32 (other float types converted once: masks are Nq x Nk at most per
    batch and head), as an array of the same kind as the operands when given as a Python list."""
    if not (is_torch(mask) or isinstance(mask, np.ndarray)):
        mask = np.asarray(mask)
    check_device(mask, "mask")
    if is_torch(mask):
        import torch

        if mask.dtype not in (torch.bool, torch.float32):
            if not mask.dtype.is_floating_point:
                raise DTypeError(f"mask: dtype {str(mask.dtype).replace('torch.', '')} (bool or floating point)")
            mask = mask.to(torch.float32)
    elif mask.dtype not in (np.dtype(np.bool_), np.dtype(np.float32)):
        if mask.dtype.kind != "f" and mask.dtype.name != "bfloat16":
            raise DTypeError(f"mask: dtype {mask.dtype.name} (bool or floating point)")
        mask = mask.astype(np.float32)
    return mask


def empty_like_kind(reference: Any, shape: tuple[int, ...], dtype: Any = None, *, float32: bool = False) -> Any:
    """A new array of `shape`, of the same kind (NumPy or torch) as `reference`, of its dtype unless
    `float32`."""
    if is_torch(reference):
        import torch

        return torch.empty(shape, dtype=torch.float32 if float32 else (dtype or reference.dtype))
    return np.empty(shape, dtype=np.float32 if float32 else (dtype or reference.dtype))


def float_pointer(x: Any) -> Any:
    """A float* to a dense float32 array (the log-sum-exp buffer)."""
    address = x.data_ptr() if is_torch(x) else x.ctypes.data
    return ctypes.cast(ctypes.c_void_p(address), ctypes.POINTER(ctypes.c_float))


def int32_array(values: Any, name: str) -> np.ndarray:
    """A dense int32 copy of offsets, lengths or a block table (small; torch or NumPy or a list)."""
    if is_torch(values):
        check_device(values, name)
        values = values.detach().numpy()
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise DTypeError(f"{name}: integer values expected, got dtype {array.dtype.name}")
    if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
        raise ShapeError(f"{name}: values beyond int32")
    return np.ascontiguousarray(array, dtype=np.int32)


def int32_pointer(array: np.ndarray) -> Any:
    return array.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
