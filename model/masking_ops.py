"""The `fused_masking` switch: the reference masking stages (`model.masking`) or their fused Triton twins
(`model.kernels`), as one `MaskingOps` set with the same signatures.

The switch lives here, not beside either implementation, so that neither imports the other: this module imports
both (the kernels lazily: Triton is only needed when the fused path is used).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from model import masking


class MaskingOps(NamedTuple):
    """The three masking stages; reference and fused implementations share these signatures."""

    name: str
    gather_visible_patches: Callable
    unshuffle_decoder_tokens: Callable
    masked_patch_loss: Callable


REFERENCE_OPS = MaskingOps("reference", masking.gather_visible_patches, masking.unshuffle_decoder_tokens,
                           masking.masked_patch_loss)


_FUSED_OPS: MaskingOps | None = None


def fused_ops() -> MaskingOps:
    """The fused Triton set (one object for the process, so `ops is fused_ops()` identifies it).

    Cached in a module global rather than with functools.cache: the model resolves its ops inside the forward pass,
    which torch.compile traces, and dynamo guards on a global but only warns about a cache wrapper.
    """
    global _FUSED_OPS
    if _FUSED_OPS is None:
        from model import kernels

        _FUSED_OPS = MaskingOps("fused", kernels.gather_visible_patches, kernels.unshuffle_decoder_tokens,
                                kernels.masked_patch_loss)
    return _FUSED_OPS


def masking_ops(mode: str, device: torch.device) -> MaskingOps:
    """Resolve the `fused_masking` switch: "auto" = fused on CUDA, reference elsewhere; "on"; "off"."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return REFERENCE_OPS
    if mode not in ("auto", "on"):
        raise ValueError(f"fused_masking must be 'auto', 'on' or 'off', got {mode!r}")
    return fused_ops()
