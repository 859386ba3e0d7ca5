"""4-bit matrix products on bitsandbytes' own nf4 layout, dequantized in registers (Triton).

bitsandbytes stores a `Linear4bit` weight of shape (N, K) as N*K/2 bytes, row-major, two weights a byte (the
high nibble first), each nibble an index into the 16-value NF4 code; every block of 64 weights has a scale
(`absmax`). With double quantization the scales are themselves bytes: scale = code2[byte] * absmax2[block // 256]
+ offset. The kernels here read those bytes as stored (nothing is repacked) and look each nibble's code value
(in bf16, as bitsandbytes' one-token kernel holds it) up by byte permutes in registers, no memory access
(`permute_tables`).

One token: bitsandbytes' one-token kernel (`gemm_4bit_simt`, bitsandbytes 0.50) reproduced bit for bit, so the fast
loop keeps `generate`'s logits: each row's K read by 32 lanes (lane l takes weights 32l..32l+31 of every 1024, in
order), each weight code * scale rounded to bf16, each product rounded to bf16, a byte's two products added, then
to the lane's float32 sum; the 32 sums added in bitsandbytes' warp-reduction order. Each lane reads its 16 bytes of
a step as one 16-byte load, and asks for two steps' bytes before adding either (more bytes in flight per register,
which bound this kernel more than its instructions do). 2..32 tokens: the same weights made in registers from whole
words, each lane looking up the bytes the tensor cores take from it (a block's columns reordered, the activations
read in that order), products on the tensor cores. A row's lanes (one token) or its K (several tokens) are split
over programs as the tuner finds fastest; the last program of a tile to finish adds the parts up, so each product is
one launch. Measured against bitsandbytes and other kernels: docs/bench/decode-notes.md.

`nf4_matmul(x, weight)` is the one entry point; `NF4Weight.from_linears(...)` reads (and, for several linears
with the same input, joins) the modules' weights. The Triton kernels run on CUDA only; `nf4_kernel_available`
says whether they can run for a device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

try:  # Triton ships with PyTorch on CUDA machines; without it the decode loop keeps the modules' own forward
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None

BLOCK_SIZE = 64  # weights per scale, the only blocksize the kernels read
NESTED_BLOCK_SIZE = 256  # scales per second-level scale (bitsandbytes' default for double quantization)
MAX_BATCH = 32  # tokens a launch; the decode loop sends larger batches to bitsandbytes' own forward
VECTOR_LOAD_BYTES = 16  # the one-token kernel reads weights and activations this many bytes at a time (aligned)


class NF4Unsupported(ValueError):
    """The module's weight is not in the layout the kernels read (the caller keeps the module's forward)."""


@dataclass
class NF4Weight:
    """One or several bnb nf4 linears with the same input, joined row-wise: (N, K) with N = sum of their outputs.

    `packed`: (N, K/2) uint8. `absmax`: (N*K/64,) uint8 with `code2`/`absmax2`/`offset2` (double quantization,
    one second-level scale per `nested_block` blocks) or float32 scales with the three others None. `code`: the
    16 nf4 values (float32). `splits`: the output sizes of the joined linears, in order.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code2: torch.Tensor | None
    absmax2: torch.Tensor | None
    offset2: torch.Tensor | None
    code: torch.Tensor
    n: int
    k: int
    splits: tuple[int, ...]
    dtype: torch.dtype
    nested_block: int = NESTED_BLOCK_SIZE
    # the kernels' PTX for this code, made once, off the GPU
    weights_ptx: str = field(init=False)
    lane_step_ptx: str = field(init=False)

    def __post_init__(self) -> None:
        self.weights_ptx, self.lane_step_ptx = weights_asm(self.code), lane_step_asm(self.code)

    @classmethod
    def from_linears(cls, modules: Sequence[Any], *, share_storage: bool = True) -> "NF4Weight":
        """Read bnb `Linear4bit` modules (same in_features) into one joined weight. With `share_storage` the
        modules' packed bytes and scales are moved into the joined buffers (the modules then read views of them,
        same values), so joining costs no memory."""
        states = [_check_layout(m) for m in modules]
        k = states[0].shape[1]
        if any(s.shape[1] != k for s in states):
            raise NF4Unsupported("joined linears must share their input size")
        nested = states[0].nested
        if any(s.nested != nested for s in states):
            raise NF4Unsupported("joined linears must all use double quantization or none")
        code = states[0].code.float()
        if any(not torch.equal(s.code.float(), code) for s in states):
            raise NF4Unsupported("joined linears must share the nf4 code")
        packed = torch.cat([m.weight.data.reshape(-1).view(torch.uint8) for m in modules]) if len(modules) > 1 \
            else modules[0].weight.data.reshape(-1).view(torch.uint8)
        if packed.data_ptr() % VECTOR_LOAD_BYTES:
            raise NF4Unsupported(f"the one-token kernel reads packed weights {VECTOR_LOAD_BYTES} bytes at a time; "
                                 f"these start off a {VECTOR_LOAD_BYTES}-byte boundary")
        absmax = torch.cat([s.absmax.reshape(-1) for s in states]) if len(states) > 1 else states[0].absmax.reshape(-1)
        code2 = absmax2 = offset2 = None
        nested_block = NESTED_BLOCK_SIZE
        if nested:
            code2 = states[0].state2.code.float()
            if any(not torch.equal(s.state2.code.float(), code2) for s in states):
                raise NF4Unsupported("joined linears must share the nested code")
            if any(s.absmax.numel() % NESTED_BLOCK_SIZE for s in states[:-1]):
                # a group of 256 nested scales would straddle two linears: each block gets its own second level
                nested_block = 1
            second = [_second_level(s, nested_block) for s in states]
            absmax2 = torch.cat(second)
            offset2 = torch.cat([torch.full_like(a, float(s.offset)) for a, s in zip(second, states)])
        else:
            absmax = absmax.float()
        if share_storage and len(modules) > 1:
            byte_start = block_start = 0
            for module, state in zip(modules, states):
                n_bytes, n_blocks = module.weight.data.numel() * module.weight.data.element_size(), state.absmax.numel()
                module.weight.data = packed[byte_start:byte_start + n_bytes].view(module.weight.dtype) \
                    .view(module.weight.data.shape)
                if nested:
                    state.absmax = absmax[block_start:block_start + n_blocks]
                byte_start, block_start = byte_start + n_bytes, block_start + n_blocks
        n = sum(s.shape[0] for s in states)
        return cls(packed=packed.view(n, k // 2), absmax=absmax, code2=code2, absmax2=absmax2, offset2=offset2,
                   code=code, n=n, k=k, splits=tuple(s.shape[0] for s in states), dtype=states[0].dtype,
                   nested_block=nested_block)

    def dequantize(self) -> torch.Tensor:
        """The (N, K) weight in `dtype`, computed as bitsandbytes does (float32 products, rounded once)."""
        nibbles = torch.stack([self.packed >> 4, self.packed & 15], dim=-1).reshape(self.n, self.k).long()
        return (self.code[nibbles].view(-1, BLOCK_SIZE) * self.scales().view(-1, 1)).view(self.n, self.k).to(self.dtype)

    def kernel_operands(self) -> tuple[torch.Tensor, ...]:
        """The kernels' weight arguments: packed bytes, scales, and the second level (code, scales, offsets;
        without double quantization the scales stand in for those pointers, which are then never read)."""
        if self.code2 is None:
            return self.packed, self.absmax, self.absmax, self.absmax, self.absmax
        return self.packed, self.absmax, self.code2, self.absmax2, self.offset2

    def scales(self) -> torch.Tensor:
        """The float32 scale of each block of 64 weights, as bitsandbytes' `dequantize_4bit` computes it (the
        second-level product rounded, then the offset added; its one-token kernel fuses the two, as the kernels
        here do)."""
        if self.code2 is None:
            return self.absmax
        groups = torch.arange(self.absmax.numel(), device=self.absmax.device) // self.nested_block
        return self.code2[self.absmax.long()] * self.absmax2[groups] + self.offset2[groups]


def _second_level(state: Any, nested_block: int) -> torch.Tensor:
    """A double-quantized weight's second-level scales (float32), one per `nested_block` blocks."""
    absmax2 = state.state2.absmax.float().reshape(-1)
    if nested_block == NESTED_BLOCK_SIZE:
        return absmax2
    return absmax2.repeat_interleave(NESTED_BLOCK_SIZE // nested_block)[:state.absmax.numel() // nested_block]


def _check_layout(module: Any) -> Any:
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise NF4Unsupported(f"{type(module).__name__} has no bitsandbytes 4-bit weight")
    if state.quant_type != "nf4" or state.blocksize != BLOCK_SIZE:
        raise NF4Unsupported(f"needs nf4 with blocksize {BLOCK_SIZE}, got {state.quant_type}/{state.blocksize}")
    if len(state.shape) != 2 or state.shape[1] % BLOCK_SIZE:
        raise NF4Unsupported(f"needs an input size divisible by {BLOCK_SIZE}, got {tuple(state.shape)}")
    if state.nested and (state.state2.blocksize != NESTED_BLOCK_SIZE or state.absmax.dtype != torch.uint8):
        raise NF4Unsupported("needs double quantization with 8-bit scales in blocks of 256")
    if getattr(module, "bias", None) is not None:
        raise NF4Unsupported("linears with a bias are not supported")
    if state.dtype != torch.bfloat16:
        raise NF4Unsupported(f"the kernels compute in bf16, the weight dequantizes to {state.dtype}")
    return state


def nf4_kernel_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on `device`: CUDA with bf16 arithmetic (compute capability 8.0 on) and
    Triton installed."""
    device = torch.device(device)
    return triton is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


# --- the code look-up as byte permutes --------------------------------------------------------------------
# A nibble's code value (bf16, as bitsandbytes' one-token kernel holds its code) is two bytes. `prmt` picks 4 bytes
# out of 8 by 3-bit selectors, so 4 nibbles are looked up in a table of 8 entries with one instruction: entries
# 0-7 and 8-15 are looked up apart and the nibbles' top bits pick between the two, for the low and the high bytes;
# two more permutes put each value's bytes together: 16 permutes and 6 logic instructions for 8 nibbles, no
# memory access.
PAIR_SELECTORS = (0x4051, 0x6273)  # (low, high) bytes of byte 0's two values, then byte 1's, high nibble first
# A bf16 product rounded once, on every GPU with bf16 (sm_80 on): a fused multiply-add of -0.0, as CUDA's __hmul2
# is built there (`mul.bf16x2` needs sm_90); a product of +0 stays +0.
NEGATIVE_ZEROS = "0x80008000"


def permute_tables(code: torch.Tensor) -> tuple[int, ...]:
    """The 16 code values in bf16 as 8 words: low bytes of entries 0-3, 4-7, 8-11, 12-15, then high bytes."""
    bits = [b & 0xFFFF for b in code.float().cpu().to(torch.bfloat16).view(torch.int16).tolist()]
    low, high = [b & 0xFF for b in bits], [b >> 8 for b in bits]
    return tuple(sum(part[i + j] << (8 * j) for j in range(4)) for part in (low, high) for i in range(0, 16, 4))


def _permute_lookup_ptx(tables: Sequence[int], quad: str, pairs: Sequence[str]) -> str:
    """PTX that turns `quad` (4 packed bytes, 8 nibbles) into 4 words `pairs`, each the two bf16 code values of
    one byte (the high nibble's in the low half, as the weights are ordered)."""
    lines = [f"mov.b32 t{i}, {word:#010x};" for i, word in enumerate(tables)]
    lines += [f"and.b32 m, {quad}, 0x77777777;", f"shr.u32 s, {quad}, 1;", "and.b32 s, s, 0x44444444;",
              "or.b32 s, s, 0x32103210;"]
    for half in range(2):
        if half:
            lines += ["shr.u32 m, m, 16;", "shr.u32 s, s, 16;"]
        for table, target in ((0, "l"), (4, "h")):
            lines += [f"prmt.b32 a, t{table}, t{table + 1}, m;", f"prmt.b32 b, t{table + 2}, t{table + 3}, m;",
                      f"prmt.b32 {target}, a, b, s;"]
        lines += [f"prmt.b32 {pairs[2 * half + i]}, l, h, {sel:#06x};" for i, sel in enumerate(PAIR_SELECTORS)]
    return "\n".join(lines)


def _scaled_weights_ptx(code: torch.Tensor, quad: str, scale: str) -> list[str]:
    """PTX lines that leave in w0-w3 the bf16 weight pairs of the 4 bytes in `quad`, as bitsandbytes' one-token
    kernel dequantizes them: code * scale rounded to bf16, the block's float32 scale (register `scale`) rounded to
    bf16 first."""
    return [_permute_lookup_ptx(permute_tables(code), quad, ["w0", "w1", "w2", "w3"]), f"mov.b32 z, {NEGATIVE_ZEROS};",
            f"cvt.rn.bf16x2.f32 sc, {scale}, {scale};"] + [f"fma.rn.bf16x2 w{i}, w{i}, sc, z;" for i in range(4)]


_WEIGHT_REGISTERS = ".reg .b32 t<8>, m, s, a, b, l, h, w<4>, sc, z"


def weights_asm(code: torch.Tensor) -> str:
    """Inline PTX for `tl.inline_asm_elementwise(..., pack=1)` over a word of 4 packed bytes ($8) and its block's
    float32 scale ($9): the word's 8 weights in bf16 (`_scaled_weights_ptx`), in order, one a 16-bit output
    ($0-$7: byte 0's high nibble, its low nibble, byte 1's high nibble, ...)."""
    body = _scaled_weights_ptx(code, "$8", "$9")
    body += [f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, w{i};" for i in range(4)]
    return "{\n" + _WEIGHT_REGISTERS + ";\n" + "\n".join(body) + "\n}"


def lane_step_asm(code: torch.Tensor) -> str:
    """Inline PTX for a quarter of one lane's step in bitsandbytes' one-token kernel: $1 the lane's float32 sum,
    $2 the block's float32 scale, $3 a word of 4 packed bytes, $4-$7 the 8 activations of their weights (bf16
    pairs); $0 the new sum. As bitsandbytes: the weights as `_scaled_weights_ptx` makes them, each product
    rounded to bf16, a byte's two products added in float32 and then added to the sum."""
    body = _scaled_weights_ptx(code, "$3", "$2") + ["mov.b32 acc, $1;"]
    for i in range(4):
        body += [f"fma.rn.bf16x2 q, w{i}, ${4 + i}, z;", "shl.b32 c, q, 16;", "and.b32 d, q, 0xffff0000;",
                 "add.f32 e, c, d;", "add.f32 acc, acc, e;"]
    body.append("mov.b32 $0, acc;")
    return "{\n" + _WEIGHT_REGISTERS + ", acc, q, c, d, e;\n" + "\n".join(body) + "\n}"


MAX_SPLITS = 16  # parts a row's K may be cut into (the workspace holds this many partial sums an output)
MAX_ROWS = 28672  # the workspace for split products covers outputs up to this size (11B's joined gate/up)


if triton is not None:

    @triton.jit
    def _scale(absmax_ptr, code2_ptr, absmax2_ptr, offset2_ptr, block, NESTED: tl.constexpr,
               NESTED_BLOCK: tl.constexpr):
        if NESTED:  # one fused multiply-add, as bitsandbytes' kernels compute it
            q = tl.load(absmax_ptr + block).to(tl.int32)
            group = block // NESTED_BLOCK
            return tl.fma(tl.load(code2_ptr + q), tl.load(absmax2_ptr + group), tl.load(offset2_ptr + group))
        else:
            return tl.load(absmax_ptr + block)

    @triton.jit
    def _weight_words(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset2_ptr, rows, block, K,
                      NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr):
        """The packed bytes of block `block` (64 weights) of each of `rows` as (rows, 4, 2) words of 4 bytes
        (word 2c + w at [:, c, w]), and the rows' float32 scales of that block (rows,)."""
        # rows * (K // 64) * 8, not rows * (K // 8): Triton then knows each row starts 32-byte aligned
        offsets = rows[:, None] * (K // 64) * 8 + block * 8 + tl.arange(0, 8)[None, :]
        words = tl.load(packed_ptr.to(tl.pointer_type(tl.int32)) + offsets)
        scale = _scale(absmax_ptr, code2_ptr, absmax2_ptr, offset2_ptr, rows * (K // 64) + block, NESTED, NESTED_BLOCK)
        return tl.reshape(words, (rows.shape[0], 4, 2)), scale

    @triton.jit
    def _operand_weights(words, scale, WEIGHTS: tl.constexpr):
        """(R, 4, 2) words and (R,) scales -> the (R, 64) bf16 weights of the block, their columns in the order of
        `_operand_columns`.

        The tensor cores' first operand gives each lane c (of 4 side by side) columns 2c, 2c + 1, 2c + 8 and
        2c + 9 of every 16 of a row: 8 two-weight pairs, i.e. 8 bytes. With the block's columns reordered so
        that lane c's pairs are the bytes 8c..8c+7 (its words 2c and 2c + 1), each lane looks up exactly the
        words it holds and no weight moves between lanes; the activations are read in the same order."""
        w = tl.inline_asm_elementwise(WEIGHTS, "=h,=h,=h,=h,=h,=h,=h,=h,r,r",
                                      [words, tl.broadcast_to(scale[:, None, None], words.shape)],
                                      dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        # w[2j + e]: byte j of the word, its high (e = 0) or low nibble's weight; joined to (R, c, w, e, j % 2, j // 2)
        low, high = tl.join(tl.join(w[0], w[1]), tl.join(w[2], w[3])), tl.join(tl.join(w[4], w[5]), tl.join(w[6], w[7]))
        # (R, w, j // 2, j % 2, c, e): column 16 * (2w + j // 2) + 8 * (j % 2) + 2c + e
        t = tl.permute(tl.join(low, high), (0, 2, 5, 4, 1, 3))
        return tl.reshape(t, (words.shape[0], 64))

    @triton.jit
    def _operand_columns():
        """The weight (0..63 within its block) in each column of `_operand_weights`' order."""
        column = tl.arange(0, 64)
        word_in_lane, byte_high, byte_low = column // 32, (column // 16) % 2, (column // 8) % 2
        lane, nibble = (column // 2) % 4, column % 2
        return 2 * (4 * (2 * lane + word_in_lane) + 2 * byte_high + byte_low) + nibble

    @triton.jit
    def _load_words(pointer, CACHE: tl.constexpr):
        """The 4 words (32 bits each) from each 16-byte aligned address in `pointer`, one vector load each, by
        the read-only data path (nothing may write that memory during the launch); CACHE: a PTX cache qualifier
        ("" to keep them in L1)."""
        return tl.inline_asm_elementwise("ld.global.nc" + CACHE + ".v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l",
                                         [pointer.to(tl.int64)], dtype=(tl.int32,) * 4, is_pure=True, pack=1)

    @triton.jit
    def _lane_bytes(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset2_ptr, rows, start, first, K,
                    NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr):
        """Each lane's 16 packed bytes from weight `first` (C,) on, in `rows` (R,): 4 words (R, C), and their
        block's float32 scale (R, C). `first` is the lane's `start` clamped to K - 32: lanes past the end read
        the last 32 weights again and get a zero scale, so they add zeros (NaN where one of those activations
        is infinite, which leaves the row's sum non-finite either way)."""
        scale = _scale(absmax_ptr, code2_ptr, absmax2_ptr, offset2_ptr,
                       rows[:, None] * (K // 64) + (first // 64)[None, :], NESTED, NESTED_BLOCK)
        words = packed_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (K // 8) + (first // 8)[None, :]
        return _load_words(words, ".L1::no_allocate"), tl.where((start < K)[None, :], scale, 0.0)

    @triton.jit
    def _lane_add(acc, words, scale, x_ptr, first, STEP: tl.constexpr):
        """Each lane's sum (R, C) plus its 32 weights from `first` (C,) on: the 16 bytes `words` (4 words, each
        (R, C)) against their 32 activations, a quarter (4 bytes, `STEP`) at a time."""
        x_words = x_ptr.to(tl.pointer_type(tl.int32)) + first // 2  # two activations a word
        for quarter in tl.static_range(4):
            x = _load_words(x_words + 4 * quarter, "")
            acc = tl.inline_asm_elementwise(STEP, "=r,r,r,r,r,r,r,r",
                                            [acc, scale, words[quarter], tl.broadcast_to(x[0][None, :], acc.shape),
                                             tl.broadcast_to(x[1][None, :], acc.shape),
                                             tl.broadcast_to(x[2][None, :], acc.shape),
                                             tl.broadcast_to(x[3][None, :], acc.shape)],
                                            dtype=tl.float32, is_pure=True, pack=1)
        return acc

    @triton.jit
    def _halve(x):
        """(R, C) -> (R, C/2): column c plus column c + C/2 (one step of bitsandbytes' warp reduction)."""
        return tl.sum(tl.reshape(x, (x.shape[0], 2, x.shape[1] // 2)), axis=1)

    @triton.jit
    def _tree_sum(x, WIDTH: tl.constexpr):
        """(R, WIDTH) -> (R,), adding in the order of a warp's shuffle-down reduction (offsets WIDTH/2, ..., 1)."""
        if WIDTH >= 32:
            x = _halve(x)
        if WIDTH >= 16:
            x = _halve(x)
        if WIDTH >= 8:
            x = _halve(x)
        if WIDTH >= 4:
            x = _halve(x)
        if WIDTH >= 2:
            x = _halve(x)
        return tl.reshape(x, (x.shape[0],))

    @triton.jit
    def _arrive(partial, offsets, mask, work_ptr, count_ptr, tile, part, splits, part_stride):
        """Store this program's partial sums; True in the last program of the tile to arrive (which then reads
        every part back and resets the tile's counter with `_leave`)."""
        tl.store(work_ptr + part * part_stride + offsets, partial, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        return arrived == splits - 1

    @triton.jit
    def _leave(count_ptr, tile):
        tl.atomic_xchg(count_ptr + tile, 0)  # ready for the next launch (and CUDA-graph replay)

    def _matvec_configs():
        return [triton.Config({"BLOCK_N": bn, "SPLITS": sp}, num_warps=w)
                for bn, sp, w in [(4, 1, 4), (8, 1, 4), (16, 1, 4), (8, 2, 4), (16, 2, 4), (16, 4, 4), (32, 1, 8),
                                  (32, 2, 8), (8, 1, 2)]]

    def _matmul_configs():
        # the tuner's picks on every 11B shape at 2-32 tokens (H100, docs/bench/nf4-matmul-splits-h100.md): 128 rows
        # on one warp group, 3-4 stages, K cut into 4 or 8 parts; neighbours of those, and two that do not cut K
        # (for outputs past MAX_ROWS, and K whose blocks the parts would not divide)
        return [triton.Config({"BLOCK_N": bn, "SPLITS": sp}, num_warps=w, num_stages=s)
                for bn, sp, w, s in [(128, 2, 4, 4), (128, 4, 4, 3), (128, 4, 4, 4), (128, 8, 4, 3), (128, 8, 4, 4),
                                     (128, 16, 4, 4), (128, 8, 8, 4), (64, 8, 4, 4), (128, 1, 4, 4), (64, 1, 4, 3)]]

    def _fitting_configs(configs, named_args, **kwargs):
        """Split configurations only where the workspace holds the outputs."""
        return [c for c in configs if c.kwargs["SPLITS"] == 1 or named_args["N"] <= MAX_ROWS]

    def _fitting_matmul_configs(configs, named_args, **kwargs):
        """As `_fitting_configs`, and each part of K whole blocks."""
        return [c for c in _fitting_configs(configs, named_args)
                if (named_args["K"] // BLOCK_SIZE) % c.kwargs["SPLITS"] == 0]

    @triton.autotune(configs=_matvec_configs(), key=["N", "K"],
                     prune_configs_by={"early_config_prune": _fitting_configs})
    @triton.jit
    def _nf4_matvec_kernel(x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset2_ptr, out_ptr, work_ptr,
                           count_ptr, N, K, NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, STEP: tl.constexpr,
                           BLOCK_N: tl.constexpr, SPLITS: tl.constexpr):
        """One token, bit for bit as bitsandbytes' one-token kernel: out[n] = sum_k x[k] * W[n, k].

        Program (i, s): BLOCK_N rows; of the 32 lanes of each row, lanes s, s + SPLITS, ... Each lane adds its
        32 weights of every 1024 in order (`STEP`, PTX from `lane_step_asm`, a word of 4 bytes at a time); the
        lane sums are then added in the warp reduction's order, the program's lanes first (they form the node
        of that order for residue s), the SPLITS parts last."""
        tile, part = tl.program_id(0), tl.program_id(1)
        WIDTH: tl.constexpr = 32 // SPLITS
        rows = tl.minimum(tile * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)  # the last tile recomputes a row
        lanes = part + SPLITS * tl.arange(0, WIDTH)
        acc = tl.zeros((BLOCK_N, WIDTH), dtype=tl.float32)
        for k0 in range(0, K, 2048):  # two steps of 1024 a pass: both steps' bytes are asked for before either is added
            start = k0 + lanes * 32  # each lane's first weight of the first step
            first, first2 = tl.minimum(start, K - 32), tl.minimum(start + 1024, K - 32)
            words, scale = _lane_bytes(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset2_ptr, rows, start,
                                       first, K, NESTED, NESTED_BLOCK)
            words2, scale2 = _lane_bytes(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset2_ptr, rows,
                                         start + 1024, first2, K, NESTED, NESTED_BLOCK)
            acc = _lane_add(acc, words, scale, x_ptr, first, STEP)
            acc = _lane_add(acc, words2, scale2, x_ptr, first2, STEP)
        partial = _tree_sum(acc, WIDTH)
        out_rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        if SPLITS == 1:
            tl.store(out_ptr + out_rows, partial.to(out_ptr.dtype.element_ty), mask=out_rows < N)
        else:
            if _arrive(partial, out_rows, out_rows < N, work_ptr, count_ptr, tile, part, SPLITS, N):
                tl.debug_barrier()
                parts = tl.load(work_ptr + tl.arange(0, SPLITS)[None, :] * N + out_rows[:, None],
                                mask=(out_rows < N)[:, None], other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + out_rows, _tree_sum(parts, SPLITS).to(out_ptr.dtype.element_ty),
                         mask=out_rows < N)
                _leave(count_ptr, tile)

    @triton.autotune(configs=_matmul_configs(), key=["N", "K", "BLOCK_M", "PADDED"],
                     prune_configs_by={"early_config_prune": _fitting_matmul_configs})
    @triton.jit
    def _nf4_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset2_ptr, out_ptr, work_ptr,
                           count_ptr, M, N, K, NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, WEIGHTS: tl.constexpr,
                           BLOCK_M: tl.constexpr, PADDED: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr):
        """A few tokens (2..32): a block of 64 weights a step for BLOCK_N rows, read a word (4 bytes) at a time,
        looked up by byte permutes and scaled in bf16 in registers (`WEIGHTS`, PTX from `weights_asm`), already
        laid out as the tensor cores' first operand (`_operand_weights`); the activations read in the same column
        order. Program (i, s) takes part s of SPLITS of each row's blocks; the last part to arrive adds them up."""
        tile, part = tl.program_id(0), tl.program_id(1)
        rows = tl.minimum(tile * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)  # the last tile recomputes a row
        tokens = tl.arange(0, BLOCK_M)
        per_part = (K // 64) // SPLITS  # SPLITS divides K // 64: the tuner keeps only such configurations
        columns = _operand_columns()
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for block in range(part * per_part, part * per_part + per_part):
            words, scale = _weight_words(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset2_ptr, rows, block, K,
                                         NESTED, NESTED_BLOCK)
            x_offsets = tokens[None, :] * K + (block * 64 + columns)[:, None]
            if PADDED:  # columns past M read nothing (one row read again in each was slower)
                x = tl.load(x_ptr + x_offsets, mask=(tokens < M)[None, :], other=0.0)
            else:
                x = tl.load(x_ptr + x_offsets)
            acc = tl.dot(_operand_weights(words, scale, WEIGHTS), x, acc)
        out_rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        offsets = tokens[None, :] * N + out_rows[:, None]
        mask = (tokens[None, :] < M) & (out_rows[:, None] < N)
        if SPLITS == 1:
            tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            if _arrive(acc, offsets, mask, work_ptr, count_ptr, tile, part, SPLITS, M * N):
                tl.debug_barrier()
                total = tl.zeros_like(acc)
                for other in range(0, SPLITS):
                    total += tl.load(work_ptr + other * M * N + offsets, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)
                _leave(count_ptr, tile)


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def launch_grid(n: int) -> Any:
    """Both kernels' grid for N outputs, from a configuration's BLOCK_N and SPLITS: tiles of BLOCK_N rows, each
    cut into SPLITS parts."""
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLITS"])


def _workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial sums and arrival counters for split products, one pair per device (launches on one stream run
    one after another, and each leaves its counters at zero)."""
    if device not in _workspaces:
        _workspaces[device] = (torch.empty(MAX_SPLITS * MAX_BATCH * MAX_ROWS, dtype=torch.float32, device=device),
                               torch.zeros(MAX_ROWS, dtype=torch.int32, device=device))
    return _workspaces[device]


def nf4_matmul(x: torch.Tensor, weight: NF4Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) in bf16 times the nf4 weight's transpose: (..., N), as `Linear4bit` computes it.

    The decode paths call this for 4-bit linears (or joined groups of linears) of a step; up to MAX_BATCH
    tokens a launch. `out`: an optional contiguous (tokens, N) bf16 buffer to write into (not overlapping x)."""
    if x.dtype != torch.bfloat16:
        raise TypeError(f"nf4_matmul reads bf16 activations, got {x.dtype}")
    shape = x.shape
    x2 = x.reshape(-1, weight.k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > MAX_BATCH and out is None:
        return torch.cat([nf4_matmul(chunk, weight) for chunk in x2.split(MAX_BATCH)]).view(*shape[:-1], weight.n)
    if m > MAX_BATCH:
        raise ValueError(f"nf4_matmul writes at most {MAX_BATCH} tokens into `out`")
    if m == 1 and x2.data_ptr() % VECTOR_LOAD_BYTES:
        x2 = x2.clone()
    if out is None:
        out = torch.empty((m, weight.n), dtype=x.dtype, device=x.device)
    nested = weight.code2 is not None
    args = (x2, *weight.kernel_operands(), out, *_workspace(x.device))
    grid = launch_grid(weight.n)
    if m == 1:
        _nf4_matvec_kernel[grid](*args, weight.n, weight.k, NESTED=nested, NESTED_BLOCK=weight.nested_block,
                                 STEP=weight.lane_step_ptx)
    else:
        block_m = 16 if m <= 16 else 32
        _nf4_matmul_kernel[grid](*args, m, weight.n, weight.k, NESTED=nested, NESTED_BLOCK=weight.nested_block,
                                 WEIGHTS=weight.weights_ptx, BLOCK_M=block_m, PADDED=m < block_m)
    return out.view(*shape[:-1], weight.n)


def random_nf4_linear(n: int, k: int, device: torch.device | str = "cuda", *, double_quant: bool = True,
                      quant_type: str = "nf4", blocksize: int = BLOCK_SIZE) -> Any:
    """A bitsandbytes `Linear4bit` (k -> n) with random weights quantized as `load_model(load_in_4bit=True)`
    quantizes them, for checks and benchmarks."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    weight = torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02
    module = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=double_quant,
                               quant_type=quant_type, device="meta")
    packed, state = bf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                     quant_type=quant_type)
    module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                                      compress_statistics=double_quant, quant_type=quant_type, bnb_quantized=True,
                                      module=module)
    return module
