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


def test_batched_decoder_with_graphs_and_compiled_steps_gives_each_request_its_solo_answer(photo):
    """The room's decode path on the GPU (a CUDA graph per batch bucket, elementwise work compiled for every shape)
    in float32: requests with and without an image, of different lengths, joining as others leave."""
    import torch

    from llama_vision_helpers.batch_decode import BatchDecoder, SlotRequest
    from llama_vision_helpers.fast_decode import _EAGER_OPS
    from llama_vision_helpers.generation import inputs_to_device, prepare_inputs, user_message

    vlm = load_model("tiny-random", backend="transformers", load_in_4bit=False, dtype=torch.float32)
    conversations = [(user_message("Describe the image.", with_image=True), photo, 30),
                     (user_message("Tell me a story about a fox.", with_image=False), None, 12),
                     (user_message("What colour is it?", with_image=True), photo.rotate(90, expand=True), 21)] * 2
    # half prepared on the CPU, as the server prepares them (the prefill moves them without waiting)
    inputs = [(prepare_inputs(vlm, [message], image, device="cpu" if i % 2 else None), n)
              for i, (message, image, n) in enumerate(conversations)]
    decoder = BatchDecoder(vlm.model, max_batch=4)
    assert decoder.fast.use_cuda_graph and decoder.fast._ops is not _EAGER_OPS
    decoder.warm_up()
    requests = decoder.run([SlotRequest(one, max_new_tokens=n) for one, n in inputs])
    for (one, n), request in zip(inputs, requests):
        solo = vlm.model.generate(**inputs_to_device(one, vlm.device), max_new_tokens=n,
                                  do_sample=False)[0, one["input_ids"].shape[1]:]
        assert request.tokens == solo.tolist()
    assert any(state.graph is not None for state in decoder._states.values())


def test_split_vision_attention_follows_masked_sdpa_in_bf16(photo):
    """The vision encoder's split attention on CUDA in bfloat16 (padding rows as products with float32 scores)
    against transformers' masked `sdpa`, on images that fill four tiles and that leave tiles empty."""
    import torch

    from test_vision_attention import vision_states

    from llama_vision_helpers.generation import prepare_inputs, user_message
    from llama_vision_helpers.vision_attention import NAME

    vlm = load_model("tiny-random", backend="transformers", load_in_4bit=False, dtype=torch.bfloat16)
    parts = [prepare_inputs(vlm, [user_message("Describe.", True)], image)
             for image in (photo, photo.resize((240, 110)), photo.resize((100, 100)))]
    inputs = {name: torch.cat([part[name] for part in parts]) for name in parts[0].keys()}
    states = {name: vision_states(vlm, inputs, name).float() for name in (NAME, "sdpa")}
    difference = (states[NAME] - states["sdpa"]).abs().max() / states["sdpa"].abs().max()
    print(f"split vs masked sdpa, bf16: max difference {difference:.2e} of max |state|")
    assert difference < 2e-2


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


# Every distinct 4-bit linear of the 11B language model (out, in), and the groups the fast loop joins.
SHAPES_11B = {"q/o and cross q/o": [(4096, 4096)], "k/v": [(1024, 4096)], "gate/up": [(14336, 4096)],
              "down": [(4096, 14336)], "joined q+k+v": [(4096, 4096), (1024, 4096), (1024, 4096)],
              "joined gate+up": [(14336, 4096), (14336, 4096)]}


@pytest.mark.parametrize("group", list(SHAPES_11B))
def test_nf4_kernel_matches_bitsandbytes_on_the_11b_shapes(group):
    import bitsandbytes.functional as bf
    import torch

    from llama_vision_helpers.nf4_gemv import NF4Weight, nf4_matmul, random_nf4_linear

    torch.manual_seed(0)
    modules = [random_nf4_linear(n, k) for n, k in SHAPES_11B[group]]
    dense = torch.cat([bf.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in modules]).double()
    weight = NF4Weight.from_linears(modules)
    for batch in (1, 2, 5, 8, 16, 32):
        x = torch.randn(batch, weight.k, dtype=torch.bfloat16, device="cuda")
        out = torch.full((batch, weight.n), float("nan"), dtype=torch.bfloat16, device="cuda")
        got = nf4_matmul(x, weight, out=out)
        bnb = torch.cat([m(x) for m in modules], dim=-1)  # bitsandbytes' own forward
        if batch == 1:
            assert torch.equal(got, bnb), "one token: bit for bit bitsandbytes' one-token kernel"
        got, bnb, expected = got.double(), bnb.double(), x.double() @ dense.T
        assert torch.isfinite(got).all(), f"batch {batch}: output not fully written"
        error = float((got - expected).norm() / expected.norm())
        assert error < 5e-3, f"batch {batch}: relative error {error:.2e}"
        assert float((got - bnb).norm() / bnb.norm()) < 5e-3


# lanes past the end of K: at K = 3136 the last step of 1024 has 2 active lanes (the second step of a pass of
# two); at K = 2112 the first step of the last pass has 2 and the second none
ONE_TOKEN_SHAPES = {"joined q+k+v": SHAPES_11B["joined q+k+v"], "down": SHAPES_11B["down"],
                    "K = 3136": [(192, 3136)], "K = 2112": [(192, 2112)]}


@pytest.mark.parametrize("group", list(ONE_TOKEN_SHAPES))
def test_nf4_one_token_kernel_is_bitsandbytes_in_every_configuration(group):
    # the tuner keeps one configuration a shape; each must give bitsandbytes' bits, split lanes included
    import torch

    from llama_vision_helpers import nf4_gemv
    from llama_vision_helpers.nf4_gemv import NF4Weight, random_nf4_linear

    torch.manual_seed(0)
    modules = [random_nf4_linear(n, k) for n, k in ONE_TOKEN_SHAPES[group]]
    weight = NF4Weight.from_linears(modules)
    x = torch.randn(1, weight.k, dtype=torch.bfloat16, device="cuda")
    expected = torch.cat([m(x) for m in modules], dim=-1)
    workspace = nf4_gemv._workspace(x.device)
    for config in nf4_gemv._matvec_configs():
        out = torch.full_like(expected, float("nan"))
        nf4_gemv._nf4_matvec_kernel.fn[nf4_gemv.launch_grid(weight.n)(config.kwargs)](
            x, *weight.kernel_operands(), out, *workspace, weight.n, weight.k, NESTED=True,
            NESTED_BLOCK=weight.nested_block, STEP=weight.lane_step_ptx, num_warps=config.num_warps, **config.kwargs)
        assert torch.equal(out, expected), f"{config}: differs from bitsandbytes' forward"


# (shapes, double quantization): K = 3136 has 49 blocks of 64, so only configurations that do not cut K fit; 1152
# has 18 (one or two parts), and 200 rows leave the last tile of 128 partial
FEW_TOKEN_SHAPES = {"joined q+k+v": (SHAPES_11B["joined q+k+v"], True), "down": (SHAPES_11B["down"], True),
                    "K = 3136": ([(192, 3136)], True), "200 x 1152": ([(200, 1152)], True),
                    "float32 scales": ([(200, 1152)], False)}


@pytest.mark.parametrize("group", list(FEW_TOKEN_SHAPES))
def test_nf4_few_token_kernel_is_right_in_every_fitting_configuration(group):
    # the tuner keeps one configuration a shape; each that fits must write every output, right
    import bitsandbytes.functional as bf
    import torch

    from llama_vision_helpers import nf4_gemv
    from llama_vision_helpers.nf4_gemv import NF4Weight, nf4_matmul, random_nf4_linear

    torch.manual_seed(0)
    shapes, nested = FEW_TOKEN_SHAPES[group]
    modules = [random_nf4_linear(n, k, double_quant=nested) for n, k in shapes]
    weight = NF4Weight.from_linears(modules)
    dense = torch.cat([bf.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in modules]).double()
    workspace = nf4_gemv._workspace(torch.device("cuda"))
    configs = nf4_gemv._fitting_matmul_configs(nf4_gemv._matmul_configs(), {"N": weight.n, "K": weight.k})
    assert configs, "no configuration fits"
    for batch, block_m in ((5, 16), (16, 16), (32, 32)):
        x = torch.randn(batch, weight.k, dtype=torch.bfloat16, device="cuda")
        expected = x.double() @ dense.T
        for config in [*configs, None]:
            out = torch.full((batch, weight.n), float("nan"), dtype=torch.bfloat16, device="cuda")
            if config is None:  # through the entry point: the tuner must only pick fitting ones
                nf4_matmul(x, weight, out=out)
            else:
                nf4_gemv._nf4_matmul_kernel.fn[nf4_gemv.launch_grid(weight.n)(config.kwargs)](
                    x, *weight.kernel_operands(), out, *workspace, batch, weight.n, weight.k, NESTED=nested,
                    NESTED_BLOCK=weight.nested_block, WEIGHTS=weight.weights_ptx, BLOCK_M=block_m,
                    PADDED=batch < block_m, num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs)
            name = config or "the tuner's pick"
            assert torch.isfinite(out).all(), f"{name}, {batch} tokens: output not fully written"
            error = float((out.double() - expected).norm() / expected.norm())
            assert error < 5e-3, f"{name}, {batch} tokens: relative error {error:.2e}"


def test_nf4_one_token_kernel_reads_activations_off_a_16_byte_boundary():
    import torch

    from llama_vision_helpers.nf4_gemv import NF4Weight, nf4_matmul, random_nf4_linear

    torch.manual_seed(0)
    module = random_nf4_linear(1024, 4096)
    buffer = torch.randn(1, 4096 + 1, dtype=torch.bfloat16, device="cuda")
    x = buffer[:, 1:]  # 2 bytes past the allocation's start
    assert x.data_ptr() % 16
    expected = module(x.clone())  # bitsandbytes' own kernel needs aligned activations too
    assert torch.equal(nf4_matmul(x, NF4Weight.from_linears([module])), expected)


def test_fast_loop_on_bnb_weights_runs_the_nf4_kernels_and_keeps_generates_logits(photo, monkeypatch):
    import torch

    from llama_vision_helpers import fast_decode
    from llama_vision_helpers.bench import compare_fast_logits
    from llama_vision_helpers.fast_decode import fast_decoder_for
    from llama_vision_helpers.generation import prepare_inputs, user_message

    vlm = load_model("tiny-random", backend="transformers", load_in_4bit=True)
    inputs = prepare_inputs(vlm, [user_message("Describe the image.", with_image=True)], photo)
    decoder = fast_decoder_for(vlm)
    layers = len(decoder.text.layers)
    assert len(decoder.nf4_weights) == 4 * layers, "every 4-bit group of every layer is read by the kernels"
    calls, kernel = [], fast_decode.nf4_matmul
    monkeypatch.setattr(fast_decode, "nf4_matmul", lambda x, w: calls.append(x.numel() // w.k) or kernel(x, w))
    for (index, name), weight in decoder.nf4_weights.items():
        x = torch.randn(1, 1, weight.k, dtype=torch.bfloat16, device="cuda")
        got = torch.cat(decoder.project(index, name, x), dim=-1)
        expected = torch.cat([m(x) for m in decoder.projections[index][name]], dim=-1)
        assert torch.equal(got, expected), f"{index}/{name}: one token differs from bitsandbytes' forward"
    index, name = next(iter(decoder.nf4_weights))
    x = torch.randn(4, 1, decoder.nf4_weights[index, name].k, dtype=torch.bfloat16, device="cuda")
    got = torch.cat(decoder.project(index, name, x), dim=-1)
    expected = torch.cat([m(x) for m in decoder.projections[index][name]], dim=-1)
    assert float((got - expected).float().norm() / expected.float().norm()) < 1e-2
    assert calls == [1] * len(decoder.nf4_weights) + [4], "one token and several go to the nf4 kernels"
    monkeypatch.undo()
    difference, agreement = compare_fast_logits(vlm, inputs, steps=24)
    print(f"\nnf4 kernels in the fast loop: max logit difference {100 * difference:.3f}%, top token agrees "
          f"{100 * agreement:.0f}%")
    assert difference < 0.005, f"fast loop: logits {100 * difference:.3f}% away from generate's"
