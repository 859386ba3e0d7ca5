"""A fast decode loop for Mllama: HF prefill, then a static KV cache and one CUDA graph per token.

Hugging Face `generate` launches about 1,400 small kernels per token from Python, so on a GPU the decode loop
is bound by the CPU, not by reading the weights. Here the prompt and image go through the model as usual
(prefill), the caches are copied into fixed buffers (self-attention keys/values up to a fixed length; the
cross-attention keys/values of the image, fixed after prefill), and the per-token step, which then has
fixed shapes, is captured once in a CUDA graph and replayed. Sampling (temperature, min_p) runs on the GPU.
On a CPU the same loop runs without the graph, which is how its correctness is tested against `generate`.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .nf4_gemv import nf4_kernel_available, nf4_matmul

# What the fast loop understands; anything else (beam search, repetition penalty, ...) goes to `generate`.
SUPPORTED_OPTIONS = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "min_p", "num_return_sequences",
                     "use_cache", "streamer", "stopping_criteria"}
LENGTH_BUCKET = 256
KEEP_STATES = 2  # buffers and graphs for the last few (batch, length) shapes


class FastDecodeUnsupported(RuntimeError):
    """This model or request cannot use the fast loop; the caller falls back to `generate`."""


@dataclass
class _State:
    """Fixed buffers (and the captured graph) for one batch size and cache length."""

    batch: int
    length: int
    input_ids: torch.Tensor
    position: torch.Tensor
    key_positions: torch.Tensor
    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    # the image's cross-attention keys/values and masks: one row shared by every row (a prompt's k samples) or
    # one per row (the batched decoder's slots)
    cross_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    cross_values: dict[int, torch.Tensor] = field(default_factory=dict)
    cross_mask: torch.Tensor | None = None
    row_mask: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    graph: Any = None
    # where new keys/values are written, when `keys`/`values` are views of larger buffers (the batched decoder's
    # slots): written in place into the buffers themselves, since a compiled write through a view copies it whole
    write_keys: dict[int, torch.Tensor] | None = None
    write_values: dict[int, torch.Tensor] | None = None


class FastDecoder:
    """Decode for one loaded MllamaForConditionalGeneration; keep one per model (graphs are reused)."""

    def __init__(self, model: Any, *, use_cuda_graph: bool | None = None, use_nf4_kernel: bool | None = None,
                 compile_elementwise: bool | None = None) -> None:
        language_model = getattr(getattr(model, "model", None), "language_model", None)
        if language_model is None or not hasattr(model, "lm_head"):
            raise FastDecodeUnsupported("not an Mllama model")
        devices = {p.device for p in model.parameters()}
        if len(devices) != 1:
            raise FastDecodeUnsupported("the model is spread over several devices")
        self.model = model
        self.text = language_model
        config = language_model.config
        self.cross_layers = set(config.cross_attention_layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.max_positions = config.max_position_embeddings
        self.device = devices.pop()
        self.dtype = language_model.embed_tokens.weight.dtype
        self.use_cuda_graph = self.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        self.gates = {i: (layer.cross_attn_attn_gate.tanh(), layer.cross_attn_mlp_gate.tanh())
                      for i, layer in enumerate(self.text.layers) if i in self.cross_layers}
        self._states: OrderedDict[tuple[int, int], _State] = OrderedDict()
        self.projections = {index: self._projection_groups(index, layer) for index, layer in enumerate(self.text.layers)}
        self.projections["lm_head"] = {"lm_head": [model.lm_head]}
        if use_nf4_kernel is None:
            # The default on CUDA: bitsandbytes nf4 weights go through the nf4 kernels, one token bit for bit as
            # bitsandbytes' own one-token kernel (the one `generate` runs), several tokens (k samples, the engine's
            # slots) on the tensor cores (docs/bench/decode-notes.md). LLAMA_VISION_NF4_KERNEL=0 turns them off.
            use_nf4_kernel = os.environ.get("LLAMA_VISION_NF4_KERNEL", "") != "0"
        use_kernel = use_nf4_kernel and nf4_kernel_available(self.device)
        self.nf4_weights: dict[tuple[Any, str], Any] = self._join_nf4_weights() if use_kernel else {}
        # on a GPU, plain linears of a group are joined too (one product instead of three or two)
        self.dense_weights = self._join_dense_weights() if self.device.type == "cuda" else {}
        compile_ops = self.device.type == "cuda" if compile_elementwise is None else compile_elementwise
        self._ops = _compiled_ops() if compile_ops else _EAGER_OPS

    def _projection_groups(self, index: int, layer) -> dict[str, list]:
        """The linears of one layer, grouped by the input they share (each group is one product)."""
        if index in self.cross_layers:
            attention = layer.cross_attn
            groups = {"q": [attention.q_proj], "o": [attention.o_proj]}
        else:
            attention = layer.self_attn
            groups = {"qkv": [attention.q_proj, attention.k_proj, attention.v_proj], "o": [attention.o_proj]}
        groups["gate_up"] = [layer.mlp.gate_proj, layer.mlp.up_proj]
        groups["down"] = [layer.mlp.down_proj]
        return groups

    def _join_nf4_weights(self) -> dict[tuple[Any, str], Any]:
        """bitsandbytes nf4 weights of each group, joined, for the 4-bit kernel (empty for other weights)."""
        from .nf4_gemv import NF4Unsupported, NF4Weight

        weights = {}
        for index, groups in self.projections.items():
            for name, modules in groups.items():
                try:
                    weights[index, name] = NF4Weight.from_linears(modules)
                except NF4Unsupported:
                    continue
        return weights

    def _join_dense_weights(self) -> dict[tuple[Any, str], tuple[torch.Tensor, list[int]]]:
        """Plain (bias-free) linears of each group with several members, their weights concatenated; the modules
        then hold views of the joined weight (same values, no extra memory)."""
        weights = {}
        for index, groups in self.projections.items():
            for name, modules in groups.items():
                if len(modules) < 2 or (index, name) in self.nf4_weights or not all(
                        type(m) is torch.nn.Linear and m.bias is None for m in modules):
                    continue
                joined = torch.cat([m.weight.data for m in modules])
                start = 0
                for module in modules:
                    module.weight.data = joined[start:start + module.out_features]
                    start += module.out_features
                weights[index, name] = (joined, [m.out_features for m in modules])
        return weights

    def project(self, index: Any, name: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs of one group of linears (`projections[index][name]`) for the decode input `x`.

        The hook every decode path calls for its matrix products: bitsandbytes nf4 weights go through the 4-bit
        kernels (`nf4_gemv.nf4_matmul`, one launch for the whole group), anything else through the modules."""
        dense = self.dense_weights.get((index, name))
        if dense is not None:
            return F.linear(x, dense[0]).split(dense[1], dim=-1)
        weight = self.nf4_weights.get((index, name))
        if weight is None:
            return tuple(module(x) for module in self.projections[index][name])
        return nf4_matmul(x, weight).split(weight.splits, dim=-1)

    # --- one token through the language model ------------------------------------------------------
    # Inside a CUDA graph every small kernel still costs a few microseconds, so the elementwise work is written
    # with fewer kernels than transformers uses (same arithmetic, same results).

    # The step is written so that the elementwise work between products is a few fused functions (`_Ops`),
    # compiled by inductor on a GPU; the residual add of each block is done with the next norm.

    def _self_attention_layer(self, layer, index: int, hidden, delta, cos, sin, state: _State, mask):
        ops, batch = self._ops, hidden.shape[0]
        hidden, x = ops.add_rms_norm(hidden, delta, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        q, k, v = self.project(index, "qkv", x)
        q = ops.rotary_and_cache(q, k, v, cos, sin, (state.write_keys or state.keys)[index],
                                 (state.write_values or state.values)[index], state.position, self.num_heads,
                                 self.num_kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q, state.keys[index], state.values[index], attn_mask=mask,
                                             scale=layer.self_attn.scaling, enable_gqa=True)
        (o,) = self.project(index, "o", out.transpose(1, 2).reshape(batch, 1, -1))
        norm = layer.post_attention_layernorm
        hidden, x = ops.add_rms_norm(hidden, o, norm.weight, norm.variance_epsilon)
        (down,) = self.project(index, "down", ops.silu_mul(*self.project(index, "gate_up", x)))
        return hidden, down

    def _cross_attention_layer(self, layer, index: int, hidden, delta, state: _State):
        ops, batch = self._ops, hidden.shape[0]
        attention = layer.cross_attn
        attention_gate, mlp_gate = self.gates[index]
        hidden, x = ops.add_rms_norm(hidden, delta, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        (q,) = self.project(index, "q", x)
        q = ops.head_rms_norm(q, attention.q_norm.weight, attention.q_norm.variance_epsilon, self.num_heads,
                              self.head_dim)
        keys, values, mask = state.cross_keys[index], state.cross_values[index], state.cross_mask
        if keys.shape[0] < batch:
            # one image shared by the rows (a prompt's k samples), read through views that repeat it: the rows'
            # reads of it then come from the cache, and no copy per row is kept
            keys, values, mask = (t.expand(batch, -1, -1, -1) for t in (keys, values, mask))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attention.scaling, enable_gqa=True)
        (o,) = self.project(index, "o", out.transpose(1, 2).reshape(batch, 1, -1))
        norm = layer.post_attention_layernorm
        hidden, x = ops.gated_add_rms_norm(hidden, o, attention_gate, norm.weight, norm.variance_epsilon)
        (down,) = self.project(index, "down", ops.silu_mul(*self.project(index, "gate_up", x)))
        return hidden, ops.gate_rows(down, state.row_mask, mlp_gate)

    def _step(self, state: _State) -> None:
        """Logits for `state.input_ids` at `state.position`, written into `state.logits` (fixed shapes)."""
        hidden = self.text.embed_tokens(state.input_ids)
        position_ids = state.position.view(-1, 1).expand(state.batch, 1)
        cos, sin = self.text.rotary_emb(hidden, position_ids)
        half = self.head_dim // 2
        cos, sin = cos.unsqueeze(1), torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).unsqueeze(1)
        # positions not yet written are masked out with the dtype's most negative value, as transformers does
        # (one row of the mask per sequence: each may be at its own position)
        mask = torch.where(state.key_positions <= state.position.view(-1, 1), 0.0, torch.finfo(hidden.dtype).min)
        mask = mask.to(hidden.dtype).view(-1, 1, 1, state.length)
        delta = torch.zeros_like(hidden)
        for index, layer in enumerate(self.text.layers):
            if index in self.cross_layers:
                if state.cross_mask is not None:
                    hidden, delta = self._cross_attention_layer(layer, index, hidden, delta, state)
            else:
                hidden, delta = self._self_attention_layer(layer, index, hidden, delta, cos, sin, state, mask)
        _, x = self._ops.add_rms_norm(hidden, delta, self.text.norm.weight, self.text.norm.variance_epsilon)
        (logits,) = self.project("lm_head", "lm_head", x)
        state.logits.copy_(logits[:, -1, :])

    # --- buffers, prefill and the graph -------------------------------------------------------------

    def _state(self, batch: int, length: int, vision_tokens: int | None, vocab: int) -> _State:
        key = (batch, length, vision_tokens)
        if key in self._states:
            self._states.move_to_end(key)
            return self._states[key]
        while len(self._states) >= KEEP_STATES:
            self._states.popitem(last=False)
        kv = dict(dtype=self.dtype, device=self.device)
        shape = (batch, self.num_kv_heads, length, self.head_dim)
        self_layers = [i for i in range(len(self.text.layers)) if i not in self.cross_layers]
        state = _State(
            batch=batch, length=length,
            input_ids=torch.zeros((batch, 1), dtype=torch.long, device=self.device),
            position=torch.zeros(batch, dtype=torch.long, device=self.device),
            key_positions=torch.arange(length, device=self.device),
            keys={i: torch.zeros(shape, **kv) for i in self_layers},
            values={i: torch.zeros(shape, **kv) for i in self_layers},
            logits=torch.zeros((batch, vocab), **kv),
        )
        if vision_tokens is not None:  # one prompt's image, shared by its rows (the k samples)
            cross_shape = (1, self.num_kv_heads, vision_tokens, self.head_dim)
            state.cross_keys = {i: torch.zeros(cross_shape, **kv) for i in self.cross_layers}
            state.cross_values = {i: torch.zeros(cross_shape, **kv) for i in self.cross_layers}
            state.cross_mask = torch.zeros((1, 1, 1, vision_tokens), **kv)
            state.row_mask = torch.zeros((1, 1, 1), **kv)
        self._states[key] = state
        return state

    def _capture(self, state: _State) -> None:
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph: lazy initialisation, allocator, kernel selection
                self._step(state)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread-local: in a server, other threads (preparing the next requests' inputs) use the GPU meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._step(state)
        state.graph = graph

    def image_masks(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention mask (rows, 1, 1, vision tokens) and row mask (rows, 1, 1) of every new token:
        each sees the image as the prompt's last token does."""
        from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

        cross_mask, row_mask = _prepare_cross_attention_mask(
            inputs["cross_attention_mask"][:, -1:], num_vision_tokens=self.model.model.vision_model.num_patches,
            dtype=self.dtype)
        return cross_mask, row_mask[:, 0]

    def prefill_forward(self, inputs: dict) -> tuple[Any, dict]:
        """The model's forward pass over prompts (one row each, no padding) with their images, keeping the caches
        and the last logits; inputs on the CPU move to the model's device without waiting for its queue. Returns
        the output and the inputs on the device.

        An attention mask of ones is left out: it changes nothing, but transformers would read it on the host in
        the middle of the pass, after the vision encoder, and the CPU would launch the language model only then."""
        from .generation import inputs_to_device

        mask = inputs.get("attention_mask")
        if mask is not None and bool(mask.all()):  # read before the pass: on the CPU, or while the queue is short
            inputs = {name: value for name, value in inputs.items() if name != "attention_mask"}
        inputs = inputs_to_device(inputs, self.device)
        return self.model(**inputs, use_cache=True, logits_to_keep=1), inputs

    def _prefill(self, inputs: dict, batch: int, max_new_tokens: int) -> tuple[_State, torch.Tensor]:
        """Run the prompt (and image) through the model once, fill the fixed buffers, return the last logits."""
        prompt_length = inputs["input_ids"].shape[1]
        length = -(-(prompt_length + max_new_tokens) // LENGTH_BUCKET) * LENGTH_BUCKET
        if length > self.max_positions:
            raise FastDecodeUnsupported("prompt and answer are longer than the model's context")
        output, inputs = self.prefill_forward(inputs)
        cache = output.past_key_values
        has_image = inputs.get("cross_attention_mask") is not None and inputs.get("pixel_values") is not None
        vision_tokens = cache.layers[min(self.cross_layers)].keys.shape[2] if has_image else None
        state = self._state(batch, length, vision_tokens, output.logits.shape[-1])
        for index in state.keys:
            layer = cache.layers[index]
            state.keys[index][:, :, :prompt_length].copy_(layer.keys.expand(batch, -1, -1, -1))
            state.values[index][:, :, :prompt_length].copy_(layer.values.expand(batch, -1, -1, -1))
        if has_image:
            for index in self.cross_layers:
                state.cross_keys[index].copy_(cache.layers[index].keys)
                state.cross_values[index].copy_(cache.layers[index].values)
            cross_mask, row_mask = self.image_masks(inputs)
            state.cross_mask.copy_(cross_mask)
            state.row_mask.copy_(row_mask)
        return state, output.logits[:, -1, :].float().expand(batch, -1)

    def _decode(self, state: _State, tokens: torch.Tensor, position: int) -> torch.Tensor:
        state.input_ids.copy_(tokens.view(state.batch, 1))
        state.position.fill_(position)
        self._run_step(state)
        return state.logits.float()

    def _run_step(self, state: _State) -> None:
        """One step on the state's current inputs: the captured graph on CUDA (captured the first time), else eager."""
        if self.use_cuda_graph:
            if state.graph is None:
                self._capture(state)
            state.graph.replay()
        else:
            self._step(state)

    # --- the loop -----------------------------------------------------------------------------------

    @staticmethod
    def _next_tokens(logits: torch.Tensor, *, do_sample: bool, temperature: float, min_p: float | None,
                     banned: list[int] | None) -> torch.Tensor:
        """Greedy, or temperature then min_p sampling (the order `generate` applies them)."""
        if banned:
            logits = logits.clone()
            logits[:, banned] = float("-inf")
        if not do_sample:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if min_p:
            probs = torch.where(probs >= min_p * probs.max(dim=-1, keepdim=True).values, probs, 0.0)
        return torch.multinomial(probs, 1).squeeze(1)

    @torch.inference_mode()
    def generate(self, inputs: dict, *, max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool = True,
                 temperature: float = 1.0, min_p: float | None = None, num_return_sequences: int = 1,
                 streamer: Any = None, stopping_criteria: Any = None, use_cache: bool = True) -> torch.Tensor:
        """Token ids (prompt + answer, one row per sequence), as `model.generate` returns them."""
        generation_config = self.model.generation_config
        eos = generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else (eos or [0])[0]
        prompt = inputs["input_ids"]
        if prompt.shape[0] != 1:
            raise FastDecodeUnsupported("one prompt at a time")
        batch = num_return_sequences
        state, logits = self._prefill(inputs, batch, max_new_tokens)
        if streamer is not None:
            streamer.put(prompt.cpu())
        # Tokens are chosen on the device, and the next step is queued before the host reads them (through a
        # pinned buffer and an event), so streaming and stop checks overlap the device's work on the next token.
        # A step queued after the last token is read is simply not used.
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        eos_ids = torch.tensor(eos, dtype=torch.long, device=self.device)
        pinned = self.device.type == "cuda"
        host_tokens = torch.empty(batch, dtype=torch.long, pin_memory=pinned)
        done, eos_host = torch.zeros(batch, dtype=torch.bool), eos_ids.cpu()
        produced: list[torch.Tensor] = []
        prompt_length = prompt.shape[1]

        def sequences() -> torch.Tensor:
            return torch.cat([prompt.cpu().expand(batch, -1), torch.stack(produced, dim=1)], dim=1)

        for step in range(max_new_tokens):
            tokens = self._next_tokens(logits, do_sample=do_sample, temperature=temperature, min_p=min_p,
                                       banned=eos if step < min_new_tokens else None).to(self.device)
            tokens = torch.where(finished, pad, tokens)  # a finished sequence only pads
            finished |= torch.isin(tokens, eos_ids)
            host_tokens.copy_(tokens, non_blocking=pinned)
            copied = torch.cuda.Event() if pinned else None
            if copied is not None:
                copied.record(torch.cuda.current_stream(self.device))
            if step < max_new_tokens - 1:
                logits = self._decode(state, tokens, prompt_length + step)
            if copied is not None:
                copied.synchronize()
            produced.append(host_tokens.clone())
            if streamer is not None:
                streamer.put(produced[-1])
            done |= torch.isin(produced[-1], eos_host)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            if stopping_criteria is not None and bool(torch.as_tensor(stopping_criteria(sequences(), None)).all()):
                break
        if streamer is not None:
            streamer.end()
        return sequences().to(prompt.device)


    @torch.inference_mode()
    def teacher_forced_logits(self, inputs: dict, tokens: list[int]) -> torch.Tensor:
        """Logits after the prompt and after each of `tokens` but the last (float32, one row per step):
        the fast loop's view of the same sequence that `generate` produced, for comparing the two."""
        state, logits = self._prefill(inputs, 1, len(tokens))
        rows = [logits[0]]
        prompt_length = inputs["input_ids"].shape[1]
        for step, token in enumerate(tokens[:-1]):
            # a copy: for a float32 model the step's logits are the state's own buffer, which the next step rewrites
            rows.append(self._decode(state, torch.tensor([token], device=self.device), prompt_length + step)[0].clone())
        return torch.stack(rows)


class _Ops:
    """The elementwise work of a decode step, in a few functions (same arithmetic as transformers, which rounds
    to the model's dtype after each operation)."""

    @staticmethod
    def rms_norm(x, weight, eps):
        """transformers' MllamaTextRMSNorm: float32 statistics, rounded to the input dtype before the weight."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x.to(dtype)

    @staticmethod
    def add_rms_norm(hidden, delta, weight, eps):
        hidden = hidden + delta
        return hidden, _Ops.rms_norm(hidden, weight, eps)

    @staticmethod
    def gated_add_rms_norm(hidden, delta, gate, weight, eps):
        hidden = hidden + gate * delta
        return hidden, _Ops.rms_norm(hidden, weight, eps)

    @staticmethod
    def head_rms_norm(q, weight, eps, num_heads: int, head_dim: int):
        q = q.view(q.shape[0], 1, num_heads, head_dim).transpose(1, 2)
        return _Ops.rms_norm(q, weight, eps)

    @staticmethod
    def rotary_and_cache(q, k, v, cos, sin, keys, values, position, num_heads: int, num_kv_heads: int,
                         head_dim: int):
        """Rotary embedding of queries and keys (x*cos + rotate_half(x)*sin, where rotate_half(x)*sin ==
        roll(x, half)*sin_signed), keys and values written into the cache at each row's position; returns the
        queries. The write is an index assignment, which inductor does in place (a scatter made it copy the whole
        cache)."""
        batch = q.shape[0]
        q = q.view(batch, 1, num_heads, head_dim).transpose(1, 2)
        k = k.view(batch, 1, num_kv_heads, head_dim).transpose(1, 2)
        qk = torch.cat([q, k], dim=1)
        qk = qk * cos + torch.roll(qk, head_dim // 2, dims=-1) * sin
        q, k = qk.split([num_heads, num_kv_heads], dim=1)
        rows = torch.arange(batch, device=position.device)
        keys[rows, :, position] = k[:, :, 0]
        values[rows, :, position] = v.view(batch, num_kv_heads, head_dim)
        return q

    @staticmethod
    def silu_mul(gate, up):
        return F.silu(gate) * up

    @staticmethod
    def gate_rows(x, row_mask, gate):
        return gate * (row_mask * x)


_EAGER_OPS = _Ops()


@functools.cache
def _compiled_ops() -> Any:
    """`_Ops` with each function compiled by inductor (one fused kernel or two each instead of up to ten), keeping
    eager's rounding to bf16 after every operation (`emulate_precision_casts`), so that the fused step computes
    what transformers computes. One set for every decoder of the process: the first shape a function sees is
    compiled as it is, and a size that changes later is made symbolic (one more compilation serves every batch
    size and cache length), so that a long session never runs into the recompilation limit."""
    compiled = _Ops()
    for name in ("add_rms_norm", "gated_add_rms_norm", "head_rms_norm", "rotary_and_cache", "silu_mul", "gate_rows"):
        setattr(compiled, name, torch.compile(getattr(_Ops, name), dynamic=None, fullgraph=True,
                                              options={"emulate_precision_casts": True}))
    return compiled


def fast_decoder_for(vlm: Any) -> FastDecoder:
    """The decoder kept on a loaded model (built the first time it is asked for)."""
    decoder = getattr(vlm, "_fast_decoder", None)
    if decoder is None or decoder.model is not vlm.model:
        decoder = FastDecoder(vlm.model)
        vlm._fast_decoder = decoder
    return decoder
