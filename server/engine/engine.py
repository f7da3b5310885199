"""The decode engine: continuous batching over a static KV cache, in its own thread.

Between steps the loop admits waiting requests into free cache slots (prefilled together in
passes of at most `max_prefill_tokens` prompt tokens, dense with each request's CATS
thresholds applied), then runs one decode step for every running sequence at once, samples,
streams tokens to each request's sink and retires the finished ones. Sampling picks the tokens
on the device and feeds them to the slots' next step there. With `pipeline` (the default on a
GPU) the next step is launched right after the picks are enqueued, before the host reads them:
the host's reading, accounting and streaming overlap the next step. A sequence that ends by
length leaves before that launch; one that EOS, its grammar, a stop string or an abort ends
has its row of the next step dropped, and requests admitted meanwhile join the step after.
Slots are handed out lowest first, so running sequences stay packed at the front and a step
covers the smallest batch-size bucket that holds them.

Thread contract: `submit` and `abort` may be called from any thread; everything else runs on
the engine thread. Sinks are called on the engine thread and must not block.

Longer than the house's ~300 lines on purpose: the loop is one state machine (admission,
prefill, pipelined launch/read, finishing) whose invariants (who owns a slot, when a step's
host buffers may be rewritten) are easiest to check in one place. What is separable lives
beside it: sequence.py (per-request state, slots), accounting.py (sparsity and results),
step_runner.py (device buffers and CUDA graphs), sampling.py, detokenizer.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cats_serve.calibration.levels import format_level, format_levels, match_level
from cats_serve.kernels import choose_mlp_path
from cats_serve.server.engine.accounting import account_step, request_result
from cats_serve.server.engine.detokenizer import IncrementalDetokenizer
from cats_serve.server.engine.grammar import Grammars, prepare_all
from cats_serve.server.engine.sampling import (
    Picks,
    RowSampler,
    pick_tokens,
    read_picks,
    top_logprobs,
)
from cats_serve.server.engine.sequence import Sequence, Sink, SlotPool, prefill_groups
from cats_serve.server.engine.step_runner import DecodeRunner
from cats_serve.server.engine.types import (
    ContextLengthError,
    EngineError,
    EngineStoppedError,
    GenerationRequest,
    QueueFullError,
    RequestResult,
    StepStats,
    TokenEvent,
    UnknownSparsityError,
)
from cats_serve.server.model.decoder import LlamaModel, with_down_thresholds
from cats_serve.server.model.kv_cache import KVCache

log = logging.getLogger(__name__)


@dataclass
class _Step:
    """A decode step launched on the device and not yet read."""

    seqs: list[Sequence]  # by slot
    bucket: int
    mlp_path: str
    logits: torch.Tensor  # [bucket, V], valid until the next step is launched
    counts: np.ndarray  # [L, bucket + 1] host view, valid once the step has synchronised


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        tokenizer,
        *,
        levels: dict[float, list[float] | list[list[float]]],
        max_batch: int,
        max_seq_len: int,
        max_queue: int,
        eos_token_ids: set[int],
        use_cuda_graphs: bool = False,
        max_prefill_tokens: int,
        pipeline: bool | None = None,
        torch_threads: int | None = None,
    ):
        cfg = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_ids = eos_token_ids
        # level -> [2, L] (t_up, t_down per layer); a single-threshold level's t_down is 0
        self.levels = {0.0: torch.zeros(2, cfg.num_layers)}
        for level, values in levels.items():
            t = with_down_thresholds(torch.tensor(values, dtype=torch.float32), dim=0,
                                     single_dims=1)  # fmt: skip
            if t.shape != (2, cfg.num_layers):
                raise ValueError(
                    f"level {level}: thresholds of shape {list(t.shape)}, expected "
                    f"[{cfg.num_layers}] or [2, {cfg.num_layers}] (one or two per layer)"
                )
            self.levels[float(level)] = t
        self.levels = {k: v.to(model.device) for k, v in sorted(self.levels.items())}
        cache = KVCache.allocate(
            cfg, max_batch, max_seq_len, dtype=model.dtype, device=model.device
        )
        two = any(bool(t[1].any()) for t in self.levels.values())
        self.runner = DecodeRunner(model, cache, use_cuda_graphs=use_cuda_graphs, two_threshold=two)
        self.grammars = Grammars(tokenizer, cfg.vocab_size, eos_token_ids)
        self.step_observers: list[Callable[[StepStats], None]] = []
        self.result_observers: list[Callable[[RequestResult], None]] = []

        self._lock = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}  # slot -> sequence
        self._aborts: set[str] = set()
        self._free_slots = SlotPool(max_batch)
        self._stopping = False
        self._last_union_sparsity: float | None = None
        # On a GPU the next decode step is launched before the last one's tokens are streamed,
        # so detokenizing, sinks and the HTTP side run while the device works. On a CPU a
        # launch is the whole computation, which would only delay every token: off by default.
        self.pipeline = model.device.type == "cuda" if pipeline is None else pipeline
        self._inflight: _Step | None = None
        self._thread: threading.Thread | None = None
        # torch's intra-op threads for the model's work; set on the engine thread, since an
        # OpenMP thread count belongs to the thread that sets it (None: torch's default)
        self.torch_threads = torch_threads
        # Bytes of one weight row (W_up's or W_down's row of one neuron in one layer).
        self._bytes_per_row = cfg.hidden_size * model.embed.element_size()

    # ---- public, any thread ----------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def max_batch(self) -> int:
        return self.runner.cache.max_batch

    def check(self, request: GenerationRequest) -> None:
        """Raise EngineError if `request` can never run here (before anything is queued)."""
        total = len(request.prompt_ids) + request.params.max_tokens
        if not request.prompt_ids:
            raise EngineError("the prompt is empty")
        if total > self.max_seq_len:
            raise ContextLengthError(
                self.max_seq_len, len(request.prompt_ids), request.params.max_tokens
            )
        self.resolve_level(request.sparsity)

    def resolve_level(self, level: float) -> float:
        """The loaded level that `level` names (within LEVEL_TOLERANCE); raises
        UnknownSparsityError naming the loaded levels when there is none."""
        found = match_level(level, self.levels)
        if found is None:
            raise UnknownSparsityError(
                f"sparsity {format_level(level)} is not loaded; available levels: "
                f"{format_levels(self.levels)}"
            )
        return found

    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        self.check(request)
        grammar = self.grammars.state(request.grammar) if request.grammar else None
        seq = Sequence(
            request=request,
            sink=sink,
            arrival=time.perf_counter(),
            sampler=RowSampler.create(request.params, self.model.device, grammar),
            detok=IncrementalDetokenizer(self.tokenizer, request.params.stop),
        )
        with self._lock:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError("the request queue is full; retry later")
            self._waiting.append(seq)
            self._lock.notify()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)
            self._lock.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cats-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float) -> None:
        """Stop admitting; let running requests finish for up to `timeout` s, then abort them."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._stopping = True
            self._lock.notify()
        while self._thread and self._thread.is_alive() and time.monotonic() < deadline:
            if not self._running and not self._waiting:
                break
            time.sleep(0.01)
        with self._lock:
            self._aborts.update(s.request.request_id for s in self._running.values())
            self._aborts.update(s.request.request_id for s in self._waiting)
            self._lock.notify()
        if self._thread:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic()))

    # ---- engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)
        while True:
            with self._lock:
                while self._inflight is None and not (  # a step in flight is still to be read
                    self._waiting or self._running or self._aborts or self._stopping
                ):
                    self._lock.wait()
                aborts, self._aborts = self._aborts, set()
                aborted_waiting = [s for s in self._waiting if s.request.request_id in aborts]
                for seq in aborted_waiting:
                    self._waiting.remove(seq)
                admitted = []
                while self._waiting and self._free_slots:
                    seq = self._waiting.popleft()
                    seq.slot = self._free_slots.take()
                    admitted.append(seq)
                if self._stopping and not (
                    self._running or admitted or self._waiting or self._inflight
                ):
                    done = True
                else:
                    done = False
            for seq in aborted_waiting:
                self._finish(seq, "abort")
            for seq in [s for s in self._running.values() if s.request.request_id in aborts]:
                self._finish(seq, "abort")
            if done:
                return
            for group in prefill_groups(admitted, self.max_prefill_tokens):
                self._prefill_group(group)
            if self._running or self._inflight is not None:
                try:
                    self._decode_step()
                except Exception as exc:  # a failed step fails its batch, not the server
                    log.exception("decode step failed")
                    self._inflight = None
                    for seq in list(self._running.values()):
                        self._finish(seq, "error", error=str(exc))

    @torch.inference_mode()
    def _prefill_group(self, group: list[Sequence]) -> None:
        start = time.perf_counter()
        prompts, slots, levels, want_all = [], [], [], []
        for seq in group:
            seq.queue_time = start - seq.arrival
            req = seq.request
            thresholds = self.levels[self.resolve_level(req.sparsity)]
            self.runner.thresholds[:, :, seq.slot] = thresholds
            self._running[seq.slot] = seq
            prompts.append(torch.tensor(req.prompt_ids, dtype=torch.long, device=self.model.device))
            slots.append(seq.slot)
            levels.append(thresholds)
            want_all.append(req.prompt_logprobs)
        try:
            outputs = self.model.prefill(
                prompts, slots, torch.stack(levels), self.runner.cache, all_logits=want_all
            )
            last = []
            for seq, prompt, logits in zip(group, prompts, outputs, strict=True):
                if seq.request.prompt_logprobs:
                    k = seq.request.params.logprobs or 0
                    scored = top_logprobs(logits[:-1], prompt[1:], k) if len(prompt) > 1 else []
                    seq.prompt_logprobs = [None, *scored]
                    logits = logits[-1]
                seq.position = len(prompt)
                seq.active_sums = np.zeros((2, self.model.config.num_layers), dtype=np.int64)
                last.append(logits)
            picks = pick_tokens(torch.stack(last), [seq.sampler for seq in group])
            self.runner.feed(picks.tokens, self.runner.slot_index([seq.slot for seq in group]))
            tokens, logprobs = read_picks(picks)
        except Exception as exc:  # a failed prefill fails its requests, not the server
            log.exception("prefill of %d request(s) failed", len(group))
            for seq in group:
                self._finish(seq, "error", error=str(exc))
            return
        elapsed = time.perf_counter() - start
        for row, seq in enumerate(group):
            seq.prefill_time = elapsed
            try:
                self._emit(seq, tokens[row], logprobs[row])
            except Exception as exc:
                log.exception("request %s failed", seq.request.request_id)
                self._finish(seq, "error", error=str(exc))

    @torch.inference_mode()
    def _decode_step(self) -> None:
        """Pick the tokens of the step in flight (launching one first if none is) on the
        device; when pipelining, launch the next step, fed by those tokens on the device,
        before the host reads them; then read and stream them while the device runs it."""
        step, self._inflight = self._inflight, None
        if step is None:
            step = self._launch(list(self._running.values()))
        seqs, picks = self._pick(step)
        failed = None
        if self.pipeline:
            # Rows that end by length with the token being read leave before the next launch
            # (their slots must not widen its union); an end at EOS, at a grammar's end or at
            # a stop string is known only once read: those rows of the next step are dropped
            # when it is read.
            ending = {s.slot for s in seqs if self._ends_by_length(s, len(s.tokens) + 1)}
            for slot in ending:
                self.runner.release(slot)
            batch = [s for s in self._running.values() if s.slot not in ending]
            try:
                if batch:
                    self._inflight = self._launch(batch)
            except Exception as exc:  # stream the tokens already sampled, then fail the batch
                failed = exc
        rows, stats = self._read(step, seqs, picks)
        if self._inflight is not None:  # the next sampling's grammar masks, while it runs
            grammars = [s.sampler.grammar for s in self._inflight.seqs]
            prepare_all([g for g in grammars if g is not None and not g.finished])
        for observer in self.step_observers:  # before the tokens go out, as for results
            try:
                observer(stats)
            except Exception:  # a broken observer fails no step
                log.exception("step observer failed")
        for s, tok, lp in rows:
            self._emit(s, tok, lp)
        if failed is not None:
            raise failed

    def _launch(self, seqs: list[Sequence]) -> _Step:
        """Start a decode step of `seqs` on the device; each feeds the token its last sampling
        left on the device, at its position."""
        seqs = sorted(seqs, key=lambda s: s.slot)
        cfg = self.model.config
        path = choose_mlp_path(
            len(seqs),
            cfg.hidden_size,
            cfg.intermediate_size,
            self.model.dtype,
            self.model.device,
            union_sparsity_hint=self._last_union_sparsity,
            int8=self.model.quantize == "int8",
        )
        bucket, logits, counts = self.runner.launch([(s.slot, s.position) for s in seqs], path)
        return _Step(seqs, bucket, path, logits, counts)

    def _pick(self, step: _Step) -> tuple[list[Sequence], Picks | None]:
        """Pick, on the device, the tokens of a launched step's rows of the sequences still
        running (one finished or aborted while the step ran is dropped), and feed them to
        their slots' next step. No synchronisation: the host reads them in `_read`."""
        seqs = [s for s in step.seqs if self._running.get(s.slot) is s]
        if not seqs:
            return seqs, None
        index = self.runner.slot_index([s.slot for s in seqs])  # None: a view, no gather
        rows = step.logits[: len(seqs)] if index is None else step.logits[index]
        picks = pick_tokens(rows, [s.sampler for s in seqs])
        self.runner.feed(picks.tokens, index)
        for s in seqs:
            s.position += 1
        return seqs, picks

    def _read(
        self, step: _Step, seqs: list[Sequence], picks: Picks | None
    ) -> tuple[list[tuple[Sequence, int, object]], StepStats]:
        """Read the picked tokens and account the step's sparsity: the requests' over their
        own rows, the step's stats over every row the device ran. Everything the step left in
        host buffers is consumed here, before a later launch can overwrite them."""
        if picks is None:  # nothing to read; the counts still need the step to have finished
            sampled, logprobs = [], []
            self.runner.synchronize()
        else:  # waits for the step and its picks only; counts arrive with them
            sampled, logprobs = read_picks(picks)
        stats = account_step(
            step.counts,
            step.seqs,
            seqs,
            bucket=step.bucket,
            mlp_path=step.mlp_path,
            intermediate_size=self.model.config.intermediate_size,
            bytes_per_row=self._bytes_per_row,
        )
        self._last_union_sparsity = stats.union_sparsity
        return list(zip(seqs, sampled, logprobs, strict=True)), stats

    def _ends_by_length(self, seq: Sequence, count: int) -> bool:
        """Whether `seq` ends with its `count`-th generated token, at max_tokens or at the
        cache's end (its position already counts that token)."""
        return count >= seq.request.params.max_tokens or seq.position + 1 >= self.max_seq_len

    def _end_before_text(self, seq: Sequence, token: int, count: int) -> str | None:
        """Why `seq` ends at `token`, its `count`-th generated token, as far as is known
        before the token is detokenized: "stop" at EOS or where its grammar is complete,
        "length" at max_tokens or the cache's end. (A stop string can still end it once the
        text is known.)"""
        params = seq.request.params
        if token in self.eos_token_ids and not params.ignore_eos:
            return "stop"
        grammar = seq.sampler.grammar
        if grammar is not None and (grammar.finished or grammar.error):
            return "stop"
        if self._ends_by_length(seq, count):
            return "length"
        return None

    def _emit(self, seq: Sequence, token: int, logprob) -> None:
        seq.tokens.append(token)
        seq.token_times.append(time.perf_counter())
        end = self._end_before_text(seq, token, len(seq.tokens))
        eos = token in self.eos_token_ids and not seq.request.params.ignore_eos
        text = "" if eos else seq.detok.add(token)
        self._send(seq, TokenEvent(token_id=token, text=text, logprob=logprob))
        if seq.detok.stopped:
            end = "stop"
        grammar = seq.sampler.grammar
        if grammar is not None and grammar.error:  # the mask makes this a bug, not bad input
            log.error("request %s left its grammar: %s", seq.request.request_id, grammar.error)
            self._finish(seq, "error", error=grammar.error)
        elif end:
            self._finish(seq, end)

    def _send(self, seq: Sequence, event: TokenEvent | RequestResult) -> None:
        try:
            seq.sink(event)
        except Exception:  # a broken consumer loses its own request, never the engine
            log.exception("sink of request %s failed", seq.request.request_id)
            self.abort(seq.request.request_id)

    def _finish(self, seq: Sequence, reason: str, *, error: str | None = None) -> None:
        tail = seq.detok.flush() if reason in ("length", "stop") else ""
        if tail:
            self._send(seq, TokenEvent(token_id=-1, text=tail))
        if seq.slot >= 0 and self._running.get(seq.slot) is seq:
            del self._running[seq.slot]
            self.runner.release(seq.slot)
            with self._lock:
                self._free_slots.give(seq.slot)
        result = request_result(
            seq, reason, intermediate_size=self.model.config.intermediate_size, error=error
        )
        # Observers (the metrics) first: a client that has its answer sees it counted.
        for observer in self.result_observers:
            try:
                observer(result)
            except Exception:  # a broken observer loses no request
                log.exception("result observer failed on request %s", seq.request.request_id)
        self._send(seq, result)
