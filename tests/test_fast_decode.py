"""The fast decode loop against Hugging Face `generate`, on CPU (the same loop without the CUDA graph)."""

import dataclasses

import pytest
import torch
from transformers import MinPLogitsWarper, TemperatureLogitsWarper

from llama_vision_helpers import Chat, describe_image
from llama_vision_helpers.fast_decode import FastDecoder
from llama_vision_helpers.generation import generate_answers, prepare_inputs, user_message


@pytest.fixture(scope="module")
def decoder(vlm):
    return FastDecoder(vlm.model)


def image_inputs(vlm, photo, text="Describe the image."):
    return prepare_inputs(vlm, [user_message(text, with_image=True)], photo)


def test_greedy_matches_generate_token_for_token(vlm, decoder, photo):
    inputs = image_inputs(vlm, photo)
    expected = vlm.model.generate(**inputs, max_new_tokens=48, do_sample=False)
    assert torch.equal(decoder.generate(inputs, max_new_tokens=48, do_sample=False), expected)


def test_the_fast_loop_s_logits_are_generate_s_for_the_same_tokens(vlm, photo):
    """What `llama-vision bench` reports as "logits vs generate", here on the float32 tiny model."""
    from llama_vision_helpers.bench import compare_fast_logits

    assert vlm.model.dtype == torch.float32  # the step's logits are then the state's own buffer, not a copy
    difference, agreement = compare_fast_logits(vlm, image_inputs(vlm, photo), steps=8)
    assert difference < 1e-4 and agreement == 1.0


def test_rows_sharing_one_image_each_follow_generate(vlm, decoder, photo):
    # k rows of one prompt keep one copy of the image's keys and values
    inputs = image_inputs(vlm, photo)
    expected = vlm.model.generate(**inputs, max_new_tokens=24, do_sample=False)
    rows = decoder.generate(inputs, max_new_tokens=24, do_sample=False, num_return_sequences=3)
    assert rows.shape[0] == 3 and all(torch.equal(row, expected[0]) for row in rows)
    state = next(s for s in decoder._states.values() if s.batch == 3)
    assert all(keys.shape[0] == 1 for keys in state.cross_keys.values())


def test_rows_sharing_one_image_attend_as_rows_with_their_own_copy(vlm, decoder, photo):
    decoder.generate(image_inputs(vlm, photo), max_new_tokens=2, do_sample=False, num_return_sequences=3)
    shared = next(s for s in decoder._states.values() if s.batch == 3 and s.cross_mask is not None)
    copied = dataclasses.replace(
        shared, cross_keys={i: k.expand(3, -1, -1, -1) for i, k in shared.cross_keys.items()},
        cross_values={i: v.expand(3, -1, -1, -1) for i, v in shared.cross_values.items()},
        cross_mask=shared.cross_mask.expand(3, -1, -1, -1), row_mask=shared.row_mask.expand(3, -1, -1))
    index = min(decoder.cross_layers)
    torch.manual_seed(0)
    hidden, delta = (torch.randn(3, 1, vlm.model.config.text_config.hidden_size, dtype=decoder.dtype) for _ in "hd")
    layer = decoder.text.layers[index]
    with torch.inference_mode():
        got = decoder._cross_attention_layer(layer, index, hidden, delta, shared)
        expected = decoder._cross_attention_layer(layer, index, hidden, delta, copied)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_greedy_matches_generate_without_an_image(vlm, decoder):
    inputs = prepare_inputs(vlm, [user_message("Tell me a story.", with_image=False)])
    expected = vlm.model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert torch.equal(decoder.generate(inputs, max_new_tokens=24, do_sample=False), expected)


def test_greedy_matches_generate_in_a_multi_turn_chat(vlm, decoder, photo):
    chat = Chat(vlm, photo, stream=False, max_new_tokens=6, do_sample=False)
    chat.ask("What is it?")
    inputs = prepare_inputs(vlm, chat.messages("And the colour?"), photo)
    expected = vlm.model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert torch.equal(decoder.generate(inputs, max_new_tokens=24, do_sample=False), expected)


def test_sampling_keeps_the_same_tokens_as_generate_would():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    scores = MinPLogitsWarper(0.1)(None, TemperatureLogitsWarper(1.5)(None, logits.clone()))
    expected = torch.softmax(scores, dim=-1)
    allowed = expected > 0
    torch.manual_seed(1)
    draws = torch.stack([FastDecoder._next_tokens(logits, do_sample=True, temperature=1.5, min_p=0.1, banned=None)
                         for _ in range(300)])
    assert allowed.gather(1, draws.T).all(), "sampled a token that min_p removes"
    assert (FastDecoder._next_tokens(logits, do_sample=False, temperature=1.5, min_p=0.1, banned=None)
            == logits.argmax(-1)).all()
    top = logits.argmax(-1).tolist()
    banned = FastDecoder._next_tokens(logits, do_sample=False, temperature=1, min_p=None, banned=top)
    assert all(b not in top for b in banned.tolist())


def test_a_sampled_answer_is_reproducible_with_a_seed(vlm, photo):
    inputs = image_inputs(vlm, photo)
    first = generate_answers(vlm, inputs, fast=True, seed=5, num_samples=3, max_new_tokens=16)
    again = generate_answers(vlm, inputs, fast=True, seed=5, num_samples=3, max_new_tokens=16)
    other = generate_answers(vlm, inputs, fast=True, seed=6, num_samples=3, max_new_tokens=16)
    assert first == again and first != other and len(first) == 3


def test_end_of_turn_stops_a_sequence_and_pads_it(vlm, decoder, photo, monkeypatch):
    eot = vlm.processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    pad = vlm.model.generation_config.pad_token_id
    calls = {"n": 0}

    def scripted(logits, **kwargs):
        calls["n"] += 1
        tokens = torch.full((logits.shape[0],), 7)
        if calls["n"] == 3:
            tokens[0] = eot  # the first sequence ends at its third token, the second runs on
        return tokens

    monkeypatch.setattr(FastDecoder, "_next_tokens", staticmethod(scripted))
    out = decoder.generate(image_inputs(vlm, photo), max_new_tokens=6, num_return_sequences=2)
    new = out[:, -6:]
    assert new[0].tolist() == [7, 7, eot, pad, pad, pad] and new[1].tolist() == [7] * 6

    calls["n"] = 0
    out = decoder.generate(image_inputs(vlm, photo), max_new_tokens=6)
    assert out[0, -3:].tolist() == [7, 7, eot] and out.shape[1] == image_inputs(vlm, photo)["input_ids"].shape[1] + 3


def test_min_new_tokens_bans_the_end_tokens(vlm, decoder, photo, monkeypatch):
    seen = []

    def record(logits, *, banned, **kwargs):
        seen.append(banned)
        return logits.argmax(-1)

    monkeypatch.setattr(FastDecoder, "_next_tokens", staticmethod(record))
    decoder.generate(image_inputs(vlm, photo), max_new_tokens=5, min_new_tokens=3, do_sample=False)
    eos = set(vlm.model.generation_config.eos_token_id)
    assert [set(b) if b else None for b in seen] == [eos, eos, eos, None, None]


def test_streaming_through_the_fast_loop(vlm, photo, capsys):
    answer = describe_image(vlm, photo, seed=2, max_new_tokens=12, fast=True)
    assert capsys.readouterr().out == answer + "\n"


def test_options_it_does_not_know_go_to_generate(vlm, photo, monkeypatch):
    monkeypatch.setattr(FastDecoder, "generate", lambda *a, **k: pytest.fail("fast loop used"))
    answer = describe_image(vlm, photo, seed=2, max_new_tokens=4, fast=True, top_k=5, stream=False)
    assert isinstance(answer, str)


def test_cpu_keeps_generate_by_default(vlm, photo, monkeypatch):
    monkeypatch.setattr(FastDecoder, "generate", lambda *a, **k: pytest.fail("fast loop used on CPU"))
    describe_image(vlm, photo, max_new_tokens=4, stream=False)


def test_joined_plain_linears_keep_the_tokens(vlm, photo):
    decoder = FastDecoder(vlm.model)
    decoder.dense_weights = decoder._join_dense_weights()  # joined on GPUs by default; same values anywhere
    assert decoder.dense_weights
    inputs = image_inputs(vlm, photo)
    expected = vlm.model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert torch.equal(decoder.generate(inputs, max_new_tokens=24, do_sample=False), expected)


def test_the_prefill_leaves_out_only_a_mask_of_ones(vlm, photo, monkeypatch):
    """A mask of ones changes nothing (and would make transformers read it mid-pass); a padded one is kept."""
    decoder = FastDecoder(vlm.model)
    seen = []
    model = decoder.model
    monkeypatch.setattr(decoder, "model", lambda **inputs: seen.append(sorted(inputs)) or model(**inputs))
    inputs = prepare_inputs(vlm, [user_message("Describe the image.", with_image=True)], photo, device="cpu")
    padded = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    padded["attention_mask"][0, 0] = 0
    with torch.inference_mode():
        plain = decoder.prefill_forward(inputs)[0].logits
        kept = decoder.prefill_forward(padded)[0].logits
        expected = model(**inputs, use_cache=True, logits_to_keep=1).logits
    assert "attention_mask" not in seen[0] and "attention_mask" in seen[1]
    torch.testing.assert_close(plain, expected, atol=0, rtol=0)
    assert not torch.equal(kept, plain)  # the kept mask did hide a token
