import json
import os
import subprocess
import sys

import pytest
import torch

from llama_vision_helpers import ModelLoadError, load_model
from llama_vision_helpers import model as model_module
from llama_vision_helpers.tiny import TILE_SIZE, build_tiny_checkpoint


def test_tiny_random_loads_on_cpu_with_transformers(vlm):
    assert vlm.backend == "transformers"
    assert vlm.device.type == "cpu"
    assert vlm.is_random and vlm.model_name == "tiny-random"
    assert vlm.model.dtype == torch.float32


def test_tiny_checkpoint_is_small_deterministic_and_tiles_like_the_real_one(tmp_path):
    a = build_tiny_checkpoint(tmp_path / "a", seed=0)
    b = build_tiny_checkpoint(tmp_path / "b", seed=0)
    c = build_tiny_checkpoint(tmp_path / "c", seed=1)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert sum(f.stat().st_size for f in a.iterdir()) < 5 * 1024 * 1024
    processor_config = json.loads((a / "processor_config.json").read_text())["image_processor"]
    assert processor_config["max_image_tiles"] == 4
    assert processor_config["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert processor_config["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    assert processor_config["size"] == {"height": TILE_SIZE, "width": TILE_SIZE}


def test_tiny_tokenizer_adds_begin_of_text_like_llamas(vlm):
    tokenizer = vlm.processor.tokenizer
    assert tokenizer("a cat")["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in tokenizer("a cat", add_special_tokens=False)["input_ids"]


def test_building_the_tiny_checkpoint_draws_no_progress_bar(tmp_path, capfd):
    build_tiny_checkpoint(tmp_path / "quiet")  # a stale cache is rebuilt inside whichever notebook cell loads it
    captured = capfd.readouterr()
    assert "%|" not in captured.err + captured.out


def test_processor_splits_a_wide_image_into_several_tiles(vlm, photo):
    features = vlm.processor.image_processor(photo, return_tensors="pt")
    assert features["pixel_values"].shape[-3:] == (3, TILE_SIZE, TILE_SIZE)
    assert features["pixel_values"].shape[2] == 4  # padded to the maximum of 4 tiles
    assert 1 < int(features["aspect_ratio_mask"].sum()) <= 4


def test_cache_is_reused(vlm, monkeypatch):
    calls = []
    monkeypatch.setattr("llama_vision_helpers.tiny.build_tiny_checkpoint", lambda *a, **k: calls.append(a))
    model_module.tiny_checkpoint_path()
    assert calls == []


def test_model_name_resolution(monkeypatch):
    monkeypatch.delenv("LLAMA_VISION_MODEL", raising=False)
    assert model_module.resolve_model_name() == "unsloth/Llama-3.2-11B-Vision-Instruct-bnb-4bit"
    monkeypatch.setenv("LLAMA_VISION_MODEL", "meta-llama/Llama-3.2-90B-Vision-Instruct")
    assert model_module.resolve_model_name() == "meta-llama/Llama-3.2-90B-Vision-Instruct"
    assert model_module.resolve_model_name("./my-folder") == "./my-folder"


def test_auto_backend_on_cpu_is_transformers_and_never_imports_unsloth(monkeypatch, fake_unsloth, vlm):
    monkeypatch.delenv("LLAMA_VISION_BACKEND", raising=False)
    monkeypatch.setattr(model_module, "gpu_available", lambda: False)
    assert model_module.unsloth_installed()  # the fake one
    assert model_module.choose_backend("auto") == "transformers"
    loaded = load_model("tiny-random")  # importing the fake unsloth would raise
    assert loaded.backend == "transformers"
    monkeypatch.setattr(model_module, "gpu_available", lambda: True)
    assert model_module.choose_backend("auto") == "unsloth"
    assert "unsloth" not in sys.modules


def test_backend_environment_variable_replaces_auto(monkeypatch):
    monkeypatch.setenv("LLAMA_VISION_BACKEND", "unsloth")
    assert model_module.choose_backend("auto") == "unsloth"
    assert model_module.choose_backend("transformers") == "transformers"
    monkeypatch.setenv("LLAMA_VISION_BACKEND", "vllm")
    with pytest.raises(ModelLoadError, match="Unknown backend"):
        model_module.choose_backend("auto")


def test_load_in_a_fresh_process_does_not_import_unsloth(vlm, fake_unsloth):
    code = (
        "import sys, llama_vision_helpers as h; v = h.load_model('tiny-random'); "
        "print(v.backend, 'unsloth' in sys.modules)"
    )
    path = os.pathsep.join([str(fake_unsloth), *sys.path])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "LLAMA_VISION_BACKEND": "", "PYTHONPATH": path})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["transformers", "False"]


def test_unsloth_without_gpu_or_package_says_what_to_do(monkeypatch, fake_unsloth):
    installed = model_module.unsloth_installed
    monkeypatch.setattr(model_module, "gpu_available", lambda: False)
    monkeypatch.setattr(model_module, "unsloth_installed", lambda: False)
    with pytest.raises(ModelLoadError, match=r"pip install -e \.\[gpu\]"):
        load_model("tiny-random", backend="unsloth")
    monkeypatch.setattr(model_module, "unsloth_installed", installed)
    assert model_module.unsloth_installed()  # the fake one, whose import raises
    with pytest.raises(ModelLoadError, match="needs a CUDA or ROCm GPU"):
        load_model("tiny-random", backend="unsloth")
    assert "unsloth" not in sys.modules


def test_bnb_4bit_checkpoint_without_gpu_suggests_alternatives(monkeypatch):
    monkeypatch.setattr(model_module, "gpu_available", lambda: False)
    with pytest.raises(ModelLoadError, match="tiny-random") as info:
        load_model("unsloth/Llama-3.2-11B-Vision-Instruct-bnb-4bit", backend="transformers")
    assert "bf16" in str(info.value)


def test_unreachable_hub_says_how_to_work_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="local folder") as info:
        load_model("nobody-here/no-such-vision-model", backend="transformers")
    assert "hf auth login" in str(info.value)


def test_a_folder_holding_another_kind_of_model_is_refused_before_building(tmp_path, monkeypatch):
    from transformers import MllamaForConditionalGeneration

    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    built = []
    monkeypatch.setattr(MllamaForConditionalGeneration, "from_pretrained", lambda *a, **k: built.append(a))
    with pytest.raises(ModelLoadError, match="bert model, not Llama 3.2 Vision"):
        load_model(str(folder), backend="transformers")
    assert built == []


def test_a_local_path_that_does_not_exist_is_not_blamed_on_the_hub(tmp_path):
    with pytest.raises(ModelLoadError, match="No such model folder") as info:
        load_model(str(tmp_path / "no-such-folder"), backend="transformers")
    assert "Hub is" not in str(info.value) and "unreachable" not in str(info.value)
    with pytest.raises(ModelLoadError, match="No such model folder"):
        load_model("./checkpoints/llama", backend="transformers")


def test_cache_under_a_regular_file_says_which_setting_to_change(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LLAMA_VISION_CACHE", str(blocker / "cache"))
    with pytest.raises(ModelLoadError, match="LLAMA_VISION_CACHE"):
        load_model("tiny-random")


def test_default_model_without_gpu_speaks_python_or_cli(monkeypatch):
    monkeypatch.setattr(model_module, "gpu_available", lambda: False)
    monkeypatch.delenv("LLAMA_VISION_MODEL", raising=False)
    with pytest.raises(ModelLoadError) as info:
        load_model(backend="transformers")
    assert "load_model('tiny-random')" in str(info.value)
    cli_words = info.value.advice(model_module.CLI)
    assert "--model tiny-random" in cli_words and "load_model" not in cli_words


def _raise_from_pretrained(monkeypatch, error):
    from transformers import MllamaForConditionalGeneration

    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(MllamaForConditionalGeneration, "from_pretrained", boom)


def test_out_of_memory_suggests_4bit(monkeypatch, vlm):
    _raise_from_pretrained(monkeypatch, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    with pytest.raises(ModelLoadError, match="load_in_4bit=True"):
        load_model("tiny-random")


def test_gated_repo_says_how_to_log_in(monkeypatch, vlm):
    from huggingface_hub.errors import GatedRepoError

    _raise_from_pretrained(monkeypatch, GatedRepoError("Access to model is restricted.", response=_hub_response(401)))
    with pytest.raises(ModelLoadError, match="hf auth login"):
        load_model("tiny-random")


def _hub_response(status):
    import httpx

    return httpx.Response(status, request=httpx.Request("GET", "http://127.0.0.1/model/config.json"))


def test_hub_failures_are_told_apart_by_their_types(monkeypatch, vlm):
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    def wrapped(error):  # transformers raises OSError from the Hub's error
        try:
            raise error
        except Exception as cause:
            try:
                raise OSError("could not load the files") from cause
            except OSError as outer:
                return outer

    _raise_from_pretrained(monkeypatch, wrapped(RepositoryNotFoundError("404 Client Error.", response=_hub_response(404))))
    with pytest.raises(ModelLoadError, match="not a repository on the Hugging Face Hub"):
        load_model("tiny-random")
    _raise_from_pretrained(monkeypatch, wrapped(LocalEntryNotFoundError("cannot find the requested files")))
    with pytest.raises(ModelLoadError, match="cannot be reached") as info:
        load_model("tiny-random")
    assert "tiny-random" in str(info.value)
    # Words alone decide nothing: an error that merely mentions "gated" or "401" is not a gated repository.
    _raise_from_pretrained(monkeypatch, OSError("gated 401 Unauthorized offline Connection"))
    with pytest.raises(ModelLoadError) as info:
        load_model("tiny-random")
    assert "gated on" not in str(info.value) and "cannot be reached" not in str(info.value)


def test_transformers_backend_loads_tiny_random_in_4bit_on_cpu(vlm, photo):
    import bitsandbytes as bnb

    from llama_vision_helpers import describe_image

    quantized = load_model("tiny-random", load_in_4bit=True)
    assert quantized.load_in_4bit
    linear4 = [m for m in quantized.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) > 20
    answer = describe_image(quantized, photo, max_new_tokens=4, seed=0, stream=False)
    assert isinstance(answer, str)
