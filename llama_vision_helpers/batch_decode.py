"""Continuous batching on the fast decode loop: a fixed set of slots, each holding one request at its own position.

Every slot owns a row of the static buffers: its self-attention keys/values, its image's cross-attention
keys/values and masks (zeros for a request without an image, which makes the cross-attention layers an identity
for that row), its next token and position. A request is prefilled by the model as usual (requests whose prompts
have the same length and kind are prefilled together), its caches are copied into a free slot, and from the next
step on it decodes together with every other running request: one step of `FastDecoder`'s per-layer code over
the first `bucket` slots, captured as one CUDA graph per (batch bucket, length bucket, image or not). Sampling
settings and stop conditions are per request; a finished or cancelled request leaves its slot at once.
On a CPU the same loop runs without graphs, which is how it is tested against `generate` and against itself.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .fast_decode import LENGTH_BUCKET, FastDecoder, FastDecodeUnsupported, _State
from .generation import inputs_to_device, tensor_to_device

DEFAULT_SLOT_LENGTH = 4096  # tokens a slot holds (prompt + answer); the buffers are sized for it
PREFILL_GROUP = 8  # prompts prefilled in one forward pass at most
MEMORY_RESERVE = 0.12  # of the GPU's memory left free for prefill activations and the graphs' workspaces


@dataclass(eq=False)  # a request is itself, not its settings
class SlotRequest:
    """One conversation to decode: prepared inputs (one row, from `prepare_inputs`), sampling and stop settings.

    `seed` gives the request its own random stream, so a seeded request samples the same tokens alone or batched.
    It stops at an end token, at `max_new_tokens`, when its slot is full, or when `cancelled` is set (from any
    thread; it leaves at the next step): the caller cancels on its own conditions, such as stop strings.
    """

    inputs: Any
    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    min_p: float | None = None
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)  # the answer so far
    finish_reason: str | None = None  # "stop", "length" or "cancelled" once it has left

    def __post_init__(self) -> None:
        if self.inputs["input_ids"].shape[0] != 1:
            raise ValueError("a SlotRequest holds one conversation (inputs with one row)")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be positive when sampling")
        self.prompt_length = int(self.inputs["input_ids"].shape[1])
        self.has_image = self.inputs.get("pixel_values") is not None
        self.generator = torch.Generator()
        if self.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.seed)


@dataclass
class TokenEvent:
    """What one step did to one request: a new token (None when cancelled) and, if it left, why."""

    request: SlotRequest
    token: int | None
    finish_reason: str | None = None


def bucket_sizes(max_batch: int) -> list[int]:
    """Batch sizes with a graph of their own: powers of two below `max_batch`, and `max_batch`."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return sorted(set(sizes + [max_batch]))


def slot_bytes(model: Any, slot_length: int = DEFAULT_SLOT_LENGTH) -> int:
    """Memory one slot's buffers take: self-attention keys/values for `slot_length` tokens, image keys/values."""
    config = model.model.language_model.config
    head_dim = config.hidden_size // config.num_attention_heads
    cross_layers = len(config.cross_attention_layers)
    self_layers = config.num_hidden_layers - cross_layers
    per_token = 2 * config.num_key_value_heads * head_dim * model.model.language_model.embed_tokens.weight.element_size()
    return per_token * (self_layers * slot_length + cross_layers * vision_tokens(model))


def vision_tokens(model: Any) -> int:
    """Cross-attention keys per image: every tile the processor may give, padded, times patches per tile."""
    return model.config.vision_config.max_num_tiles * model.model.vision_model.num_patches


def slots_that_fit(model: Any, slot_length: int = DEFAULT_SLOT_LENGTH, cap: int | None = None) -> int:
    """How many slots the free GPU memory holds (keeping `MEMORY_RESERVE` of it free), at most `cap`."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return cap or 8
    free, total = torch.cuda.mem_get_info(device)
    fit = int((free - MEMORY_RESERVE * total) // slot_bytes(model, slot_length))
    if fit < 1:
        raise FastDecodeUnsupported(
            f"not enough free GPU memory for one decode slot of {slot_length} tokens: use a shorter slot length")
    return min(fit, cap) if cap else fit


class BatchDecoder:
    """A fixed set of decode slots over one loaded MllamaForConditionalGeneration.

    Drive it from one thread: `admit` requests into free slots (prefill), then `step` (one token for every
    running request) until `running` is empty; call `admit` again between steps as requests arrive.
    """

    def __init__(self, model: Any, *, max_batch: int, slot_length: int = DEFAULT_SLOT_LENGTH,
                 use_cuda_graph: bool | None = None, compile_elementwise: bool | None = None) -> None:
        # the elementwise work is compiled on CUDA unless told otherwise; `warm_up` runs every batch bucket once, so
        # that the compilations (a first shape, then sizes made symbolic) happen before any request arrives
        self.fast = FastDecoder(model, use_cuda_graph=use_cuda_graph, compile_elementwise=compile_elementwise)
        self.model = model
        self.max_batch, self.slot_length = max_batch, min(slot_length, self.fast.max_positions)
        self.buckets = bucket_sizes(max_batch)
        eos = model.generation_config.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        fast, device = self.fast, self.fast.device
        kv = dict(dtype=fast.dtype, device=device)
        text_layers = range(len(fast.text.layers))
        shape = (max_batch, fast.num_kv_heads, self.slot_length, fast.head_dim)
        cross_shape = (max_batch, fast.num_kv_heads, vision_tokens(model), fast.head_dim)
        self.keys = {i: torch.zeros(shape, **kv) for i in text_layers if i not in fast.cross_layers}
        self.values = {i: torch.zeros(shape, **kv) for i in self.keys}
        self.cross_keys = {i: torch.zeros(cross_shape, **kv) for i in fast.cross_layers}
        self.cross_values = {i: torch.zeros(cross_shape, **kv) for i in fast.cross_layers}
        self.cross_mask = torch.zeros((max_batch, 1, 1, cross_shape[2]), **kv)
        self.row_mask = torch.zeros((max_batch, 1, 1), **kv)
        self.input_ids = torch.zeros((max_batch, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.logits = torch.zeros((max_batch, model.lm_head.out_features), **kv)
        self.slots: list[SlotRequest | None] = [None] * max_batch
        self._states: dict[tuple[int, int, bool], _State] = {}

    # --- slots ----------------------------------------------------------------------------------------

    @property
    def running(self) -> list[SlotRequest]:
        return [request for request in self.slots if request is not None]

    @property
    def free_slots(self) -> int:
        return self.slots.count(None)

    def discard(self, requests: Sequence[SlotRequest]) -> None:
        """Free the slots of `requests` without a word (their admission failed half-way)."""
        for row, request in enumerate(self.slots):
            if any(request is r for r in requests):
                self.slots[row] = None

    def _leave(self, row: int, reason: str) -> None:
        self.slots[row].finish_reason = reason
        self.slots[row] = None

    # --- prefill --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def admit(self, requests: Sequence[SlotRequest]) -> None:
        """Prefill `requests` into free slots; they produce their first token at the next `step`."""
        if len(requests) > self.free_slots:
            raise ValueError(f"{len(requests)} requests for {self.free_slots} free slots")
        for request in requests:
            if request.prompt_length >= self.slot_length:
                raise ValueError(f"the prompt has {request.prompt_length} tokens; a slot holds {self.slot_length}")
        groups: dict[tuple[int, bool], list[SlotRequest]] = {}
        for request in requests:
            groups.setdefault((request.prompt_length, request.has_image), []).append(request)
        for group in groups.values():
            for start in range(0, len(group), PREFILL_GROUP):
                self._prefill(group[start:start + PREFILL_GROUP])

    def _prefill(self, group: list[SlotRequest]) -> None:
        """One forward pass over prompts of one length and kind; copy each row's caches into a free slot."""
        rows = [r.inputs for r in group]
        if any(value.device.type != "cpu" for row in rows for value in row.values()):  # else joined on the CPU
            rows = [inputs_to_device(row, self.fast.device) for row in rows]
        inputs = {name: torch.cat([row[name] for row in rows]) for name in rows[0].keys()}
        output, inputs = self.fast.prefill_forward(inputs)
        cache, length = output.past_key_values, group[0].prompt_length
        masks = self.fast.image_masks(inputs) if group[0].has_image else None
        for j, request in enumerate(group):
            row = self.slots.index(None)
            self.slots[row] = request
            for i in self.keys:
                self.keys[i][row, :, :length].copy_(cache.layers[i].keys[j])
                self.values[i][row, :, :length].copy_(cache.layers[i].values[j])
            for i in self.cross_keys:
                if masks is None:  # zero values: the row's cross-attention output is exactly zero
                    self.cross_keys[i][row].zero_()
                    self.cross_values[i][row].zero_()
                else:
                    self.cross_keys[i][row].copy_(cache.layers[i].keys[j])
                    self.cross_values[i][row].copy_(cache.layers[i].values[j])
            self.cross_mask[row].copy_(masks[0][j]) if masks else self.cross_mask[row].zero_()
            self.row_mask[row].copy_(masks[1][j]) if masks else self.row_mask[row].zero_()
            self.logits[row].copy_(output.logits[j, -1])

    # --- one step -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Cancelled requests leave; every running request gets its next token; finished ones leave; the rest
        go through the model once (so their next logits are ready for the following step).

        The tokens are chosen on the device and the model step for them is queued before the host reads them
        (a pinned copy and an event), so the host's bookkeeping overlaps the device's next step. A request that
        ends on an end token has gone through that step once more for nothing; one that reaches its length limit
        is known to end beforehand and is left out of it."""
        events = []
        for row, request in enumerate(self.slots):
            if request is not None and request.cancelled.is_set():
                self._leave(row, "cancelled")
                events.append(TokenEvent(request, None, "cancelled"))
        rows = [row for row, request in enumerate(self.slots) if request is not None]
        if not rows:
            return events
        tokens = self._sample(rows)
        read = self._read_later(tokens)
        going_on = [i for i, row in enumerate(rows)
                    if not self._at_length_limit(self.slots[row], len(self.slots[row].tokens) + 1)]
        if going_on:
            fed = tokens if len(going_on) == len(rows) else tokens[self._on_device(going_on)]
            self._decode([rows[i] for i in going_on], fed)
        for row, token in zip(rows, read()):
            request = self.slots[row]
            request.tokens.append(token)
            reason = self._finish_reason(request, token)
            if reason:
                self._leave(row, reason)
            events.append(TokenEvent(request, token, reason))
        return events

    def _on_device(self, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """A small host list on the device, copied without waiting for the device's queue."""
        return tensor_to_device(torch.tensor(values, dtype=dtype), self.fast.device)

    def _read_later(self, tokens: torch.Tensor) -> Callable[[], list[int]]:
        """Queue the copy of `tokens` to the host; returns the function that waits for it (and only it)."""
        if self.fast.device.type != "cuda":
            return tokens.tolist
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(self.fast.device))  # the model's GPU, not the thread's current one

        def read() -> list[int]:
            copied.synchronize()
            return host.tolist()

        return read

    def _sample(self, rows: list[int]) -> torch.Tensor:
        """Each row's next token from its logits, on the device: greedy, or temperature then min_p and a draw
        from the request's own generator (one uniform number a row, so a row's draw does not depend on its
        neighbours)."""
        requests = [self.slots[row] for row in rows]
        logits = self.logits[self._on_device(rows)].float()
        banned = [len(r.tokens) < r.min_new_tokens for r in requests]
        if self.eos and any(banned):
            banned = self._on_device(banned, torch.bool)
            logits[:, self.eos] = torch.where(banned[:, None], float("-inf"), logits[:, self.eos])
        tokens = logits.argmax(dim=-1)
        sampling = [r.do_sample for r in requests]
        if any(sampling):
            temperature = self._on_device([r.temperature if r.do_sample else 1.0 for r in requests], torch.float32)
            min_p = self._on_device([(r.min_p or 0.0) if r.do_sample else 0.0 for r in requests], torch.float32)
            probs = torch.softmax(logits / temperature[:, None], dim=-1)
            probs = torch.where(probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values, probs, 0.0)
            cumulative = probs.cumsum(dim=-1)
            draws = self._on_device([float(torch.rand(1, generator=r.generator)) for r in requests], torch.float32)
            sampled = torch.searchsorted(cumulative, (draws * cumulative[:, -1])[:, None], right=True)
            sampled = sampled.squeeze(1).clamp(max=logits.shape[-1] - 1)
            tokens = torch.where(self._on_device(sampling, torch.bool), sampled, tokens)
        return tokens

    def _at_length_limit(self, request: SlotRequest, produced: int) -> bool:
        """Whether a request that has `produced` tokens ends there by length (its limit, or a full slot)."""
        return produced >= request.max_new_tokens or request.prompt_length + produced > self.slot_length

    def _finish_reason(self, request: SlotRequest, token: int) -> str | None:
        if token in self.eos:
            return "stop"
        return "length" if self._at_length_limit(request, len(request.tokens)) else None

    def _decode(self, rows: list[int], tokens: torch.Tensor) -> None:
        """Feed `rows` their new `tokens` (on the device) at their next positions: one step over the smallest
        bucket that holds the highest of them (the other rows in it decode token 0 at position 0 of their own
        rows, which nothing reads)."""
        positions = [0] * self.max_batch
        for row in rows:
            request = self.slots[row]
            positions[row] = request.prompt_length + len(request.tokens)  # the new token's position
        batch = next(size for size in self.buckets if size > max(rows))
        length = min(self.slot_length, -(-(max(positions) + 1) // LENGTH_BUCKET) * LENGTH_BUCKET)
        with_image = any(request is not None and request.has_image for request in self.slots[:batch])
        state = self._state(batch, length, with_image)
        state.input_ids.zero_()
        state.input_ids[self._on_device(rows), 0] = tokens
        state.position.copy_(self._on_device(positions[:batch]))
        self.fast._run_step(state)

    def _state(self, batch: int, length: int, with_image: bool) -> _State:
        """The fast loop's view of the first `batch` slots and `length` cache positions (with its graph)."""
        key = (batch, length, with_image)
        if key not in self._states:
            self._states[key] = _State(
                batch=batch, length=length, input_ids=self.input_ids[:batch], position=self.position[:batch],
                key_positions=torch.arange(length, device=self.fast.device),
                keys={i: k[:batch, :, :length] for i, k in self.keys.items()},
                values={i: v[:batch, :, :length] for i, v in self.values.items()},
                write_keys=self.keys, write_values=self.values,
                cross_keys={i: k[:batch] for i, k in self.cross_keys.items()} if with_image else {},
                cross_values={i: v[:batch] for i, v in self.cross_values.items()} if with_image else {},
                cross_mask=self.cross_mask[:batch] if with_image else None,
                row_mask=self.row_mask[:batch] if with_image else None,
                logits=self.logits[:batch],
            )
        return self._states[key]

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Capture the graphs of every batch bucket for the first cache length, with and without images, so
        that requests arriving later do not wait for a capture (on CUDA; nothing to do without graphs)."""
        if not self.fast.use_cuda_graph or self.running:
            return
        for batch in self.buckets:
            for with_image in (False, True):
                self.fast._run_step(self._state(batch, min(LENGTH_BUCKET, self.slot_length), with_image))

    def run(self, requests: Sequence[SlotRequest]) -> list[SlotRequest]:
        """Decode `requests` to the end, admitting them as slots free up (for scripts and tests)."""
        waiting = list(requests)
        while waiting or self.running:
            joining = min(len(waiting), self.free_slots)
            self.admit(waiting[:joining])
            waiting = waiting[joining:]
            self.step()
        return list(requests)
