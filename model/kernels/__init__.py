"""Fused Triton twins of the three masking stages of `model.masking` (same call signatures, same meaning).

    gather_visible_patches(images, ids_keep, patch_size, pixel_scale, pixel_shift, out_dtype) -> (N, K, p*p*C)
    unshuffle_decoder_tokens(x, ids_keep, mask_token, pos_embed)                             -> (N, 1+L, D)
    masked_patch_loss(pred, images, mask, patch_size, norm_pix_loss, pixel_scale, pixel_shift) -> () fp32

Each is a `torch.library.custom_op` (namespace `supmae`) with a fake (meta) implementation and, where gradients
flow, a registered autograd formula whose backward is itself a custom op: torch.compile keeps them in the graph as
opaque kernels without graph breaks. Layouts, contiguity and numerics: docs/kernels.md and each module's docstring.

The kernels run on CUDA tensors; on CPU only under the Triton interpreter (TRITON_INTERPRET=1 set before this
package is imported), which the tests use. `model.masking_ops.masking_ops` selects these with `fused_masking`.
"""

from __future__ import annotations

from model.kernels._common import INTERPRETED
from model.kernels.gather import gather_visible_patches
from model.kernels.loss import masked_patch_loss
from model.kernels.unshuffle import unshuffle_decoder_tokens

__all__ = ["INTERPRETED", "gather_visible_patches", "masked_patch_loss", "unshuffle_decoder_tokens"]
