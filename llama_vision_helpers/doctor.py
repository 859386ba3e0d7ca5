"""`llama-vision doctor`: the pre-flight check of a seat or a server, one line per check, ✓ or ✗ with what to do.

Nothing here imports unsloth (it raises without a GPU) or loads model weights; for a server it asks one short
question about a picture from input/ and times the round trip.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

OK, BAD = "✓", "✗"
NEEDED_DISK_GB = 10  # the 4-bit 11B checkpoint is about 7 GB, with room to spare
DOCTOR_IMAGE = "image_2.jpg"
DOCTOR_QUESTION = "What is in this picture? Answer in five words."
PYTHON_MIN = (3, 10)


@dataclass
class Check:
    """One line of the report."""

    ok: bool
    what: str
    detail: str

    def line(self) -> str:
        return f"{OK if self.ok else BAD} {self.what}: {self.detail}"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pinned(package: str) -> str | None:
    """The version this project pins for `package` (from its installed metadata), if it pins one."""
    try:
        requirements = importlib.metadata.requires("llama-vision-notebooks") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for requirement in requirements:
        name, _, pin = requirement.partition("==")
        if name.strip() == package and pin and ";" not in pin:
            return pin.strip()
    return None


def check_python() -> Check:
    ok = sys.version_info[:2] >= PYTHON_MIN
    need = ".".join(map(str, PYTHON_MIN))
    return Check(ok, "Python", platform.python_version() + ("" if ok else f": needs {need} or newer"))


def check_packages() -> Iterator[Check]:
    torch_version = _version("torch")
    yield Check(torch_version is not None, "torch", torch_version or "missing: `pip install torch` (or `make setup`)")
    have, pin = _version("transformers"), _pinned("transformers")
    if have is None:
        yield Check(False, "transformers", "missing: `pip install -e .`")
    else:
        ok = pin is None or have == pin
        yield Check(ok, "transformers", have + ("" if ok else f": this project is tested on {pin}; "
                                                             f"`pip install transformers=={pin}`"))


def gpu_memory_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 1024**3


def check_accelerator(needs_gpu: bool) -> Check:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return Check(True, "GPU", f"{name}, {gpu_memory_gib():.1f} GiB ({torch.cuda.device_count()} visible)")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        detail = "Apple MPS (the 4-bit checkpoints need CUDA: on a Mac use Ollama or a room server)"
        return Check(not needs_gpu, "GPU", detail)
    if needs_gpu:
        return Check(False, "GPU", "none visible, and this model needs one: use a room server "
                                   "(LLAMA_VISION_MODEL=http://...), Ollama, or tiny-random")
    return Check(True, "GPU", "none (not needed for this model)")


def model_size(name: str) -> str:
    return "90b" if "90b" in name.lower() else "11b"


def check_fit(name: str) -> Check:
    """Estimated memory (architecture.estimate_memory) against the GPU's."""
    from .architecture import GIB, estimate_memory, mllama_config
    from .model import is_prequantized

    bits = 4 if is_prequantized(name) else 16
    need = estimate_memory(mllama_config(model_size(name)), bits).total / GIB
    have = gpu_memory_gib()
    if have is None:
        return Check(False, "memory", f"{name} needs about {need:.1f} GiB of GPU memory and there is no GPU")
    ok = have >= need
    advice = "" if ok else (": load it in 4-bit (the -bnb-4bit checkpoint)" if bits == 16 else
                            ": use a bigger GPU or a room server")
    return Check(ok, "memory", f"about {need:.1f} GiB needed ({bits}-bit), {have:.1f} GiB on the GPU{advice}")


def check_quantization_packages() -> Iterator[Check]:
    from .model import gpu_available, unsloth_installed  # find_spec only: unsloth is never imported here

    gpu = gpu_available()
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    yield Check(bnb or not gpu, "bitsandbytes", "installed" if bnb else
                "missing: `pip install -e .[gpu]` for 4-bit models" if gpu else "not installed (needs a GPU anyway)")
    unsloth = unsloth_installed()
    yield Check(True, "unsloth", "installed" if unsloth else
                "not installed (optional: `pip install -e .[gpu]`; the transformers backend works without it)")


def check_hub(name: str) -> Iterator[Check]:
    """Hugging Face login, and whether the weights are in the local cache."""
    from huggingface_hub import get_token, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    gated = name.startswith("meta-llama/")
    token = get_token()
    if token:
        yield Check(True, "Hugging Face login", "token found")
    else:
        yield Check(not gated, "Hugging Face login", "not logged in: accept the licence on the model's page, then "
                    "`hf auth login`" if gated else "not logged in (not needed for this ungated checkpoint)")
    if Path(name).expanduser().is_dir():
        yield Check(True, "weights", f"local folder {name}")
        return
    try:
        folder = snapshot_download(name, local_files_only=True)
        weights = list(Path(folder).glob("*.safetensors"))
        ok = bool(weights)
        yield Check(ok, "weights", f"in the local cache ({folder})" if ok else
                    f"incomplete in the cache: `hf download {name}` the day before")
    except (LocalEntryNotFoundError, OSError, ValueError):
        yield Check(False, "weights", f"not downloaded: `hf download {name}` the day before (the 4-bit 11B is "
                                      "about 7 GB)")


def check_disk(weights_needed: bool) -> Check:
    from .model import cache_dir

    folder = cache_dir()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free / 1e9
    ok = free >= NEEDED_DISK_GB or not weights_needed
    return Check(ok, "disk", f"{free:.0f} GB free" + ("" if ok else f": the weights need about {NEEDED_DISK_GB} GB"))


def check_inputs() -> Check:
    from .inputs import default_input_dir

    folder = default_input_dir()
    ok = (folder / "ground_truth.json").is_file() and (folder / DOCTOR_IMAGE).is_file()
    return Check(ok, "input/", f"{folder}" if ok else f"{folder} is missing or incomplete: run `llama-vision inputs`")


def check_server(url: str) -> Iterator[Check]:
    """Reachable, a model listed, and a short answer about a picture, timed."""
    from .generation import describe_image
    from .inputs import default_input_dir
    from .model import ModelLoadError, load_model

    started = time.perf_counter()
    try:
        remote = load_model(url)
    except ModelLoadError as err:
        yield Check(False, "server", str(err))
        return
    yield Check(True, "server", f"{remote.base_url} answers ({(time.perf_counter() - started) * 1000:.0f} ms)")
    yield Check(True, "model", f"{remote.model_name} is listed" + (" (tiny random weights: answers are noise)"
                                                                    if remote.is_random else ""))
    image = default_input_dir() / DOCTOR_IMAGE
    started = time.perf_counter()
    try:
        answer = describe_image(remote, image, DOCTOR_QUESTION, do_sample=False, max_new_tokens=16, stream=False)
    except Exception as err:  # noqa: BLE001  (whatever failed is the finding)
        yield Check(False, "answer", f"{type(err).__name__}: {err}")
        return
    seconds = time.perf_counter() - started
    yield Check(True, "answer", f"{seconds:.2f} s round trip for 16 tokens about {DOCTOR_IMAGE}: {answer.strip()!r:.80}")


def checks(model: str | None) -> Iterator[Check]:
    """Every check that applies to `model` (a local model, tiny-random, or a server)."""
    from .defaults import TINY_ALIAS
    from .model import resolve_model_name
    from .remote import is_remote

    name = resolve_model_name(model)
    yield Check(True, "model", name)
    yield check_python()
    yield from check_packages()
    remote, tiny = is_remote(name), name == TINY_ALIAS
    yield check_accelerator(needs_gpu=not (remote or tiny))
    if not (remote or tiny):
        yield check_fit(name)
        yield from check_quantization_packages()
        yield from check_hub(name)
    yield check_disk(weights_needed=not (remote or tiny))
    yield check_inputs()
    if remote:
        yield from check_server(name)


def run_doctor(model: str | None = None, out: Callable[[str], object] = print) -> int:
    """Print one line per check; 1 if any failed, else 0."""
    failed = 0
    for check in checks(model):
        out(check.line())
        failed += not check.ok
    out(f"{failed} problem{'s' if failed != 1 else ''} found" if failed else "all good")
    return 1 if failed else 0
