"""Reading bitsandbytes' nf4 layout (CPU): the joined weights dequantize exactly as bitsandbytes does."""

import pytest
import torch

bf = pytest.importorskip("bitsandbytes.functional")

from llama_vision_helpers.nf4_gemv import NF4Unsupported, NF4Weight, nf4_kernel_available, random_nf4_linear  # noqa: E402


def bnb_weight(module) -> torch.Tensor:
    return bf.dequantize_4bit(module.weight.data, module.weight.quant_state)


@pytest.mark.parametrize("double_quant", [True, False])
def test_joined_weights_dequantize_as_bitsandbytes_does(double_quant):
    torch.manual_seed(0)
    modules = [random_nf4_linear(n, 512, "cpu", double_quant=double_quant) for n in (128, 64, 64)]
    expected = torch.cat([bnb_weight(m) for m in modules])
    joined = NF4Weight.from_linears(modules)
    assert (joined.n, joined.k, joined.splits) == (256, 512, (128, 64, 64))
    assert torch.equal(joined.dequantize(), expected)


def test_joining_moves_storage_without_changing_the_modules():
    torch.manual_seed(1)
    modules = [random_nf4_linear(n, 256, "cpu") for n in (64, 192)]
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    before = [m(x) for m in modules]
    joined = NF4Weight.from_linears(modules)
    assert all(torch.equal(m(x), b) for m, b in zip(modules, before))
    assert modules[1].weight.data.untyped_storage().data_ptr() == joined.packed.untyped_storage().data_ptr()


@pytest.mark.parametrize("options", [{"quant_type": "fp4"}, {"blocksize": 128}])
def test_other_layouts_are_refused(options):
    with pytest.raises(NF4Unsupported):
        NF4Weight.from_linears([random_nf4_linear(64, 256, "cpu", **options)])


def test_the_kernel_is_for_cuda_only():
    assert not nf4_kernel_available("cpu")
