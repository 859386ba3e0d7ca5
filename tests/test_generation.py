import pytest

from llama_vision_helpers import Chat, ChatError, describe_image
from llama_vision_helpers.defaults import DEFAULT_INSTRUCTION
from llama_vision_helpers.generation import SettingsError, prepare_inputs, render_prompt, user_message
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
    calls = _spy_generate(vlm, monkeypatch)
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


def _spy_generate(vlm, monkeypatch):
    calls = []
    original = vlm.model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(vlm.model, "generate", spy)
    return calls


def test_sampling_settings_reach_generate_unchanged(vlm, photo, monkeypatch):
    calls = _spy_generate(vlm, monkeypatch)
    describe_image(vlm, photo, temperature=0.35, min_p=0.07, seed=0, stream=False, max_new_tokens=3)
    Chat(vlm, photo, stream=False, temperature=0.6, min_p=0.2, max_new_tokens=3).ask("What is it?", seed=0)
    assert [(c["temperature"], c["min_p"], c["max_new_tokens"], c["do_sample"]) for c in calls] == [
        (0.35, 0.07, 3, True), (0.6, 0.2, 3, True)]


def test_defaults_are_the_reference_walk_through_settings(vlm, photo, monkeypatch):
    calls = _spy_generate(vlm, monkeypatch)
    describe_image(vlm, photo, seed=0, stream=False, max_new_tokens=2)
    assert (calls[0]["temperature"], calls[0]["min_p"], calls[0]["do_sample"]) == (1.5, 0.1, True)


def _sent_messages(monkeypatch):
    import llama_vision_helpers.generation as generation

    sent = []
    original = generation.prepare_inputs

    def spy(vlm, messages, image=None):
        sent.append(messages)
        return original(vlm, messages, image)

    monkeypatch.setattr(generation, "prepare_inputs", spy)
    return sent


def test_no_instruction_asks_the_default_question(vlm, photo, monkeypatch):
    sent = _sent_messages(monkeypatch)
    describe_image(vlm, photo, None, seed=0, stream=False, max_new_tokens=2)
    describe_image(vlm, photo, "  ", seed=0, stream=False, max_new_tokens=2)
    texts = [m[-1]["content"][-1]["text"] for m in sent]
    assert texts == [DEFAULT_INSTRUCTION, DEFAULT_INSTRUCTION]


def test_a_chat_opened_with_a_blank_question_remembers_the_default_question(vlm, photo):
    chat = Chat(vlm, photo, stream=False, max_new_tokens=2)
    chat.ask("", seed=0)
    chat.ask("And the colours?", seed=0)
    prompt = render_prompt(vlm.processor, chat.messages("More?"))
    assert chat.history[0]["content"][-1]["text"] == DEFAULT_INSTRUCTION
    assert prompt.index(DEFAULT_INSTRUCTION) < prompt.index("And the colours?")
    with pytest.raises(ChatError, match="question"):
        Chat(vlm, stream=False).ask(None)


def test_a_prompt_longer_than_the_context_is_refused_before_generating(vlm, photo, monkeypatch):
    calls = _spy_generate(vlm, monkeypatch)
    context = vlm.model.config.text_config.max_position_embeddings
    with pytest.raises(ChatError, match=f"context of {context} tokens"):
        describe_image(vlm, photo, "Describe it. " * context, stream=False, max_new_tokens=2)
    with pytest.raises(ChatError, match="lower max_new_tokens"):
        describe_image(vlm, photo, stream=False, max_new_tokens=context)
    assert calls == []


@pytest.mark.parametrize("min_p", [-0.1, 1.5, float("nan")])
def test_min_p_out_of_range_is_refused_before_anything_runs(vlm, photo, monkeypatch, min_p):
    calls = _spy_generate(vlm, monkeypatch)
    sent = _sent_messages(monkeypatch)
    with pytest.raises(SettingsError, match="min_p must be between 0 and 1"):
        describe_image(vlm, photo, min_p=min_p, stream=False, max_new_tokens=2)
    assert calls == [] and sent == []


def test_chat_refuses_several_samples_and_says_where_to_get_them(vlm, photo):
    with pytest.raises(SettingsError, match="describe_image"):
        Chat(vlm, photo, num_samples=3)
    chat = Chat(vlm, photo, stream=False, max_new_tokens=2)
    with pytest.raises(SettingsError, match="num_samples"):
        chat.ask("What is it?", num_samples=3)
    assert chat.history == []


def test_several_samples_stream_the_first_and_return_all(vlm, photo, capsys):
    chunks = []
    answers = describe_image(vlm, photo, num_samples=3, seed=5, stream=chunks.append, max_new_tokens=10)
    assert isinstance(answers, list) and len(answers) == 3
    assert chunks and "".join(chunks) == answers[0]
    printed = describe_image(vlm, photo, num_samples=3, seed=5, max_new_tokens=10)
    assert printed == answers and capsys.readouterr().out == answers[0] + "\n"
