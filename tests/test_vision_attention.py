"""The vision encoder's split attention computes what transformers' masked `sdpa` computes."""

import pytest
import torch
from PIL import Image

from llama_vision_helpers import vision_attention
from llama_vision_helpers.generation import prepare_inputs, user_message
from llama_vision_helpers.vision_attention import NAME, padding_positions, split_mask_attention


@pytest.fixture
def images(vlm):
    """Inputs for three images at once: two wide ones that leave a tile empty, a square one that fills all four."""
    noise = Image.effect_noise((240, 110), 60).convert("RGB")
    parts = [prepare_inputs(vlm, [user_message("Describe.", True)], image)
             for image in (Image.new("RGB", (240, 110), "white"), noise.resize((100, 100)), noise)]
    inputs = {name: torch.cat([part[name] for part in parts]) for name in parts[0].keys()}
    assert inputs["aspect_ratio_mask"].sum(-1).flatten().tolist() == [3, 4, 3]  # two with an empty tile
    return inputs


def vision_states(vlm, inputs, implementation: str) -> torch.Tensor:
    config = vlm.model.model.vision_model.config
    saved, config._attn_implementation = config._attn_implementation, implementation
    try:
        with torch.inference_mode():
            return vlm.model.model.vision_model(
                pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
    finally:
        config._attn_implementation = saved


def test_load_model_uses_the_split_attention(vlm):
    assert vlm.model.model.vision_model.config._attn_implementation == NAME


@pytest.mark.parametrize("few_rows", [vision_attention.FEW_ROWS, 0], ids=["as-products", "fused-masked"])
def test_split_attention_equals_masked_sdpa_with_and_without_empty_tiles(vlm, images, few_rows, monkeypatch):
    monkeypatch.setattr(vision_attention, "FEW_ROWS", few_rows)  # padding rows by either way
    split, masked = vision_states(vlm, images, NAME), vision_states(vlm, images, "sdpa")
    assert split.shape == masked.shape
    torch.testing.assert_close(split, masked, atol=1e-5, rtol=1e-5)


def test_the_padding_is_read_from_the_mask():
    padding = torch.tensor([[False, False, True, True], [False, False, False, False]])
    (rows, first), none = padding_positions(mask_for(padding))
    assert rows.tolist() == [2, 3] and first == 2 and none is None


def test_split_attention_is_used_for_the_vision_encoder_s_mask(vlm, images):
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask

    vision = vlm.model.model.vision_model
    tiles = images["aspect_ratio_mask"].reshape(3, -1)  # three images of four tiles, 17 patches a tile padded to 24
    mask = _prepare_aspect_ratio_attention_mask(tiles, vision.num_patches, target_length=24, dtype=torch.float32)
    padding = padding_positions(mask)
    assert [None if p is None else p[0].numel() for p in padding] == [7 * 3 + 24, 7 * 4, 7 * 3 + 24]


def mask_for(padding: torch.Tensor) -> torch.Tensor:
    return (padding[:, :, None] & padding[:, None, :]).float()[:, None] * torch.finfo(torch.float32).min


def test_any_other_mask_goes_to_transformers_sdpa():
    causal = torch.full((4, 4), torch.finfo(torch.float32).min).triu(1)[None, None]
    padding = torch.tensor([[False, True, True, False]])
    bias = mask_for(padding)
    bias[0, 0, 0, 0] = 0.5  # a bias that is not 0 where nothing is hidden
    two_values = mask_for(padding)
    two_values[0, 0, 1, 1] = -1.0  # hidden, but not with the one value
    for other in (causal, mask_for(padding) < 0, bias, two_values):
        assert padding_positions(other) is None
    query, key, value = (torch.randn(1, 2, 4, 8) for _ in range(3))
    module = torch.nn.Module()
    out, _ = split_mask_attention(module, query, key, value, causal, scaling=0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=0.5)
    torch.testing.assert_close(out, expected.transpose(1, 2))
