"""Loading a Llama 3.2 Vision model: name resolution, backend choice, quantization and errors that say what to do.

This module knows nothing about prompts; `generation.py` does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from .defaults import BACKENDS, DEFAULT_MODEL, TINY_ALIAS


class Spelling(NamedTuple):
    """How advice names an option: as Python arguments or as command-line flags."""

    tiny: str
    transformers: str


PYTHON = Spelling(tiny="load_model('tiny-random')", transformers="backend='transformers'")
CLI = Spelling(tiny="--model tiny-random", transformers="--backend transformers")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do instead.

    `str(err)` gives the advice in Python terms; `err.advice(CLI)` the same advice as command-line flags.
    """

    def __init__(self, message: str | Callable[[Spelling], str]) -> None:
        self._say = message if callable(message) else (lambda _spelling: message)
        super().__init__(self._say(PYTHON))

    def advice(self, spelling: Spelling = PYTHON) -> str:
        return self._say(spelling)


@dataclass
class VisionModel:
    """A loaded model with its processor, and how it was loaded."""

    model: Any
    processor: Any
    backend: str
    model_name: str
    device: Any
    load_in_4bit: bool = False
    is_random: bool = field(default=False)
    _fast_decoder: Any = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        bits = "4-bit" if self.load_in_4bit else str(getattr(self.model, "dtype", ""))
        return f"VisionModel({self.model_name!r}, backend={self.backend!r}, device={self.device}, {bits})"


def cache_dir() -> Path:
    """Where built artefacts (the tiny checkpoint, random-weight checkpoints) are kept."""
    return Path(os.environ.get("LLAMA_VISION_CACHE", Path.home() / ".cache" / "llama_vision_helpers"))


def writable_cache_dir() -> Path:
    """`cache_dir()`, created if needed; `ModelLoadError` when it cannot be a folder."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as err:
        raise ModelLoadError(
            f"The cache folder {folder} cannot be created ({err.strerror or err}): part of that path is a file or "
            "is not writable. Set LLAMA_VISION_CACHE to a folder you can write to."
        ) from err
    return folder


def resolve_model_name(model_name: str | None = None) -> str:
    """The argument, else `$LLAMA_VISION_MODEL`, else the 4-bit 11B Instruct model."""
    return model_name or os.environ.get("LLAMA_VISION_MODEL") or DEFAULT_MODEL


def gpu_available() -> bool:
    """A CUDA or ROCm GPU that PyTorch can use."""
    import torch

    return torch.cuda.is_available()


def unsloth_installed() -> bool:
    """Whether unsloth is installed, found without importing it (importing it without a GPU raises)."""
    return importlib.util.find_spec("unsloth") is not None


def choose_backend(backend: str = "auto") -> str:
    """`auto` picks unsloth when it is installed and a GPU is present, else transformers.

    `$LLAMA_VISION_BACKEND` replaces `auto`; an explicit backend argument wins over it.
    """
    if backend == "auto":
        backend = os.environ.get("LLAMA_VISION_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ModelLoadError(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend == "auto":
        return "unsloth" if gpu_available() and unsloth_installed() else "transformers"
    return backend


def tiny_checkpoint_path() -> Path:
    """Build the tiny random checkpoint once (cached) and return its folder."""
    from .tiny import build_tiny_checkpoint, is_tiny_checkpoint

    path = writable_cache_dir() / "tiny-random-mllama"
    if not is_tiny_checkpoint(path):
        tmp = path.with_name(path.name + f".building-{os.getpid()}")
        build_tiny_checkpoint(tmp)
        if is_tiny_checkpoint(path):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
    return path


def is_prequantized(source: str) -> bool:
    """True for a bitsandbytes checkpoint (by name, or by the quantization_config in a local config.json)."""
    if "bnb-4bit" in source.lower():
        return True
    config = Path(source) / "config.json"
    if config.is_file():
        try:
            return "quantization_config" in json.loads(config.read_text())
        except ValueError:
            return False
    return False


def looks_like_path(name: str) -> bool:
    """True when `name` cannot be a Hub repository id (e.g. `./model`, `/data/llama`, `a/b/c`)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def check_local_source(source: str) -> None:
    """Refuse, before building anything, a path that does not exist or a folder holding another kind of model."""
    path = Path(source).expanduser()
    if not path.exists():
        if looks_like_path(source):
            raise ModelLoadError(f"No such model folder: {path}. Check the path (it is not a Hub repository id).")
        return  # a Hub id
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file; pass the folder that holds config.json and the weights.")
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path} has no config.json: it is not a model checkpoint folder.")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ModelLoadError(f"{config} is not a readable model config ({err}).") from err
    if model_type != "mllama":
        raise ModelLoadError(
            f"{path} holds a {model_type or 'unknown'} model, not Llama 3.2 Vision (model_type 'mllama'). "
            "Point at a Llama 3.2 Vision checkpoint."
        )


def load_model(
    model_name: str | None = None,
    *,
    backend: str = "auto",
    load_in_4bit: bool | None = None,
    device_map: str | dict | None = None,
    dtype: Any = None,
) -> VisionModel:
    """Load a Llama 3.2 Vision model and its processor, or connect to a server that runs one.

    `model_name`: a hub id or a local folder; `"tiny-random"` builds and loads the offline tiny checkpoint;
    an OpenAI-compatible server's URL (`http://host:8000/v1`), `"ollama"` or `"ollama:NAME"` returns a
    `remote.RemoteModel` that works with the same functions (the other arguments are then the server's business).
    `backend`: "auto", "unsloth" or "transformers". `load_in_4bit`: None means 4-bit for pre-quantized
    checkpoints and for unsloth, full precision otherwise. Raises `ModelLoadError` with what to do.
    """
    name = resolve_model_name(model_name)
    from .remote import connect, is_remote

    if is_remote(name):
        return connect(name)
    is_tiny = name == TINY_ALIAS
    chosen = choose_backend(backend)
    on_gpu = gpu_available()

    if chosen == "unsloth":
        if not unsloth_installed():
            raise ModelLoadError(lambda say: (
                "backend='unsloth' needs unsloth: install it with `pip install -e .[gpu]` on a machine with a "
                f"GPU, or use {say.transformers}."
            ))
        if not on_gpu:
            raise ModelLoadError(lambda say: (
                f"backend='unsloth' needs a CUDA or ROCm GPU and none is visible. Use {say.transformers} "
                f"(CPU) or {say.tiny} to try the notebooks without a GPU."
            ))
    source = str(tiny_checkpoint_path()) if is_tiny else name
    if not is_tiny:
        check_local_source(source)
    if chosen == "unsloth":
        import unsloth  # noqa: F401  (before transformers is imported, as unsloth asks; only with a GPU)
    prequantized = is_prequantized(source)
    if load_in_4bit is None:
        load_in_4bit = prequantized or chosen == "unsloth"
    if prequantized and not on_gpu:
        raise ModelLoadError(lambda say: (
            f"{name} is a bitsandbytes 4-bit checkpoint, which needs a GPU. Without one, use "
            f"{say.tiny} to run the notebooks; with a GPU but no bitsandbytes, load "
            f"'meta-llama/Llama-3.2-11B-Vision-Instruct' with {say.transformers} in bf16."
        ))

    try:
        if chosen == "unsloth":
            model, processor = _load_unsloth(source, load_in_4bit, dtype)
        else:
            model, processor = _load_transformers(source, load_in_4bit, device_map, dtype, on_gpu)
    except ModelLoadError:
        raise
    except Exception as err:  # translated into what to do; the original stays chained
        raise _explain_load_failure(name, err) from err

    if is_tiny:
        warnings.warn(
            "tiny-random is a tiny model with random weights: its answers are noise, only the plumbing is real.",
            UserWarning,
            stacklevel=2,
        )
    device = next(model.parameters()).device
    return VisionModel(model, processor, chosen, name, device, load_in_4bit=load_in_4bit, is_random=is_tiny)


def local_processor(vlm: Any) -> Any:
    """The processor (tokenizer + image processor) of a model, on this machine, without loading weights.

    A local model's own; for a model on a server, the served model's: the tiny model's when it serves tiny-random,
    else the one under its name (or the 11B's, which every Llama 3.2 Vision model shares) from the local cache.
    """
    processor = getattr(vlm, "processor", None)
    if processor is not None:
        return processor
    from transformers import AutoProcessor

    name = vlm.model_name
    if name == TINY_ALIAS:
        return AutoProcessor.from_pretrained(tiny_checkpoint_path())
    failures = []
    for candidate in dict.fromkeys([name, DEFAULT_MODEL]):
        try:
            return AutoProcessor.from_pretrained(candidate)
        except Exception as err:  # noqa: BLE001  (each is tried; the message below says what to do)
            failures.append(f"{candidate}: {type(err).__name__}")
    raise ModelLoadError(
        f"This needs the tokenizer and image processor of {name} on this machine (a few MB, no weights), and none "
        f"was found ({'; '.join(failures)}). Fetch them once while online with `hf download {DEFAULT_MODEL} "
        "--include '*.json'`, or use load_model('tiny-random') for the tiny model's."
    )


def _load_unsloth(source: str, load_in_4bit: bool, dtype: Any):
    from unsloth import FastVisionModel  # imported only here: it raises on a machine without a GPU

    model, processor = FastVisionModel.from_pretrained(source, load_in_4bit=load_in_4bit, dtype=dtype)
    FastVisionModel.for_inference(model)
    return model, processor


def _load_transformers(source: str, load_in_4bit: bool, device_map: Any, dtype: Any, on_gpu: bool):
    import torch
    from transformers import AutoProcessor, BitsAndBytesConfig, MllamaForConditionalGeneration

    from .vision_attention import use_split_mask_attention

    kwargs: dict[str, Any] = {}
    if dtype is None:
        dtype = torch.bfloat16 if on_gpu else torch.float32
    if load_in_4bit and not is_prequantized(source):
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelLoadError("load_in_4bit=True needs bitsandbytes: `pip install -e .[gpu]`.")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if on_gpu else dtype,
        )
    if device_map is None:
        device_map = "auto" if on_gpu else "cpu"
    model = MllamaForConditionalGeneration.from_pretrained(source, dtype=dtype, device_map=device_map, **kwargs)
    model.eval()
    use_split_mask_attention(model)  # same answers up to rounding, the vision attention on the fastest kernel
    processor = AutoProcessor.from_pretrained(source)
    return model, processor


def _causes(err: BaseException):
    """The exception and the ones it was raised from (transformers wraps Hub errors in OSError)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _explain_load_failure(name: str, err: Exception) -> ModelLoadError:
    """Turn a loading exception into a ModelLoadError that says what to do, by the Hub's error types."""
    import httpx
    import torch
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = list(_causes(err))
    first_line = f"{type(err).__name__}: {err}".splitlines()[0][:300]

    def caused_by(*kinds: type) -> bool:
        return any(isinstance(e, kinds) for e in chain)

    if caused_by(torch.cuda.OutOfMemoryError):
        return ModelLoadError(
            f"The GPU ran out of memory loading {name}. Load it in 4-bit (load_in_4bit=True, about 7 GB for the "
            "11B model) or use a 4-bit checkpoint such as unsloth/Llama-3.2-11B-Vision-Instruct-bnb-4bit."
        )
    # GatedRepoError and RevisionNotFoundError are kinds of RepositoryNotFoundError: ask for them first.
    if caused_by(GatedRepoError):
        return ModelLoadError(
            f"{name} is gated on the Hugging Face Hub. Accept its licence on its hub page, log in with "
            "`hf auth login` (or set HF_TOKEN), or point load_model at a local folder holding the checkpoint."
        )
    if caused_by(RevisionNotFoundError):
        return ModelLoadError(f"{name} has no such revision on the Hugging Face Hub. ({first_line})")
    if caused_by(RepositoryNotFoundError):
        return ModelLoadError(
            f"{name} is not a repository on the Hugging Face Hub, or it is private and you are not logged in. "
            "Check the name, log in with `hf auth login` (or set HF_TOKEN), or pass a local folder that holds "
            "the checkpoint."
        )
    if caused_by(LocalEntryNotFoundError, OfflineModeIsEnabled, httpx.TransportError):
        return ModelLoadError(lambda say: (
            f"Could not load {name}: the Hugging Face Hub cannot be reached (offline, or no network) and no local "
            "copy was found. Connect (unset HF_HUB_OFFLINE; `hf auth login` for a gated model), pass a local folder "
            "that holds the checkpoint, "
            f"or use {say.tiny} to work offline. ({first_line})"
        ))
    if caused_by(HfHubHTTPError):
        return ModelLoadError(f"The Hugging Face Hub refused to send {name}; try again later. ({first_line})")
    return ModelLoadError(f"Could not load {name}: {first_line}")
