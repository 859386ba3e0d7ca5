"""Reading bitsandbytes' nf4 layout (CPU): the joined weights dequantize exactly as bitsandbytes does."""

import pytest
import torch

bf = pytest.importorskip("bitsandbytes.functional")

from llama_vision_helpers.nf4_gemv import (NF4Unsupported, NF4Weight, lane_step_asm, weights_asm,  # noqa: E402
                                          nf4_kernel_available, random_nf4_linear)


def bnb_weight(module) -> torch.Tensor:
    return bf.dequantize_4bit(module.weight.data, module.weight.quant_state)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("k, rows", [(512, (128, 64, 64)), (128, (128, 64, 64)), (128, (192, 320, 64))])
def test_joined_weights_dequantize_as_bitsandbytes_does(double_quant, k, rows):
    # at k=128 nested groups of 256 scales straddle the linears; with (192, 320, 64) a linear spans several groups
    torch.manual_seed(0)
    modules = [random_nf4_linear(n, k, "cpu", double_quant=double_quant) for n in rows]
    expected = torch.cat([bnb_weight(m) for m in modules])
    joined = NF4Weight.from_linears(modules)
    assert (joined.n, joined.k, joined.splits) == (sum(rows), k, rows)
    assert torch.equal(joined.dequantize(), expected)
    assert joined.nested_block == (1 if double_quant and k == 128 else 256)
    assert all(torch.equal(bnb_weight(m), w) for m, w in zip(modules, expected.split(list(rows))))


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


def test_packed_weights_off_a_16_byte_boundary_are_refused():
    module = random_nf4_linear(64, 256, "cpu")
    data = module.weight.data
    buffer = torch.empty(data.numel() + 1, dtype=data.dtype)
    buffer[1:] = data.reshape(-1)
    module.weight.data = buffer[1:].view(data.shape)
    with pytest.raises(NF4Unsupported, match="16-byte"):
        NF4Weight.from_linears([module])


@pytest.mark.parametrize("double_quant", [True, False])
def test_the_kernels_read_the_weight_in_their_argument_order(double_quant):
    joined = NF4Weight.from_linears([random_nf4_linear(64, 256, "cpu", double_quant=double_quant)])
    second_level = (joined.code2, joined.absmax2, joined.offset2) if double_quant else (joined.absmax,) * 3
    assert all(a is b for a, b in zip(joined.kernel_operands(), (joined.packed, joined.absmax, *second_level),
                                      strict=True))


def test_the_kernel_is_for_cuda_only():
    assert not nf4_kernel_available("cpu")


# --- the look-up PTX, run by a small interpreter of the instructions it uses -------------------------------

def prmt(a: int, b: int, selectors: int) -> int:
    """PTX `prmt.b32` in its default mode, for selectors without the sign bit (the look-up masks it off)."""
    source = (b << 32) | a
    return sum(((source >> (8 * ((selectors >> (4 * n)) & 7))) & 0xFF) << (8 * n) for n in range(4))


def bf16_value(bits: int) -> torch.Tensor:
    return torch.tensor([bits << 16], dtype=torch.int64).to(torch.int32).view(torch.float32)


def bf16_bits(value: torch.Tensor) -> int:
    return int(value.to(torch.bfloat16).view(torch.int16)) & 0xFFFF


def fma_bf16x2(a: int, b: int, c: int) -> int:  # each half's product is exact in float32, plus c, rounded to bf16
    return sum(bf16_bits(bf16_value((a >> s) & 0xFFFF) * bf16_value((b >> s) & 0xFFFF) + bf16_value((c >> s) & 0xFFFF))
               << s for s in (0, 16))


def f32(bits: int) -> torch.Tensor:
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)


def add_f32(a: int, b: int) -> int:
    return int((f32(a) + f32(b)).view(torch.int32)) & 0xFFFFFFFF


def cvt_bf16x2(a: int, b: int) -> int:  # `cvt.rn.bf16x2.f32 d, a, b`: a to the upper half, b to the lower
    return bf16_bits(f32(a)) << 16 | bf16_bits(f32(b))


PTX_OPS = {"mov.b32": lambda a: a, "and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b,
           "shr.u32": lambda a, b: a >> b, "shl.b32": lambda a, b: a << b, "prmt.b32": prmt,
           "fma.rn.bf16x2": fma_bf16x2, "add.f32": add_f32, "cvt.rn.bf16x2.f32": cvt_bf16x2}


def run_ptx(ptx: str, registers: dict[str, int]) -> dict[str, int]:
    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith((".reg", "{", "}")):
            continue
        op, operands = line.split(None, 1)
        if operands.startswith("{"):  # `mov.b32 {low, high}, word`: a word's two 16-bit halves
            halves, source = operands[1:].split("}")
            low, high = [h.strip() for h in halves.split(",")]
            word = registers[source.strip(" ,")]
            registers[low], registers[high] = word & 0xFFFF, word >> 16
            continue
        target, *sources = [o.strip() for o in operands.split(",")]
        values = [registers[o] if o in registers else int(o, 0) for o in sources]
        registers[target] = PTX_OPS[op](*values) & 0xFFFFFFFF
    return registers


def nf4_code() -> torch.Tensor:
    return NF4Weight.from_linears([random_nf4_linear(64, 256, "cpu")]).code


def test_the_weights_ptx_dequantizes_each_byte_as_bitsandbytes_one_token_kernel_does():
    torch.manual_seed(0)
    code = nf4_code()
    ptx = weights_asm(code)
    for first in range(0, 256, 4):  # every byte value, four to a 32-bit word
        scale = torch.rand(1) * 0.1
        word = sum((first + i) << (8 * i) for i in range(4))
        out = run_ptx(ptx, {"$8": word, "$9": int(scale.view(torch.int32)) & 0xFFFFFFFF})
        weights = [bf16_bits((code[n].to(torch.bfloat16) * scale.to(torch.bfloat16)).to(torch.bfloat16))
                   for b in range(first, first + 4) for n in (b >> 4, b & 15)]  # in order: high nibble first
        assert [out[f"${i}"] for i in range(8)] == weights


def lane_quarter_as_bitsandbytes(code, acc, scale, packed, x):
    """8 weights of a lane in bitsandbytes' one-token kernel (`gemm_4bit_simt`), written out in torch: the scale
    rounded to bf16, each weight code * scale rounded to bf16, each product rounded to bf16, a byte's two products
    added in float32, then added to the lane's sum."""
    nibbles = [n for byte in packed for n in (byte >> 4, byte & 15)]
    weights = (code.to(torch.bfloat16)[nibbles] * scale.to(torch.bfloat16)).to(torch.bfloat16)
    products = (weights * x).float()
    for i in range(4):
        acc = acc + (products[2 * i] + products[2 * i + 1])
    return acc


def test_the_lane_step_ptx_adds_as_bitsandbytes_one_token_kernel_does():
    torch.manual_seed(0)
    code = nf4_code()
    ptx = lane_step_asm(code)
    for trial in range(200):
        packed = torch.randint(0, 256, (4,)).tolist()
        x = torch.randn(8).to(torch.bfloat16)
        # sums from small to large against the products, so that the order of the float32 additions shows
        acc, scale = torch.randn(1) * 10 ** (trial % 5), torch.rand(1) * 0.1
        pairs = (x.view(torch.int16).to(torch.int64) & 0xFFFF).view(4, 2)
        registers = {"$1": int(acc.view(torch.int32)) & 0xFFFFFFFF, "$2": int(scale.view(torch.int32)) & 0xFFFFFFFF,
                     "$3": sum(b << (8 * i) for i, b in enumerate(packed))}
        registers.update({f"${4 + i}": int(pairs[i, 0] | pairs[i, 1] << 16) for i in range(4)})
        out = run_ptx(ptx, registers)
        expected = lane_quarter_as_bitsandbytes(code, acc, scale, packed, x)
        assert out["$0"] == int(expected.view(torch.int32)) & 0xFFFFFFFF
