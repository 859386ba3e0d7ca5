"""Random-weight Mllama checkpoints, built offline, that load through the real `from_pretrained` path.

`build_tiny_checkpoint`: a tiny model whose answers are noise, so that the tokenizer, chat template, image
tiling, generation, streaming, parsing and scoring can all run (and be tested) on a CPU with no downloads.
`build_random_checkpoint`: the full 11B or 90B shape with random weights, for speed and memory benchmarks
(which do not depend on the weights' values).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from .prompt_format import CHAT_TEMPLATE, SPECIAL_TOKENS

# Tile size 56 with 14-px patches gives 4x4 patches a tile; the real model uses 560 px (40x40).
TILE_SIZE = 56
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
BPE_VOCAB_SIZE = 512
BUILD_VERSION = 5  # bump when the recipe changes so cached copies are rebuilt
# A fresh Mllama's cross-attention gates are zero, so its image would change nothing; the tiny model opens them,
# so that tests of the image's path (its keys and values in every decode loop) can fail.
TINY_GATE = 0.5

_CORPUS = """
Describe the image accurately. The photo shows a cat sitting on a wooden table next to a window.
Extract the receipt as JSON with the store, date, time, items, quantity, price, subtotal, tax and total.
{"store": "Corner Market", "date": "2024-03-15", "time": "14:32", "items": [{"name": "Milk", "quantity": 2,
"price": 3.49}], "subtotal": 6.98, "tax": 0.56, "total": 7.54}
What operation is shown on the calculator display? What is the result? 12 + 7 = 19, 144 / 12 = 12.
Write the LaTeX for the equation in the image. $$\\frac{a}{b} + \\sum_{i=1}^{n} x_i = \\int_0^1 f(x)\\,dx$$
\\begin{equation} \\alpha + \\beta = \\gamma \\end{equation} \\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}
What time does the watch show? The time is 10:10. It is ten past ten, quarter to three, half past seven, noon.
How many more people ride a car than walk? Sort the companies by revenue. The invoice is due in 30 days.
Count the red circles and the blue squares, then subtract. There are 4 shapes left. The chart shows 42%.
The quick brown fox jumps over the lazy dog. 0123456789 one two three four five six seven eight nine ten.
Please provide a caption for the image. Help me understand the revenue shown in this chart and sort the items.
Please walk through your reasoning step by step to arrive at the solution. **Step 1: Identify the number.**
Therefore, the answer is **36**. The invoice date and the due date are 30 days apart. Company A and Company B.
"""


# Every character the tiny model can write: printable ASCII, the line break, and the few other characters our
# prompts and inputs use. Tokens are made only of whole characters from this set, so whatever the random weights
# pick, the text reads (as noise) with no broken characters (U+FFFD) and no control characters.
TEXT_ALPHABET = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n" + "×÷−–—’‘“”•°€£é"
UNKNOWN_TOKEN = "<|unknown|>"  # stands for any other character in a prompt; decoded as nothing
# Words with the space before them, runs of digits one at a time, punctuation runs, line breaks (GPT-2's split).
_PRE_TOKENIZE = r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\n+| +"


def _build_tokenizer(path: Path) -> None:
    """A BPE tokenizer over whole printable characters (TEXT_ALPHABET) trained on a fixed corpus, with Llama
    3.2's special tokens after it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=UNKNOWN_TOKEN))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_PRE_TOKENIZE), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # tokens are literal text: decoding joins them as they are
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=list(TEXT_ALPHABET),
        limit_alphabet=len(TEXT_ALPHABET),
        special_tokens=[UNKNOWN_TOKEN],
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS.values()))
    # Like Llama's tokenizer, it adds <|begin_of_text|> unless told not to (add_special_tokens=False).
    bos = SPECIAL_TOKENS["bos"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))],
    )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eot"],
        pad_token=SPECIAL_TOKENS["pad"],
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def _token_id(path: Path, token: str) -> int:
    vocab = json.loads((path / "tokenizer.json").read_text())["added_tokens"]
    return next(t["id"] for t in vocab if t["content"] == token)


def tiny_config(vocab_size: int, image_token_index: int, bos: int, eos: list[int], pad: int):
    """The tiny architecture: every quantizable layer is at least 64 wide so bitsandbytes 4-bit runs on CPU."""
    from transformers import MllamaConfig

    vision_hidden = 64
    intermediate_layers = [0, 1]
    return MllamaConfig(
        vision_config=dict(
            hidden_size=vision_hidden,
            intermediate_size=128,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=4,
            image_size=TILE_SIZE,
            patch_size=14,
            max_num_tiles=4,
            intermediate_layers_indices=intermediate_layers,
            vision_output_dim=vision_hidden * (len(intermediate_layers) + 1),
        ),
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            cross_attention_layers=[1, 3],
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        ),
        image_token_index=image_token_index,
    )


def build_tiny_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random Mllama checkpoint (weights, tokenizer, processor, chat template) to `path`.

    The same `seed` gives the same weights. Returns the folder.
    """
    import torch
    from transformers import MllamaForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _build_tokenizer(path)
    ids = _special_ids(path)
    # The image token sits just past the text vocabulary, as in the real model (128256).
    text_vocab = ids["image"]
    eos = [ids["eos"], ids["eom"], ids["eot"]]
    config = tiny_config(text_vocab, ids["image"], ids["bos"], eos, ids["pad"])

    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    for name, parameter in model.named_parameters():
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
            parameter.data.fill_(TINY_GATE)
    with _no_progress_bars():  # a second's work; a bar would land in whichever notebook cell built it
        _save_model_and_processor(model, path, ids, TILE_SIZE)
    _write_marker(path, seed=seed)
    return path


@contextmanager
def _no_progress_bars():
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _special_ids(path: Path) -> dict[str, int]:
    return {name: _token_id(path, tok) for name, tok in SPECIAL_TOKENS.items()}


def _save_model_and_processor(model, path: Path, ids: dict[str, int], tile_size: int) -> None:
    """Save weights, generation config, and a processor with the real tiling at `tile_size` pixels a tile."""
    set_generation_config(model, ids)
    model.save_pretrained(path)
    save_processor(path, tile_size)


def set_generation_config(model, ids: dict[str, int]) -> None:
    from transformers import GenerationConfig

    eos = [ids["eos"], ids["eom"], ids["eot"]]
    model.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=eos, pad_token_id=ids["pad"])


def save_processor(path: Path, tile_size: int) -> None:
    """The tokenizer already in `path` plus an image processor tiling at `tile_size` pixels, as a processor."""
    from transformers import AutoTokenizer, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    image_processor = MllamaImageProcessorPil(
        size={"height": tile_size, "width": tile_size}, max_image_tiles=4, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    MllamaProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE).save_pretrained(path)


def _write_marker(path: Path, **facts) -> None:
    (path / "tiny_random.json").write_text(json.dumps({"build_version": BUILD_VERSION, **facts}))


def random_config(path: Path, size: str):
    """The 11B or 90B config using the tiny tokenizer's special ids; writes that tokenizer to `path`."""
    from .architecture import mllama_config

    path.mkdir(parents=True, exist_ok=True)
    _build_tokenizer(path)
    ids = _special_ids(path)
    config = mllama_config(size)
    config.text_config.bos_token_id = ids["bos"]
    config.text_config.eos_token_id = [ids["eos"], ids["eom"], ids["eot"]]
    config.text_config.pad_token_id = ids["pad"]
    return config, ids


def build_random_checkpoint(path: str | os.PathLike, size: str = "11b", *, device: str = "cuda", seed: int = 0) -> Path:
    """Write the 11B or 90B architecture with random bf16 weights, initialized on `device`, to `path`.

    The tokenizer and chat template are the tiny model's (the ids it uses all lie inside the real vocabulary);
    images are tiled at the real 560 pixels.
    """
    import torch
    from transformers import MllamaForConditionalGeneration

    path = Path(path)
    config, ids = random_config(path, size)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = MllamaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    _save_model_and_processor(model, path, ids, tile_size=config.vision_config.image_size)
    del model
    _write_marker(path, seed=seed, size=size)
    return path


def is_tiny_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` holds a complete checkpoint built here with the current recipe."""
    marker = Path(path) / "tiny_random.json"
    try:
        return json.loads(marker.read_text()).get("build_version") == BUILD_VERSION
    except (OSError, ValueError):
        return False
