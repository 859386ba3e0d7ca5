"""The engine's batched scheduler: every running request decodes in the slots of one `BatchDecoder`.

Between decode steps the scheduler takes waiting requests from the engine's queue while there are free slots (a
request with `n` answers takes `n` slots), up to `PREFILL_GROUP` slots, prefills them, and lets them join at the
next step (so a crowd arriving at once joins a few at a time while the running requests keep decoding); each new
token goes to its request (which turns it into text and applies stop strings), and an answer that is over leaves its
slot at once. While the slots are full, requests wait in the queue and learn their place from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .batch_decode import DEFAULT_SLOT_LENGTH, PREFILL_GROUP, BatchDecoder, SlotRequest, TokenEvent, slots_that_fit
from .generation import SettingsError

if TYPE_CHECKING:
    from .engine import Engine, Request, Scheduler
    from .model import VisionModel

DEFAULT_MAX_BATCH = 64  # slots at most, whatever the memory would hold


class TooManySamples(SettingsError):
    """A request asks for more answers than there are slots."""


class BatchScheduler:
    """Continuous batching for the engine (see the module's description).

    `max_batch`: slots at most (the free GPU memory may allow fewer; on a CPU this many). `use_cuda_graph`:
    None captures one graph per batch bucket on CUDA and runs eagerly elsewhere.
    """

    def __init__(self, max_batch: int = DEFAULT_MAX_BATCH, *, slot_length: int = DEFAULT_SLOT_LENGTH,
                 use_cuda_graph: bool | None = None) -> None:
        self.max_batch, self.slot_length, self.use_cuda_graph = max_batch, slot_length, use_cuda_graph
        self.decoder: BatchDecoder | None = None
        self._owners: dict[int, tuple[Request, int, SlotRequest]] = {}  # id(slot request) -> answer it serves

    @property
    def context_length(self) -> int:
        """Tokens a slot holds, prompt and answer together (the engine refuses longer requests up front)."""
        return self.slot_length

    def check_samples(self, num_samples: int) -> None:
        """Raise `TooManySamples` for more answers than there are slots (once the decoder knows how many fit)."""
        if self.decoder is not None and num_samples > self.decoder.max_batch:
            raise TooManySamples(f"{num_samples} answers asked for, but this server decodes {self.decoder.max_batch} "
                                 "at a time: ask for fewer")

    def run(self, engine: Engine) -> None:
        model = engine.vlm.model
        self.decoder = BatchDecoder(model, max_batch=slots_that_fit(model, self.slot_length, cap=self.max_batch),
                                    slot_length=self.slot_length, use_cuda_graph=self.use_cuda_graph)
        self.decoder.warm_up()
        eos = set(self.decoder.eos)
        held: Request | None = None  # the next request, waiting for enough free slots
        while True:
            if held is None and not self.decoder.running:
                held = engine.queue.take()  # idle: wait for work
                if held is None:
                    return  # the engine closed
            joining, free, room = [], self.decoder.free_slots, PREFILL_GROUP
            while True:
                # with no free slot the next request keeps its place in the queue; with a prefill's worth joining,
                # the running requests get their next token before more join
                if held is None and free and room > 0:
                    held = engine.queue.take_nowait()
                if held is None:
                    break
                try:
                    self.check_samples(held.sampling.num_samples)
                except TooManySamples as err:
                    held.fail(err)
                    held = None
                    continue
                if held.sampling.num_samples <= free and (held.sampling.num_samples <= room or not joining):
                    # (a request with more answers than a prefill's worth joins alone)
                    free -= held.sampling.num_samples
                    room -= held.sampling.num_samples
                    joining.append(held)
                else:
                    break  # it keeps its turn until enough slots are free
                held = None
            self._admit(joining)
            self._cancel_stopped()
            try:
                events = self.decoder.step()
            except Exception as err:  # the step itself failed: every running request is told, the loop goes on
                self._fail(list({id(r): r for r, _, _ in self._owners.values()}.values()), err)
                continue
            for event in events:
                self._deliver(event, eos)

    def _admit(self, requests: list[Request]) -> None:
        """Prefill the joining requests together (one slot per answer). If that fails, each is tried alone, so a
        request fails only for its own fault, never for a neighbour's."""
        slot_requests = []
        for request in list(requests):
            try:
                slots = self._slot_requests(request)
            except Exception as err:  # this request's own settings or inputs: it alone fails
                request.fail(err)
                requests = [r for r in requests if r is not request]
                continue
            for index, slot in enumerate(slots):
                self._owners[id(slot)] = (request, index, slot)
            slot_requests += slots
        if not requests:
            return
        try:
            self.decoder.admit(slot_requests)
        except Exception as err:
            if len(requests) == 1:
                self._fail(requests, err)
                return
            self.decoder.discard(slot_requests)
            for slot in slot_requests:
                del self._owners[id(slot)]
            for request in requests:
                self._admit([request])

    @staticmethod
    def _slot_requests(request: Request) -> list[SlotRequest]:
        """One slot request per answer of `request`, each with its own seed (the request's, then the next ones)."""
        sampling = request.sampling
        return [SlotRequest(request.inputs, max_new_tokens=sampling.max_new_tokens,
                            min_new_tokens=sampling.min_new_tokens, do_sample=sampling.do_sample,
                            temperature=sampling.temperature, min_p=sampling.min_p,
                            seed=None if sampling.seed is None else sampling.seed + index)
                for index in range(sampling.num_samples)]

    def _cancel_stopped(self) -> None:
        """Answers that want no more tokens (a stop string, a caller that left) leave at the next step."""
        for request, index, slot in self._owners.values():
            if not request.wants_tokens(index):
                slot.cancelled.set()

    def _deliver(self, event: TokenEvent, eos: set[int]) -> None:
        request, index, slot = self._owners[id(event.request)]
        if event.token is not None and event.token not in eos and not request.push_tokens(index, [event.token]):
            slot.cancelled.set()
        if event.finish_reason is not None:
            del self._owners[id(slot)]
            request.finish(index, event.finish_reason)

    def _fail(self, requests: list[Request], error: BaseException) -> None:
        for key, (request, _, slot) in list(self._owners.items()):
            if any(request is r for r in requests):
                del self._owners[key]
                self.decoder.discard([slot])
        for request in requests:
            request.fail(error)


def scheduler_for(vlm: VisionModel, max_batch: int | None = None) -> Scheduler:
    """The engine's scheduler: `max_batch` 1 runs one request at a time (the library's exact answers for a
    seed); more batches that many at most. None: batched on a CUDA GPU with the transformers backend (where
    the fast loop is verified), one at a time elsewhere."""
    from .engine import SerialScheduler

    if max_batch is None:
        max_batch = DEFAULT_MAX_BATCH if vlm.device.type == "cuda" and vlm.backend == "transformers" else 1
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    return SerialScheduler() if max_batch == 1 else BatchScheduler(max_batch)
