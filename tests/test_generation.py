import pytest

from llama_vision_helpers import Chat, ChatError, describe_image
from llama_vision_helpers.generation import prepare_inputs, render_prompt, user_message
from llama_vision_helpers.prompt_format import vision_prompt

SHORT = {"max_new_tokens": 12}

LLAMA_32_VISION_PROMPT = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is on the receipt?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_prompt_is_the_llama_32_vision_format_character_for_character(vlm):
    prompt = render_prompt(vlm.processor, [user_message("What is on the receipt?", with_image=True)])
    assert prompt == LLAMA_32_VISION_PROMPT
    assert vision_prompt("What is on the receipt?") == LLAMA_32_VISION_PROMPT


def test_exactly_one_bos_token(vlm, photo):
    inputs = prepare_inputs(vlm, [user_message("Describe it.", with_image=True)], photo)
    ids = inputs["input_ids"][0].tolist()
    bos = vlm.processor.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids.count(vlm.model.config.image_token_index) == 1
    assert set(inputs) >= {"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"}


def test_system_message_with_image_is_refused_by_the_template(vlm):
    messages = [{"role": "system", "content": "Be brief."}, user_message("Hi", with_image=True)]
    with pytest.raises(Exception, match="incompatible with system messages"):
        render_prompt(vlm.processor, messages)


def test_streamed_text_equals_returned_text(vlm, photo, capsys):
    answer = describe_image(vlm, photo, seed=3, **SHORT)
    printed = capsys.readouterr().out
    assert isinstance(answer, str)
    assert printed == answer + "\n"


def test_stream_callback_receives_the_answer_in_chunks(vlm, photo, capsys):
    chunks = []
    answer = describe_image(vlm, photo, seed=3, stream=chunks.append, **SHORT)
    assert "".join(chunks) == answer
    assert capsys.readouterr().out == ""
    assert answer == describe_image(vlm, photo, seed=3, stream=False, **SHORT)


def test_num_samples_come_from_one_generate_call(vlm, photo, monkeypatch):
    calls = []
    original = vlm.model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(vlm.model, "generate", spy)
    answers = describe_image(vlm, photo, num_samples=4, seed=0, **SHORT)
    assert len(calls) == 1 and calls[0]["num_return_sequences"] == 4
    assert isinstance(answers, list) and len(answers) == 4 and all(isinstance(a, str) for a in answers)


def test_seed_makes_sampling_reproducible(vlm, photo):
    first = describe_image(vlm, photo, seed=11, stream=False, max_new_tokens=24)
    again = describe_image(vlm, photo, seed=11, stream=False, max_new_tokens=24)
    other = describe_image(vlm, photo, seed=12, stream=False, max_new_tokens=24)
    assert first == again
    assert first != other


def test_greedy_is_deterministic_and_ignores_sampling_settings(vlm, photo):
    a = describe_image(vlm, photo, do_sample=False, seed=1, stream=False, **SHORT)
    b = describe_image(vlm, photo, do_sample=False, seed=2, temperature=9.0, min_p=0.9, stream=False, **SHORT)
    assert a == b


def test_greedy_with_several_samples_is_refused(vlm, photo):
    with pytest.raises(ValueError, match="do_sample=True"):
        describe_image(vlm, photo, do_sample=False, num_samples=2, **SHORT)


def test_chat_keeps_history_with_the_image_in_the_first_turn_only(vlm, photo):
    chat = Chat(vlm, photo, stream=False, **SHORT)
    first = chat.ask("Extract the receipt as JSON.", seed=0)
    second = chat.ask("You missed the timestamp. Add it.", seed=1)
    history = chat.history
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"][0] == {"type": "image"}
    assert all(part["type"] == "text" for part in history[2]["content"])
    assert history[1]["content"][0]["text"] == first and history[3]["content"][0]["text"] == second
    prompt = render_prompt(vlm.processor, chat.messages("And the total?"))
    assert prompt.count("<|image|>") == 1
    assert prompt.index("Extract the receipt") < prompt.index("You missed") < prompt.index("And the total?")
    chat.reset()
    assert chat.history == [] and chat.image is not None


def test_chat_refuses_a_second_image_and_keeps_its_history(vlm, photo):
    chat = Chat(vlm, photo, stream=False, **SHORT)
    chat.ask("What is this?", seed=0)
    before = chat.history
    with pytest.raises(ChatError, match="one image per conversation"):
        chat.ask("And this one?", image=photo)
    assert chat.history == before


def test_chat_keeps_its_history_when_generation_fails(vlm, photo):
    chat = Chat(vlm, photo, stream=False, **SHORT)
    chat.ask("What is this?", seed=0)
    before = chat.history
    with pytest.raises(ValueError):
        chat.ask("Again?", max_new_tokens=0)
    assert chat.history == before


def test_chat_refuses_a_system_message_with_an_image(vlm, photo):
    with pytest.raises(ChatError, match="system message"):
        Chat(vlm, photo, system="You are terse.")


def test_chat_can_take_the_image_with_the_first_question(vlm, photo):
    chat = Chat(vlm, stream=False, **SHORT)
    chat.ask("What is in this picture?", image=photo, seed=0)
    assert chat.image is not None and chat.history[0]["content"][0] == {"type": "image"}
