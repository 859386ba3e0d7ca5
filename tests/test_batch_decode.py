"""The batched slot decoder on CPU (no graphs): every request gets the tokens it gets alone, whatever runs beside it."""

import shutil

import pytest
import torch
from PIL import Image

from llama_vision_helpers.batch_decode import BatchDecoder, SlotRequest, bucket_sizes
from llama_vision_helpers.generation import prepare_inputs, user_message


def conversation(vlm, text, image=None):
    return prepare_inputs(vlm, [user_message(text, with_image=image is not None)], image)


def solo_greedy(vlm, inputs, max_new_tokens):
    """The answer `generate` gives this conversation alone (an independent path)."""
    out = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture
def other_photo():
    image = Image.new("RGB", (90, 160), "black")
    image.paste((250, 200, 10), (10, 30, 70, 120))
    return image


@pytest.fixture
def mixed(vlm, photo, other_photo):
    """Conversations with and without an image, of different prompt lengths and answer lengths."""
    return [
        (conversation(vlm, "Describe the image.", photo), 20),
        (conversation(vlm, "Tell me a story about a fox and a dog, please.", None), 9),
        (conversation(vlm, "What colour is the square in this picture?", other_photo), 30),
        (conversation(vlm, "Count to ten.", None), 14),
        (conversation(vlm, "Describe the image.", other_photo), 11),
    ]


def test_concurrent_greedy_requests_get_their_solo_answers(vlm, mixed):
    decoder = BatchDecoder(vlm.model, max_batch=3)  # five requests: two join as others leave
    requests = [SlotRequest(inputs, max_new_tokens=n) for inputs, n in mixed]
    decoder.run(requests)
    for (inputs, n), request in zip(mixed, requests):
        assert request.tokens == solo_greedy(vlm, inputs, n)
        assert request.finish_reason in {"stop", "length"}
    assert decoder.free_slots == 3


def test_requests_join_mid_way_and_a_cancelled_one_leaves_at_once(vlm, mixed):
    decoder = BatchDecoder(vlm.model, max_batch=4)
    first, second, cancelled, late = [SlotRequest(inputs, max_new_tokens=n) for inputs, n in mixed[:4]]
    first.max_new_tokens = second.max_new_tokens = late.max_new_tokens = 25
    decoder.admit([first, cancelled])
    for _ in range(4):
        decoder.step()
    decoder.admit([second])
    decoder.step()
    cancelled.cancelled.set()
    events = decoder.step()
    assert [(e.request, e.token, e.finish_reason) for e in events if e.request is cancelled] == \
        [(cancelled, None, "cancelled")]
    assert cancelled not in decoder.running and decoder.free_slots == 2
    decoder.admit([late])  # takes the cancelled request's slot
    while decoder.running:
        decoder.step()
    assert cancelled.tokens == solo_greedy(vlm, mixed[2][0], 30)[:5]
    for request, (inputs, _) in [(first, mixed[0]), (second, mixed[1]), (late, mixed[3])]:
        assert request.tokens == solo_greedy(vlm, inputs, 25)


def test_a_seeded_sampled_request_samples_the_same_alone_and_batched(vlm, mixed):
    def sampled(seed):
        return SlotRequest(mixed[0][0], max_new_tokens=16, do_sample=True, temperature=1.5, min_p=0.1, seed=seed)

    alone = BatchDecoder(vlm.model, max_batch=1).run([sampled(7)])[0].tokens
    crowd = [SlotRequest(inputs, max_new_tokens=n) for inputs, n in mixed[1:]] + [sampled(8)]
    batched = BatchDecoder(vlm.model, max_batch=4).run(crowd[:2] + [sampled(7)] + crowd[2:])[2].tokens
    assert batched == alone and len(alone) == 16
    assert BatchDecoder(vlm.model, max_batch=1).run([sampled(8)])[0].tokens != alone


def test_sampling_rules_per_row(vlm, mixed):
    """Greedy rows take the top token, sampled rows only tokens min_p keeps, rows under min_new_tokens no end."""
    decoder = BatchDecoder(vlm.model, max_batch=3)
    inputs = mixed[0][0]
    decoder.slots[:] = [SlotRequest(inputs, max_new_tokens=5),
                        SlotRequest(inputs, max_new_tokens=5, do_sample=True, temperature=1.5, min_p=0.1, seed=1),
                        SlotRequest(inputs, max_new_tokens=5, min_new_tokens=2)]
    torch.manual_seed(0)
    logits = torch.randn(3, decoder.logits.shape[1]) * 3
    logits[2, decoder.eos[0]] = 100.0  # the end token would win
    decoder.logits.copy_(logits)
    probs = torch.softmax(logits[1] / 1.5, dim=-1)
    allowed = probs >= 0.1 * probs.max()
    for _ in range(200):
        greedy, drawn, banned = decoder._sample([0, 1, 2])
        assert greedy == int(logits[0].argmax()) and bool(allowed[drawn])
        assert banned not in decoder.eos
    assert allowed.sum() > 1


def test_a_full_slot_ends_with_length(vlm, mixed):
    inputs, _ = mixed[1]
    prompt = inputs["input_ids"].shape[1]
    decoder = BatchDecoder(vlm.model, max_batch=2, slot_length=prompt + 4)
    request = decoder.run([SlotRequest(inputs, max_new_tokens=40)])[0]
    assert request.finish_reason == "length" and request.tokens == solo_greedy(vlm, inputs, 5)
    with pytest.raises(ValueError, match="slot holds"):
        BatchDecoder(vlm.model, max_batch=1, slot_length=prompt).admit([SlotRequest(inputs, max_new_tokens=4)])


def test_bucket_sizes():
    assert bucket_sizes(1) == [1] and bucket_sizes(6) == [1, 2, 4, 6] and bucket_sizes(32) == [1, 2, 4, 8, 16, 32]


@pytest.mark.skipif(shutil.which("c++") is None, reason="inductor needs a C++ compiler to compile for a CPU")
def test_compiled_elementwise_work_gives_the_eager_tokens(vlm, mixed):
    """The GPU's step (elementwise work compiled for any batch size and cache length) against the eager step, with
    requests of different lengths joining and leaving; compiled here on the CPU."""
    def answers(compiled):
        decoder = BatchDecoder(vlm.model, max_batch=4, compile_elementwise=compiled)
        requests = [SlotRequest(inputs, max_new_tokens=n, min_new_tokens=n) for inputs, n in mixed]
        return [request.tokens for request in decoder.run(requests)]

    assert answers(True) == answers(False)
