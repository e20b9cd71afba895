"""Window attention with a learned relative position bias, on the fastest path for the device and dtype.

Both Swin encoders (SimMIM's, through timm's ``WindowAttention``, and MixMIM's) call :func:`window_attention`
with ``q, k, v`` (B * nW, heads, N, D) of B images' windows (batch-major), the bias (heads, N, N) and an
optional additive per-window mask (nW, N, N): Swin's -100 shift mask or MixMIM's 0/-inf same-image mask.
The mask is broadcast over the batch and the heads, never materialised per window of the batch, except
for ``F.scaled_dot_product_attention``, which takes one 4-D mask.

Paths (issue #19, measured in ``docs/benchmarks.md``):

- ``sdpa``: ``F.scaled_dot_product_attention`` with ``bias (+ mask)`` as its float mask. On CUDA the
  memory-efficient kernel handles a learned bias (it returns the bias gradient). On the CPU no fused kernel
  takes a mask that needs a gradient, so SDPA falls back to its *math* path there, which adds dispatch and
  copies and, for bf16 inputs, upcasts to fp32.
- ``explicit``: ``softmax(q * scale @ k^T + bias + mask) @ v`` in the input dtype (timm's and the official
  code's form); the scores become fp32 when the fp32 bias is added, so the softmax runs in fp32.
- ``explicit_fp32``: the same with q, k, v upcast to fp32 and autocast off inside, the output cast back:
  for bf16 on CPUs without native bf16 matrix units (AVX2 only), where a bf16 batched matmul is about 10x
  slower than an fp32 one.

:func:`attention_path` picks ``explicit`` for bf16/fp16 on CPUs with AVX512-BF16 or AMX (there the issue
measured SDPA's fp32-upcasting math path 1.2x slower than the official explicit softmax over a whole SimMIM
Swin-B step) and ``sdpa`` everywhere else: CUDA, and on the CPU fp32 and bf16 without native bf16 units,
where whole-encoder steps measured no gain from the explicit forms (attention is about 5 % of a Swin-B step
at window 6; at MixMIM's window 14 the explicit fp32 form measured slower). :func:`set_attention_path`
forces one (the pinned-numerics tests run all three). The same-image restriction is exact on every path and dtype: ``-inf``
scores get exactly zero weight (a token always attends to itself, so no row is all ``-inf``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATHS = ("sdpa", "explicit", "explicit_fp32")


def _native_reduced_precision_cpu() -> bool:
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch: assume the common case of no native bf16
        return False


#: Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX); read once at import.
NATIVE_BF16_CPU = _native_reduced_precision_cpu()
_forced: str | None = None


def set_attention_path(path: str | None) -> str | None:
    """Force ``path`` (one of :data:`PATHS`) for every window attention, or None for the automatic choice.
    Returns the previous setting."""
    global _forced
    if path is not None and path not in PATHS:
        raise ValueError(f"attention path {path!r}: one of {', '.join(PATHS)} or None")
    previous, _forced = _forced, path
    return previous


def attention_path(device: torch.device, dtype: torch.dtype) -> str:
    """The path used for inputs on ``device`` in ``dtype`` (see the module docstring)."""
    if _forced is not None:
        return _forced
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and NATIVE_BF16_CPU:
        return "explicit"
    return "sdpa"


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention in windows: q, k, v (B * nW, H, N, D); ``bias`` (H, N, N) or (1, H, N, N), added to the
    scaled scores; ``mask`` (nW, N, N) additive (0, -100 or -inf), the same for every image. -> (B * nW, H, N, D)."""
    windows, heads, n, dim = q.shape
    bias = bias.reshape(1, heads, n, n)
    if mask is not None:
        mask = mask.reshape(mask.shape[0], 1, n, n)
        bias = bias + mask  # (nW, H, N, N): small, made once per block
    path = attention_path(q.device, q.dtype)
    if path == "sdpa":
        attn_mask = bias
        if mask is not None:
            groups = bias.shape[0]
            attn_mask = bias.unsqueeze(0).expand(windows // groups, -1, -1, -1, -1).reshape(windows, heads, n, n)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), scale=scale)
    scale = dim ** -0.5 if scale is None else scale
    dtype = q.dtype
    if path == "explicit_fp32" and dtype != torch.float32:
        with torch.autocast(q.device.type, enabled=False):
            out = _explicit(q.float(), k.float(), v.float(), bias.float(), scale)
        return out.to(dtype)
    return _explicit(q, k, v, bias, scale)


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    windows, heads, n, _ = q.shape
    scores = (q * scale) @ k.transpose(-2, -1)  # (B * nW, H, N, N)
    groups = bias.shape[0]
    # broadcast the (nW or 1, H, N, N) bias over the images; the sum is fp32 when the bias is (fp32 table)
    scores = (scores.view(windows // groups, groups, heads, n, n) + bias).view(windows, heads, n, n)
    attn = scores.softmax(dim=-1)
    return attn.to(v.dtype) @ v
