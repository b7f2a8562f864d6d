"""AttentionKit as an attention implementation of Hugging Face transformers.

    import attentionkit.transformers
    attentionkit.transformers.register()
    model = AutoModel.from_pretrained(name, attn_implementation="attentionkit")

Every attention layer then runs through AttentionKit: GQA without repeating K/V, causal and padding
masks (transformers builds them in SDPA's format: None when causal alone suffices, else a boolean
[B, 1, Nq, Nk]), sliding windows, softcap, the model's own KV cache during `generate()`, and the
output written straight into the [B, N, H, D] layout the model wants. Calls AttentionKit cannot
serve (training with gradients or dropout, `output_attentions`, tensors on another device, position
biases, a mask that does not broadcast) run the model's eager path instead, and a warning says so
once per reason.
"""

from __future__ import annotations

import sys
import threading
import warnings
from typing import Any

import torch

from . import AttentionKitError, Context

NAME = "attentionkit"

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(reason: str) -> None:
    with _warned_lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(f"attentionkit: {reason}; running the eager attention path for such calls", stacklevel=4)


def _unsupported(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
                 kwargs: dict) -> str | None:
    """Why AttentionKit cannot serve this call, or None."""
    if query.device.type != "cpu":
        return f"tensors on {query.device} (the Python binding reads host memory)"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return "gradients are required (AttentionKit has no backward pass)"
    if kwargs.get("dropout", 0.0) and getattr(module, "training", False):
        return "attention dropout in training"
    if kwargs.get("output_attentions"):
        return "output_attentions=True (AttentionKit never forms the attention matrix)"
    if kwargs.get("position_bias") is not None:
        return "a position bias"
    if kwargs.get("cache") is not None:
        return "a paged cache of continuous batching"
    allowed = (torch.float32, torch.float16, torch.bfloat16)
    if query.dtype not in allowed or key.dtype not in allowed or value.dtype not in allowed:
        return f"dtype {query.dtype}"
    if mask is not None and not isinstance(mask, torch.Tensor):
        return f"a mask of type {type(mask).__name__}"
    return None


def _explicit_mask(query: torch.Tensor, key: torch.Tensor, mask: Any, causal: bool, window: int | None) -> Any:
    """The additive float mask the eager path expects, for the cases AttentionKit hands back: a
    boolean mask becomes 0 / dtype-min; no mask with causal=True becomes the causal (and window)
    pattern transformers' SDPA path would apply."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None:
        if not causal:
            return None
        offset = kv_len - q_len if (q_len == 1 or kv_len == q_len) else 0
        i = torch.arange(q_len, device=query.device)[:, None] + offset
        j = torch.arange(kv_len, device=query.device)[None, :]
        allowed = j <= i
        if window:
            allowed &= j > i - window
        mask = allowed[None, None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    return mask


def _eager(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, causal: bool,
           kwargs: dict) -> tuple[torch.Tensor, Any]:
    model_module = sys.modules.get(type(module).__module__)
    eager = getattr(model_module, "eager_attention_forward", None)
    if eager is None:  # a model without its own eager function: transformers' SDPA path takes this mask format
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    eager_mask = _explicit_mask(query, key, mask, causal, kwargs.get("sliding_window"))
    return eager(module, query, key, value, eager_mask, **kwargs)


def make_attention_function(context: Context) -> Any:
    """The `AttentionInterface` function running on `context`."""

    def attentionkit_attention_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                       attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        causal = bool(is_causal) and attention_mask is None
        reason = _unsupported(module, query, key, value, attention_mask, kwargs)
        if reason is not None:
            _warn_once(reason)
            return _eager(module, query, key, value, attention_mask, causal, kwargs)

        q_len, kv_len = query.shape[2], key.shape[2]
        k, v, mask = key, value, attention_mask
        if causal and q_len > 1 and kv_len > q_len:
            # No mask with more keys than queries: a prefill into an empty static cache (transformers
            # skips the mask only then); the keys past the prompt are empty slots.
            k, v = key[:, :, :q_len], value[:, :, :q_len]
        if mask is not None and mask.shape[-1] > kv_len:
            mask = mask[..., :kv_len]
        # A mask from transformers already holds the window (and whatever else the model needs, e.g.
        # bidirectional image tokens): the window applies only where there is no mask.
        sliding_window = kwargs.get("sliding_window")
        window = (int(sliding_window) - 1, 0) if sliding_window and mask is None else None
        batch, heads, _, dv = query.shape[0], query.shape[1], query.shape[2], value.shape[3]
        output = torch.empty((batch, q_len, heads, dv), dtype=query.dtype)
        try:
            context.attention(query, k, v, causal=causal, window=window, scale=kwargs.get("scaling"),
                              softcap=kwargs.get("softcap"), mask=mask, out=output.permute(0, 2, 1, 3))
        except AttentionKitError as error:
            _warn_once(f"AttentionKit refused a call ({error})")
            return _eager(module, query, key, value, attention_mask, causal, kwargs)
        return output, None

    return attentionkit_attention_forward


def register(name: str = NAME, backend: str = "auto", *, threads: int = 0) -> Context:
    """Registers `name` as an attention implementation (and its mask format, SDPA's) with
    transformers, running on a context of `backend`. Returns that context (its `last_backend` and
    `last_reason` say what ran)."""
    context = Context(backend, threads=threads)
    register_context(context, name)
    return context


def register_context(context: Context, name: str = NAME) -> None:
    """Registers `name` to run on an existing context."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, make_attention_function(context))
    AttentionMaskInterface.register(name, sdpa_mask)
