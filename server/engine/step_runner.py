"""Runs one decode step for a batch-size bucket: eagerly, or by replaying a captured CUDA graph.

With CUDA graphs (a GPU, `--cuda-graphs`) each (bucket, MLP path) pair is captured once at
start; a step then costs one graph launch instead of hundreds of kernel launches. Inputs live
in static buffers that the engine fills before each step; the graph is captured for the whole
cache length (a static shape), and its attention kernel reads each row only up to that row's
own position. Eager steps (a CPU, or a GPU without graphs) pass the cache prefix the batch has
reached, rounded up to a block, to save work on the PyTorch attention path.
"""

from __future__ import annotations

import numpy as np
import torch

from cats_serve.server.model.decoder import LlamaModel
from cats_serve.server.model.kv_cache import KVCache

MLP_PATHS = ("sparse", "dense")
KV_BLOCK = 64  # eager attention reads the cache in multiples of this many positions


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two up to max_batch, plus max_batch itself."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return [*buckets, max_batch]


class DecodeRunner:
    def __init__(
        self, model: LlamaModel, cache: KVCache, *, use_cuda_graphs: bool, two_threshold: bool
    ):
        self.model = model
        # whether any loaded level has a second threshold; without one the MLP runs its
        # single-threshold kernels (one launch fewer per layer)
        self.two_threshold = two_threshold
        self.cache = cache
        self.buckets = batch_buckets(cache.max_batch)
        device, n_layers = model.device, model.config.num_layers
        max_batch = cache.max_batch
        pinned = device.type == "cuda"  # page-locked host buffers make the copies async
        # each slot's input token and position, on the device (tokens are fed there by the
        # sampling of the slot's last step or prefill; positions are uploaded per launch)
        self._inputs = torch.zeros(2, max_batch, dtype=torch.long, device=device)
        self.tokens, self.positions = self._inputs[0], self._inputs[1]
        # per bucket [2, L, bucket + 1]: active, then down-active counts per row and union
        self.counts = {
            b: torch.zeros(2, n_layers, b + 1, dtype=torch.int32, device=device)
            for b in self.buckets
        }
        # Host buffers come in pairs, used by alternate launches: a launch may come before the
        # previous step is read (pipelining), never before the one before it is.
        self._parity = 0
        self._host_positions = [
            torch.zeros(max_batch, dtype=torch.long, pin_memory=pinned) for _ in range(2)
        ]
        self._host_counts = {
            b: [
                torch.zeros(2, n_layers, b + 1, dtype=torch.int32, pin_memory=pinned)
                for _ in range(2)
            ]
            for b in self.buckets
        }
        # slot indices of a step's rows (when not 0..n-1): written on the host, uploaded without
        # a wait (a pageable upload would synchronise the stream, waiting for the step in flight)
        self._slot_parity = 0
        self._host_slots = [
            torch.zeros(max_batch, dtype=torch.long, pin_memory=pinned) for _ in range(2)
        ]
        self._slots = torch.zeros(2, max_batch, dtype=torch.long, device=device)
        # (t_up, t_down) per layer and slot. Free slots keep infinite thresholds: they never
        # activate a neuron, so they never widen the batch's union of active neurons.
        self.thresholds = torch.full((2, n_layers, max_batch), torch.inf, device=device)
        self._graphs: dict[tuple[int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if use_cuda_graphs:
            model.compile_decode_blocks()
            self._capture_all()

    def bucket_for(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def slot_index(self, slots: list[int]) -> torch.Tensor | None:
        """`slots` as an index tensor on the device, or None when they are 0..n-1 (rows packed
        at the front: views and copies need no index)."""
        n = len(slots)
        if slots == list(range(n)):
            return None
        # alternate buffers, like the launches' host buffers: every index is read (its step
        # or prefill's picks waited for) before the one after next is written
        self._slot_parity ^= 1
        host = self._host_slots[self._slot_parity]
        host.numpy()[:n] = slots
        index = self._slots[self._slot_parity, :n]
        index.copy_(host[:n], non_blocking=True)
        return index

    def feed(self, tokens: torch.Tensor, index: torch.Tensor | None) -> None:
        """Make `tokens` ([n] int64 on the device) the next input token of the slots `index`
        (from `slot_index`; None: slots 0..n-1), on the device: the host need not read them."""
        if index is None:
            self.tokens[: tokens.numel()].copy_(tokens)
        else:
            self.tokens.index_copy_(0, index, tokens)

    def launch(
        self, feeds: list[tuple[int, int]], mlp_path: str
    ) -> tuple[int, torch.Tensor, np.ndarray]:
        """Start a decode step; `feeds` lists (slot, position) by slot, each slot's input token
        already fed. Returns the bucket, the logits [bucket, V] (valid until the next launch)
        and a host view of the counts [2, L, bucket + 1] (active, down-active), valid once the
        stream has reached the step's end (reading its sampled ids waits for that)."""
        bucket = self.bucket_for(feeds[-1][0] + 1)
        self._parity ^= 1
        host = self._host_positions[self._parity]
        positions = host.numpy()
        positions[:bucket] = 0
        for slot, position in feeds:
            positions[slot] = position
        self.positions[:bucket].copy_(host[:bucket], non_blocking=True)
        logits, _ = self.step(bucket, mlp_path, kv_len=max(f[1] for f in feeds) + 1)
        counts = self._host_counts[bucket][self._parity]
        counts.copy_(self.counts[bucket], non_blocking=True)
        return bucket, logits, counts.numpy()

    def release(self, slot: int) -> None:
        """Give `slot` an infinite threshold again (free slots never activate a neuron); a
        fill of a view, ordered after any step in flight."""
        self.thresholds[:, :, slot] = torch.inf

    def synchronize(self) -> None:
        """Wait until every step launched so far has finished (a no-op on a CPU)."""
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def step(self, bucket: int, mlp_path: str, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode slots 0..bucket-1. Returns (logits [bucket, V] fp32, counts [2, L, bucket+1])."""
        counts = self.counts[bucket]
        graph = self._graphs.get((bucket, mlp_path))
        if graph is not None:
            graph[0].replay()
            return graph[1], counts
        counts.zero_()
        kv_len = min(self.cache.max_seq_len, -(-kv_len // KV_BLOCK) * KV_BLOCK)
        logits = self._forward(bucket, mlp_path, kv_len)
        return logits, counts

    def _forward(self, bucket: int, mlp_path: str, kv_len: int) -> torch.Tensor:
        return self.model.decode(
            self.tokens[:bucket],
            self.positions[:bucket],
            self.thresholds[:, :, :bucket]
            if self.two_threshold
            else self.thresholds[0, :, :bucket],
            self.cache,
            self.counts[bucket],
            kv_len=kv_len,
            mlp_path=mlp_path,
        )

    def _capture_all(self) -> None:
        # Streams and graphs are made on the current device, which need not be the model's.
        with torch.cuda.device(self.model.device):
            self._capture()

    def _capture(self) -> None:
        kv_len = self.cache.max_seq_len
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bucket in self.buckets:
                for path in MLP_PATHS:
                    self._forward(bucket, path, kv_len)  # warm-up: autotune, lazy init
        torch.cuda.current_stream().wait_stream(stream)
        pool = None
        for bucket in self.buckets:
            for path in MLP_PATHS:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.counts[bucket].zero_()
                    logits = self._forward(bucket, path, kv_len)
                pool = graph.pool()
                self._graphs[(bucket, path)] = (graph, logits)
        torch.cuda.synchronize()
