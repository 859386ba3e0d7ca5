"""GPU paths: skipped without CUDA; run on the GPU machine and reported."""

import pytest

from llama_vision_helpers import Chat, describe_image, load_model

pytestmark = pytest.mark.gpu


@pytest.fixture(params=["unsloth", "transformers"])
def gpu_vlm(request):
    return load_model("tiny-random", backend=request.param, load_in_4bit=True)


def test_4bit_backends_load_tiny_random_on_the_gpu_and_stream(gpu_vlm, photo, capsys):
    assert gpu_vlm.device.type == "cuda" and gpu_vlm.load_in_4bit
    answer = describe_image(gpu_vlm, photo, max_new_tokens=16, seed=0)
    assert capsys.readouterr().out == answer + "\n"
    print(f"\n{gpu_vlm!r} streamed {len(answer)} characters")


def test_chat_and_samples_on_the_gpu(gpu_vlm, photo):
    chat = Chat(gpu_vlm, photo, stream=False, max_new_tokens=8)
    chat.ask("What is it?", seed=0)
    chat.ask("And then?", seed=1)
    assert len(chat.history) == 4
    answers = describe_image(gpu_vlm, photo, num_samples=4, max_new_tokens=8, seed=0)
    assert len(answers) == 4


def test_bf16_transformers_backend_on_the_gpu(photo):
    import torch

    vlm = load_model("tiny-random", backend="transformers", load_in_4bit=False)
    assert vlm.model.dtype == torch.bfloat16
    assert isinstance(describe_image(vlm, photo, max_new_tokens=8, seed=0, stream=False), str)


def test_fast_loop_with_cuda_graph_matches_generate_in_float32(photo):
    import torch

    from llama_vision_helpers.fast_decode import FastDecoder
    from llama_vision_helpers.generation import prepare_inputs, user_message

    vlm = load_model("tiny-random", backend="transformers", load_in_4bit=False, dtype=torch.float32)
    decoder = FastDecoder(vlm.model)
    assert decoder.use_cuda_graph
    inputs = prepare_inputs(vlm, [user_message("Describe the image.", with_image=True)], photo)
    expected = vlm.model.generate(**inputs, max_new_tokens=40, do_sample=False)
    assert torch.equal(decoder.generate(inputs, max_new_tokens=40, do_sample=False), expected)
    assert all(state.graph is not None for state in decoder._states.values())


def test_fast_loop_on_4bit_backends_streams_and_batches(gpu_vlm, photo, capsys):
    answer = describe_image(gpu_vlm, photo, max_new_tokens=16, seed=0, fast=True)
    assert capsys.readouterr().out == answer + "\n"
    answers = describe_image(gpu_vlm, photo, num_samples=4, max_new_tokens=16, seed=0, fast=True)
    assert len(answers) == 4
    assert answers == describe_image(gpu_vlm, photo, num_samples=4, max_new_tokens=16, seed=0, fast=True)


def test_fast_logits_follow_generate_on_4bit_backends(gpu_vlm, photo):
    from llama_vision_helpers.bench import compare_fast_logits
    from llama_vision_helpers.generation import prepare_inputs, user_message

    inputs = prepare_inputs(gpu_vlm, [user_message("Describe the image.", with_image=True)], photo)
    difference, agreement = compare_fast_logits(gpu_vlm, inputs, steps=24)
    print(f"\n{gpu_vlm!r}: max logit difference {100 * difference:.3f}%, top token agrees {100 * agreement:.0f}%")
    assert difference < 0.02 and agreement >= 0.9
