"""Exceptions raised by attentionkit. Each C status has its own class; all derive from
AttentionKitError and from the built-in exception a Python user would expect."""

from __future__ import annotations

from . import _abi


class AttentionKitError(Exception):
    """Any error reported by AttentionKit. `status` is the C status code, when it came from C."""

    status: int | None = None


class ArgumentError(AttentionKitError, ValueError):
    """A missing or malformed argument."""


class ShapeError(AttentionKitError, ValueError):
    """Ranks, shapes, head counts, strides, overlapping outputs, offsets, lengths, page tables."""


class DTypeError(AttentionKitError, TypeError):
    """A storage type an operand cannot have."""


class OptionError(AttentionKitError, ValueError):
    """Scale, softcap, window or mask values outside the contract."""


class DeviceError(AttentionKitError, ValueError):
    """An operand on a device the binding cannot read (e.g. a CUDA tensor)."""


class UnsupportedError(AttentionKitError, RuntimeError):
    """The chosen backend cannot run this problem."""


class BackendError(AttentionKitError, RuntimeError):
    """The backend failed while running."""


class ConfigurationError(AttentionKitError, ValueError):
    """An unknown backend or instruction set, or a device this machine lacks."""


_BY_STATUS = {
    _abi.INVALID_ARGUMENT: ArgumentError,
    _abi.INVALID_SHAPE: ShapeError,
    _abi.INVALID_DTYPE: DTypeError,
    _abi.INVALID_OPTION: OptionError,
    _abi.UNSUPPORTED: UnsupportedError,
    _abi.BACKEND_FAILURE: BackendError,
    _abi.INVALID_CONFIGURATION: ConfigurationError,
}


def from_status(status: int, message: str) -> AttentionKitError:
    error = _BY_STATUS.get(status, AttentionKitError)(message)
    error.status = status
    return error
