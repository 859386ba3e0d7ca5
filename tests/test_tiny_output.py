"""The tiny model's answers are noise, but readable noise: whole printable characters and line breaks only."""

import pytest

from llama_vision_helpers import describe_image
from llama_vision_helpers.generation import generate_answers, prepare_inputs, user_message


def readable(text: str) -> bool:
    """No broken characters (U+FFFD) and no control characters other than the line break."""
    return all(char == "\n" or (char.isprintable() and char != "\ufffd") for char in text)


def test_every_token_the_model_can_write_is_readable(vlm):
    tokenizer = vlm.processor.tokenizer
    writable = range(vlm.model.config.text_config.vocab_size)
    unreadable = [i for i in writable if not readable(tokenizer.decode([i], skip_special_tokens=True))]
    assert not unreadable, tokenizer.convert_ids_to_tokens(unreadable[:10])


@pytest.mark.parametrize("settings", [{"temperature": 1.5, "min_p": 0.1}, {"temperature": 5.0, "min_p": 0.0}],
                         ids=["walk-through", "hot"])
def test_sampled_answers_read_as_text_returned_and_streamed(vlm, photo, settings):
    chunks = []
    streamed = describe_image(vlm, photo, "Describe the image.", max_new_tokens=200, seed=3, stream=chunks.append,
                              **settings)
    assert streamed and readable(streamed) and readable("".join(chunks))
    batch = describe_image(vlm, photo, "Describe the image.", max_new_tokens=200, seed=4, stream=False,
                           num_samples=4, **settings)
    assert all(readable(answer) for answer in batch)


def test_the_fast_loop_writes_readable_text_too(vlm, photo):
    inputs = prepare_inputs(vlm, [user_message("Describe the image.", with_image=True)], photo)
    answers = generate_answers(vlm, inputs, fast=True, seed=7, num_samples=3, max_new_tokens=120, temperature=5.0,
                               min_p=0.0)
    assert all(readable(answer) for answer in answers)


def test_a_prompt_character_outside_the_alphabet_is_dropped_not_garbled(vlm):
    tokenizer = vlm.processor.tokenizer
    ids = tokenizer("tab\there, emoji 😀", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "tabhere, emoji "
