"""Facts from the configuration alone: the 11B and 90B shapes, parameters per component, memory estimates.

Nothing here needs weights: models are built on PyTorch's meta device, which allocates no memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

GIB = 1024**3
VISION = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8, attention_heads=16,
    image_size=560, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[3, 7, 15, 23, 30],
    vision_output_dim=7680,
)
TEXT_11B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
    num_key_value_heads=8, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], max_position_embeddings=131072,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)
TEXT_90B = dict(TEXT_11B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=100, num_attention_heads=64,
                cross_attention_layers=list(range(3, 100, 5)))
SHAPES = {"11b": TEXT_11B, "90b": TEXT_90B}
# bitsandbytes nf4 with double quantization: 4 bits a weight plus 0.127 bits of scales (blocks of 64,
# scales themselves quantized to 8 bits in blocks of 256).
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)


class ConfigNotFound(ValueError):
    """No Llama 3.2 Vision config for what was named (a size, a folder or a hub id)."""


def mllama_config(size: str = "11b"):
    """The MllamaConfig of Llama 3.2 Vision 11B or 90B, as published (vision encoder shared by both)."""
    from transformers import MllamaConfig

    if size.lower() not in SHAPES:
        raise ConfigNotFound(f"Unknown size {size!r}: choose 11b or 90b.")
    text = dict(SHAPES[size.lower()], bos_token_id=128000, eos_token_id=[128001, 128008, 128009], pad_token_id=128004)
    return MllamaConfig(vision_config=dict(VISION), text_config=text, image_token_index=128256)


def meta_model(config):
    """The full model with no memory behind its tensors."""
    import torch
    from transformers import MllamaForConditionalGeneration

    with torch.device("meta"):
        return MllamaForConditionalGeneration(config)


def _component(name: str, cross_layers: set[int]) -> str:
    if name.startswith("model.vision_model."):
        rest = name[len("model.vision_model."):]
        if rest.startswith("transformer."):
            return "vision: local encoder layers"
        if rest.startswith("global_transformer."):
            return "vision: global (gated) layers"
        return "vision: patch, position and tile embeddings"
    if name.startswith("model.multi_modal_projector."):
        return "projector (vision -> text)"
    if name.startswith("model.language_model.layers."):
        index = int(name.split(".")[3])
        return "text: cross-attention layers" if index in cross_layers else "text: self-attention layers"
    if name.startswith("model.language_model.embed_tokens"):
        return "text: token embeddings"
    if name.startswith("lm_head"):
        return "text: output head (lm_head)"
    return "text: final norm"


_CENSUS: dict[str, tuple["OrderedDict[str, int]", int]] = {}


def _census(config) -> tuple["OrderedDict[str, int]", int]:
    """Parameters per component and the 4-bit-quantizable Linear weights, from one meta-device build."""
    import torch

    key = config.to_json_string()
    if key not in _CENSUS:
        model = meta_model(config)
        cross = set(config.text_config.cross_attention_layers)
        counts: OrderedDict[str, int] = OrderedDict()
        for name, parameter in model.named_parameters():
            component = _component(name, cross)
            counts[component] = counts.get(component, 0) + parameter.numel()
        quantizable = sum(module.weight.numel() for name, module in model.named_modules()
                          if isinstance(module, torch.nn.Linear) and not name.startswith("lm_head"))
        _CENSUS[key] = (counts, quantizable)
    return _CENSUS[key]


def parameter_counts(config) -> "OrderedDict[str, int]":
    """Parameters per component, counted on the meta device."""
    return OrderedDict(_census(config)[0])


def quantizable_parameters(config) -> int:
    """Weights of the Linear layers that bitsandbytes turns 4-bit (all but lm_head)."""
    return _census(config)[1]


@dataclass
class MemoryEstimate:
    """Bytes of GPU memory for weights, caches and activations at one precision."""

    bits: float
    weights: float
    kv_cache: float
    cross_attention_cache: float
    vision_activations: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.cross_attention_cache + self.vision_activations

    def as_gib(self) -> dict[str, float]:
        return {"bits": self.bits, "weights": self.weights / GIB, "kv_cache": self.kv_cache / GIB,
                "cross_attention_cache": self.cross_attention_cache / GIB,
                "vision_activations": self.vision_activations / GIB, "total": self.total / GIB}


def vision_tokens(config, tiles: int | None = None) -> int:
    """Vision tokens a text layer cross-attends to: tiles x (patches + class token, padded to a multiple of 8)."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    patches += (8 - patches % 8) % 8
    return (tiles or vision.max_num_tiles) * patches


def estimate_memory(config, bits: float, *, context_tokens: int = 2048, batch: int = 1) -> MemoryEstimate:
    """GPU memory to run the model: weights at `bits` (4 = bitsandbytes nf4; embeddings and lm_head stay bf16),
    the self-attention KV cache for `context_tokens`, the cross-attention cache, and the vision encoder's
    peak activations for one 4-tile image (bf16)."""
    text = config.text_config
    total = sum(parameter_counts(config).values())
    if bits >= 16:
        weights = total * bits / 8
    else:
        quantized = quantizable_parameters(config)
        per_weight = NF4_BITS / 8 if bits == 4 else bits / 8
        weights = quantized * per_weight + (total - quantized) * 2
    head_dim = text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_key_value_heads * head_dim * 2  # keys and values, bf16
    self_layers = text.num_hidden_layers - len(text.cross_attention_layers)
    kv_cache = batch * context_tokens * self_layers * kv_per_token
    cross = batch * vision_tokens(config) * len(text.cross_attention_layers) * kv_per_token
    vision = config.vision_config
    tokens = vision_tokens(config)
    # residual stream + MLP hidden + the hidden states kept for the projector, bf16
    activations = batch * tokens * 2 * (4 * vision.hidden_size + vision.intermediate_size
                                        + vision.hidden_size * len(vision.intermediate_layers_indices))
    return MemoryEstimate(bits, weights, kv_cache, cross, activations)


def memory_table(size: str = "11b", bits_list=(16, 8, 4), **kwargs: Any) -> list[dict[str, float]]:
    """One estimate per precision, in GiB."""
    config = mllama_config(size)
    return [dict(size=size, **estimate_memory(config, b, **kwargs).as_gib()) for b in bits_list]


def load_config(model: str):
    """The MllamaConfig for '11b', '90b', a checkpoint folder or a hub id (only config.json is fetched)."""
    from transformers import MllamaConfig

    if model.lower() in SHAPES:
        return mllama_config(model)
    if model == "tiny-random":
        from .model import tiny_checkpoint_path

        model = str(tiny_checkpoint_path())
    try:
        return MllamaConfig.from_pretrained(model)
    except OSError as err:
        raise ConfigNotFound(f"No Mllama config for {model!r}: give 11b, 90b, a checkpoint folder or a reachable hub "
                         f"id ({str(err).splitlines()[0][:200]}).") from err


def fit_table(model: str, bits_list=(16, 8, 4), **kwargs: Any) -> str:
    """A Markdown table of the memory estimate at each precision, in GiB (and GB for the weights)."""
    config = load_config(model)
    header = "| bits | weights GiB | weights GB | KV cache GiB | cross-attn cache GiB | vision act. GiB | total GiB |"
    lines = [f"Memory estimate for {model} ({sum(parameter_counts(config).values()) / 1e9:.2f} B parameters):",
             "", header, "|---|---|---|---|---|---|---|"]
    for bits in bits_list:
        e = estimate_memory(config, bits, **kwargs)
        lines.append(f"| {bits:g} | {e.weights / GIB:.2f} | {e.weights / 1e9:.1f} | {e.kv_cache / GIB:.2f} | "
                     f"{e.cross_attention_cache / GIB:.2f} | {e.vision_activations / GIB:.2f} | {e.total / GIB:.2f} |")
    return "\n".join(lines)
