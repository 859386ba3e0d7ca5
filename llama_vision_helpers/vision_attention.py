"""The vision encoder's attention, split along its mask so that nearly every row goes to the fastest kernel.

Mllama's vision encoder attends over all the tiles of an image at once (4 tiles: 6,432 positions) with a mask that
hides key j from query i only when both are padding: the 7 padding patches of every tile, and every patch of a tile
the image does not fill. With a mask, `scaled_dot_product_attention` cannot use flash attention; on an H200 the
masked kernel took 47 of the 80 ms of a 4-tile image's prefill (`tools/gpu_run.sh prefill`). But the rows of real
patches are not masked at all, so here they are computed without the mask, and the few padding rows, which see only
the real keys, apart. Same results as the masked attention up to float rounding; any other mask goes to transformers'
own `sdpa` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "mllama_vision_split"  # the attention implementation's name in transformers' AttentionInterface
FEW_ROWS = 256  # padding rows of an image (7 a tile when every tile is used) computed as products, not fused
_CACHED = "_split_mask_padding"  # where a mask keeps what was read from it: every layer of a forward pass shares it


def padding_positions(mask: torch.Tensor) -> list[tuple[torch.Tensor, int] | None] | None:
    """For an additive float mask (batch, 1, L, L) that is 0 everywhere but one negative value on exactly the
    (padding, padding) pairs: per image, the indices of its padding positions and the first of them (None for an
    image without padding). None for any other mask. Read once per mask (transformers builds one per forward pass)."""
    if hasattr(mask, _CACHED):
        return getattr(mask, _CACHED)
    result = None
    if mask.is_floating_point() and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == mask.shape[3]:
        padding = (mask[:, 0] < 0).diagonal(dim1=-2, dim2=-1)
        pattern = padding[:, :, None] & padding[:, None, :]
        if torch.equal(mask[:, 0], torch.where(pattern, mask.min(), 0.0)):
            result = []
            for row in padding:
                rows = row.nonzero().squeeze(1)
                result.append((rows, int(rows[0])) if rows.numel() else None)
    setattr(mask, _CACHED, result)
    return result


def split_mask_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """An attention function for transformers (`AttentionInterface`): query/key/value (batch, heads, L, head_dim);
    returns (batch, L, heads, head_dim) as `sdpa_attention_forward` does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    padding = None
    if (attention_mask is not None and not dropout and attention_mask.shape[0] == query.shape[0]
            and attention_mask.shape[-1] == key.shape[-2] and not (torch.is_grad_enabled() and query.requires_grad)):
        padding = padding_positions(attention_mask)  # (written in place below, so not where gradients are wanted)
    if padding is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, scale=scaling)  # rows of real patches: no mask at all
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    for image, positions in enumerate(padding):
        if positions is None:
            continue
        rows, first = positions  # padding rows see the real keys only: any padding row of the mask says which
        rows_query, one_key, one_value = query[image:image + 1, :, rows], key[image:image + 1], value[image:image + 1]
        key_mask = attention_mask[image:image + 1, :, first:first + 1]  # (1, 1, 1, L)
        if len(rows) <= FEW_ROWS:
            part = _few_rows_attention(rows_query[0], one_key[0], one_value[0], key_mask[0, 0], scale)
        else:
            part = F.scaled_dot_product_attention(rows_query, one_key, one_value, key_mask, scale=scale)[0]
        out[image].index_copy_(1, rows, part)
    return out.transpose(1, 2).contiguous(), None


def _few_rows_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Attention of a few rows (heads, rows, head_dim) over every key as three batched products. A fused kernel
    gives each head's few rows to one multiprocessor, which then walks all 6,432 keys alone; a product spreads the
    keys over the whole GPU. Scores and softmax in float32 (as in a fused kernel), probabilities times values in
    the inputs' precision."""
    scores = None
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        try:  # a float32 result from half-precision inputs, without float copies: CUDA, torch >= 2.8
            scores = torch.bmm(query, key.transpose(1, 2), out_dtype=torch.float32)
        except TypeError:
            pass
    if scores is None:
        scores = torch.bmm(query.float(), key.transpose(1, 2).float())
    probs = torch.softmax(scores.mul_(scale).add_(key_mask), dim=-1)
    return torch.bmm(probs.to(value.dtype), value)


def use_split_mask_attention(model: Any) -> bool:
    """Switch a loaded Mllama model's vision encoder to `split_mask_attention` where it used transformers' `sdpa`.
    Returns whether it did."""
    from transformers import AttentionInterface

    vision = getattr(getattr(model, "model", None), "vision_model", None)
    config = getattr(vision, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, split_mask_attention)
    config._attn_implementation = NAME
    return True
