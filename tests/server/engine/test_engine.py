"""The continuous-batching engine on a tiny random model, on CPU."""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from cats_serve.server.engine.engine import Engine
from cats_serve.server.engine.sampling import SamplingParams
from cats_serve.server.engine.sequence import prefill_groups
from cats_serve.server.engine.types import (
    ContextLengthError,
    GenerationRequest,
    QueueFullError,
    RequestResult,
    TokenEvent,
    UnknownSparsityError,
)
from cats_serve.server.model.loader import load_model

# Thresholds that leave roughly half / most of the tiny model's neurons inactive.
LEVELS = {0.5: [0.45, 0.45], 0.9: [2.5, 2.5]}


class Collector:
    def __init__(self):
        self.events: list[TokenEvent] = []
        self.result: RequestResult | None = None
        self.done = threading.Event()

    def __call__(self, event):
        if isinstance(event, RequestResult):
            self.result = event
            self.done.set()
        else:
            self.events.append(event)

    def wait(self) -> RequestResult:
        assert self.done.wait(60), "request did not finish"
        return self.result


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    model = load_model(tiny_checkpoint, dtype=torch.float32, device="cpu").model
    return model, AutoTokenizer.from_pretrained(tiny_checkpoint)


def make_engine(parts, **kw) -> Engine:
    model, tok = parts
    options = dict(max_batch=4, max_seq_len=128, max_queue=8, eos_token_ids=set())
    options["max_prefill_tokens"] = 4096
    options.update(kw)
    return Engine(model, tok, levels=LEVELS, **options)


@pytest.fixture(params=[False, True], ids=["serial", "pipelined"])
def pipeline(request):
    """Both step orders: read each step before launching the next, or launch the next first
    (the GPU default, run here on CPU)."""
    return request.param


@pytest.fixture
def engine(parts, pipeline):
    eng = make_engine(parts, pipeline=pipeline)
    eng.start()
    yield eng
    eng.shutdown(timeout=5)


def request(prompt=(5, 6, 7, 8), sparsity=0.0, **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 12)
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        prompt_ids=list(prompt),
        params=SamplingParams(**params),
        sparsity=sparsity,
    )


def run(engine: Engine, *requests: GenerationRequest) -> list[RequestResult]:
    collectors = [Collector() for _ in requests]
    for req, col in zip(requests, collectors, strict=True):
        engine.submit(req, col)
    return [c.wait() for c in collectors]


def test_generates_max_tokens_and_reports(engine):
    (result,) = run(engine, request(max_tokens=9))
    assert result.finish_reason == "length"
    assert result.generation_tokens == 9
    assert len(result.token_times) == 9
    assert result.prompt_tokens == 4
    assert result.mlp_sparsity is not None and result.mlp_sparsity < 0.01  # dense level
    assert len(result.layer_sparsity) == 2
    assert result.time_to_first_token > 0


def test_concurrent_levels_match_solo_runs(engine):
    dense_req = request(prompt=(9, 10, 11), sparsity=0.0, max_tokens=16)
    sparse_req = request(prompt=(20, 21, 22, 23, 24), sparsity=0.5, max_tokens=16)
    (dense_alone,) = run(engine, dense_req)
    (sparse_alone,) = run(engine, sparse_req)
    both = run(
        engine,
        request(prompt=(9, 10, 11), sparsity=0.0, max_tokens=16),
        request(prompt=(20, 21, 22, 23, 24), sparsity=0.5, max_tokens=16),
    )
    assert both[0].token_ids == dense_alone.token_ids
    assert both[1].token_ids == sparse_alone.token_ids
    assert sparse_alone.mlp_sparsity > 0.2
    assert dense_alone.mlp_sparsity < 0.01


def test_requests_admitted_together_match_solo_runs(parts, engine):
    prompts = [(9, 10, 11), (20, 21, 22, 23, 24, 25, 26), (5,), (30, 31, 32, 33)]
    levels = [0.0, 0.5, 0.9, 0.5]
    solo = [
        run(engine, request(prompt=p, sparsity=s))[0] for p, s in zip(prompts, levels, strict=True)
    ]
    queued = make_engine(parts, pipeline=engine.pipeline)  # not started: all four wait
    collectors = [Collector() for _ in prompts]
    for p, s, col in zip(prompts, levels, collectors, strict=True):
        queued.submit(replace(request(prompt=p, sparsity=s, logprobs=2), prompt_logprobs=True), col)
    queued.start()
    try:
        together = [c.wait() for c in collectors]
    finally:
        queued.shutdown(timeout=5)
    for alone, both in zip(solo, together, strict=True):
        assert both.token_ids == alone.token_ids
        assert both.prefill_time == together[0].prefill_time  # one batched prefill pass
        assert len(both.prompt_logprobs) == both.prompt_tokens


def test_prefill_groups_respect_the_token_budget():
    def seq(n):
        return SimpleNamespace(request=SimpleNamespace(prompt_ids=[0] * n))

    seqs = [seq(n) for n in (5, 2, 3, 13, 4, 4, 4)]
    groups = prefill_groups(seqs, 12)
    lengths = [[len(s.request.prompt_ids) for s in g] for g in groups]
    assert lengths == [[5, 2, 3], [13], [4, 4, 4]]  # arrival order kept
    for g in lengths:
        assert len(g) == 1 or sum(g) <= 12
    assert [len(g) for g in prefill_groups(seqs, 1)] == [1] * 7  # each request alone


def test_higher_level_is_sparser(engine):
    r5, r9 = run(engine, request(sparsity=0.5), request(sparsity=0.9))
    assert r9.mlp_sparsity > r5.mlp_sparsity > 0.0


def test_stop_string_ends_generation(engine, parts):

    (free,) = run(engine, request(max_tokens=20))
    text = free.text
    assert len(text) > 4
    stop = text[2:4]
    (stopped,) = run(engine, request(max_tokens=20, stop=(stop,)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.index(stop)]


def test_seeded_sampling_is_reproducible(engine):
    a, b, c = run(
        engine,
        request(temperature=1.0, seed=7, max_tokens=20),
        request(temperature=1.0, seed=7, max_tokens=20),
        request(temperature=1.0, seed=8, max_tokens=20),
    )
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_abort_frees_slot(engine):
    col = Collector()
    req = request(max_tokens=100)
    engine.submit(req, col)
    while not col.events:
        threading.Event().wait(0.01)
    engine.abort(req.request_id)
    result = col.wait()
    assert result.finish_reason == "abort"
    assert result.generation_tokens < 100
    # all slots usable again: max_batch requests run together
    results = run(engine, *[request(max_tokens=3) for _ in range(engine.max_batch)])
    assert all(r.finish_reason == "length" for r in results)
    assert engine.num_running == 0


def test_refuses_bad_requests(engine):
    with pytest.raises(ContextLengthError, match="maximum context length is 128 tokens"):
        engine.submit(request(prompt=range(5, 105), max_tokens=40), Collector())
    with pytest.raises(UnknownSparsityError, match=r"0, 0\.5, 0\.9"):
        engine.submit(request(sparsity=0.7), Collector())


def test_queue_full_refuses_without_losing_queued(parts):
    eng = make_engine(parts, max_queue=2)  # not started: nothing leaves the queue
    assert not eng.pipeline  # the default on a CPU
    first, second = Collector(), Collector()
    eng.submit(request(max_tokens=2), first)
    eng.submit(request(max_tokens=2), second)
    with pytest.raises(QueueFullError):
        eng.submit(request(max_tokens=2), Collector())
    eng.start()
    assert first.wait().finish_reason == "length"
    assert second.wait().finish_reason == "length"
    eng.shutdown(timeout=5)


def test_more_requests_than_slots_all_finish(engine):
    results = run(engine, *[request(prompt=(5 + i, 6, 7), max_tokens=5) for i in range(7)])
    assert [r.finish_reason for r in results] == ["length"] * 7


def test_eos_stops(parts, pipeline):

    probe = make_engine(parts)
    probe.start()
    (free,) = run(probe, request(max_tokens=6))
    probe.shutdown(timeout=5)
    eos = free.token_ids[2]
    eng = make_engine(parts, eos_token_ids={eos}, pipeline=pipeline)
    eng.start()
    (r,) = run(eng, request(max_tokens=6))
    eng.shutdown(timeout=5)
    assert r.finish_reason == "stop"
    assert r.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]


def greedy_by_scoring(model, prompt, thresholds, n) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            tokens = torch.tensor(ids)[None]
            logits = model.score(tokens, torch.ones_like(tokens, dtype=torch.bool), thresholds)
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_pipelined_steps_give_what_serial_steps_give(parts, tiny_checkpoint, device):
    """Launching the next step before streaming the last one changes nothing a request sees:
    the same tokens, finish reasons and per-layer sparsity, with more requests than slots (slots
    freed and refilled while a step is in flight) and stop strings that end sequences whose
    next step is already running (their rows of it are dropped). On a GPU with CUDA graphs,
    where the launch is truly ahead of the read."""
    _, tok = parts
    graphs = device == "cuda"
    if graphs:
        if not torch.cuda.is_available():
            pytest.skip("needs a GPU")
        parts = (load_model(tiny_checkpoint, dtype=torch.float32, device="cuda").model, tok)
    probe = make_engine(parts)
    probe.start()
    (free,) = run(probe, request(max_tokens=20))
    probe.shutdown(timeout=5)
    text = free.text
    # a stop string first met after the fourth token: it ends a decode step, not the prefill
    start = len(tok.decode(free.token_ids[:4]))
    at = next(i for i in range(start, len(text) - 1) if text.index(text[i : i + 2]) == i)
    stop = text[at : at + 2]

    def batch():  # requests 0, 3 and 6 are the probe's (dense, same prompt) and stop early
        return [
            request(
                prompt=(5, 6, 7, 8) if i % 3 == 0 else (5 + i, 6, 7, 8),
                sparsity=(0.0, 0.5, 0.9)[i % 3],
                max_tokens=20 if i % 3 == 0 else 6 + 3 * i,
                stop=(stop,),
            )
            for i in range(7)
        ]

    results, rows = {}, {}
    for pipelined in (False, True):
        eng = make_engine(parts, pipeline=pipelined, use_cuda_graphs=graphs)
        steps = []
        eng.step_observers.append(steps.append)
        eng.start()
        try:
            results[pipelined] = run(eng, *batch())
            # alone: the step in flight when the stop string ends it has no row left to read
            results[pipelined] += run(eng, batch()[0])
        finally:
            eng.shutdown(timeout=5)  # reads a step still in flight before the engine stops
        rows[pipelined] = sum(s.batch_size for s in steps)
    for serial, pipelined in zip(results[False], results[True], strict=True):
        assert pipelined.token_ids == serial.token_ids
        assert pipelined.finish_reason == serial.finish_reason
        assert pipelined.text == serial.text
        assert pipelined.layer_sparsity == pytest.approx(serial.layer_sparsity, abs=1e-12)
    # one row the device ran past each stop string, then dropped, and every step is reported
    assert rows[True] - rows[False] == [r.finish_reason for r in results[True]].count("stop") == 4


def admitted_together(parts, requests, **kw) -> tuple[list[RequestResult], list]:
    """Run `requests` admitted at once (queued before the engine starts); also its steps."""
    eng = make_engine(parts, **kw)
    steps = []
    eng.step_observers.append(steps.append)
    collectors = [Collector() for _ in requests]
    for req, col in zip(requests, collectors, strict=True):
        eng.submit(req, col)
    eng.start()
    try:
        return [c.wait() for c in collectors], steps
    finally:
        eng.shutdown(timeout=5)


def test_a_slot_that_ends_does_not_widen_the_next_steps_union(parts):
    """Slot 0 (dense) ends by length while slot 1 (level 0.9) runs on: the pipelined step
    launched before slot 0's end is streamed still covers slot 0 and must not count it active."""

    def pair():
        return [request(sparsity=0.0, max_tokens=3), request(sparsity=0.9, max_tokens=8)]

    serial = admitted_together(parts, pair(), pipeline=False)
    pipelined = admitted_together(parts, pair(), pipeline=True)
    assert [r.token_ids for r in pipelined[0]] == [r.token_ids for r in serial[0]]

    # every step's stats, union sparsity included; the MLP path (and so the bytes skipped)
    # may differ: a pipelined launch comes before the last step's union sparsity is read,
    # so its dispatcher hint is one step older
    def seen(steps):
        return [(s.batch_size, s.bucket, s.union_sparsity, s.layer_sparsity) for s in steps]

    assert seen(pipelined[1]) == seen(serial[1])
    assert [s.batch_size for s in serial[1]] == [2, 2, 1, 1, 1, 1, 1]
    assert min(s.union_sparsity for s in serial[1] if s.batch_size == 1) > 0.5


def test_a_failed_launch_streams_the_tokens_already_sampled(parts, pipeline):
    (free,) = admitted_together(parts, [request(max_tokens=8)])[0]
    eng = make_engine(parts, pipeline=pipeline)
    step, calls = eng.runner.step, []

    def third_fails(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return step(*args, **kw)

    eng.runner.step = third_fails
    eng.start()
    try:
        (failed,) = run(eng, request(max_tokens=8))
        (after,) = run(eng, request(max_tokens=8))  # the engine serves on
    finally:
        eng.shutdown(timeout=5)
    assert failed.finish_reason == "error" and "device lost" in failed.error
    assert failed.token_ids == free.token_ids[:3]  # the prefill's token and two decode steps'
    assert after.token_ids == free.token_ids


def test_neuron_scale_set_on_the_model_is_served(parts):
    model, _ = parts
    c = model.config
    gen = torch.Generator().manual_seed(5)
    scales = (0.2 + 4.8 * torch.rand(c.num_layers, c.intermediate_size, generator=gen)).tolist()
    prompt = (20, 21, 22, 23, 24)
    t = torch.tensor(LEVELS[0.5])
    engine = make_engine(parts)
    engine.start()
    try:
        (plain,) = run(engine, request(prompt=prompt, sparsity=0.5, max_tokens=10))
        model.set_neuron_scale(scales)
        (weighted,) = run(engine, request(prompt=prompt, sparsity=0.5, max_tokens=10))
        expected = greedy_by_scoring(model, prompt, t, 10)
    finally:
        engine.shutdown(timeout=5)
        model.set_neuron_scale(None)
    assert weighted.token_ids == expected
    assert weighted.mlp_sparsity != pytest.approx(plain.mlp_sparsity, abs=1e-3)
    assert plain.token_ids == greedy_by_scoring(model, prompt, t, 10)


def test_a_grammar_constrains_and_ends_a_batched_request(engine):
    """Beside free requests, a constrained one decodes exactly what its grammar allows and
    ends where the grammar is complete, the last token's text included (both step orders)."""
    from cats_serve.server.engine.grammar import lark_grammar

    grammar = engine.grammars.compile(lark_grammar('start: "the cat sat" | "one two"'))
    bound = replace(request(max_tokens=40, ignore_eos=True), grammar=grammar)
    free = [request(max_tokens=20) for _ in range(2)]
    sinks = [Collector() for _ in range(3)]
    for req, sink in zip([free[0], bound, free[1]], sinks, strict=True):
        engine.submit(req, sink)
    results = [s.wait() for s in sinks]
    assert results[1].finish_reason == "stop"
    assert results[1].text in ("the cat sat", "one two")
    assert results[1].constraint is None and results[1].grammar_mask_seconds > 0
    assert [r.generation_tokens for r in (results[0], results[2])] == [20, 20]


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_pipelined_step_is_launched_before_the_last_one_is_read(parts, monkeypatch, pipelined):
    """The next step takes its input tokens from the last step's picks on the device, so it
    is launched before the host reads them (and before it streams them): the host's work
    between steps leaves the device's critical path."""
    import cats_serve.server.engine.engine as engine_module

    events = []
    read = engine_module.read_picks
    monkeypatch.setattr(engine_module, "read_picks", lambda p: events.append("read") or read(p))
    eng = make_engine(parts, pipeline=pipelined)
    launch = eng.runner.launch
    eng.runner.launch = lambda *a, **kw: events.append("launch") or launch(*a, **kw)
    eng.start()
    try:
        (result,) = run(eng, request(max_tokens=6))
    finally:
        eng.shutdown(timeout=5)
    assert result.generation_tokens == 6
    decode = events[1:]  # the first read is the prefill's token
    assert events[0] == "read" and decode.count("read") == 5
    # serial: launch, read, launch, read...; pipelined: the second launch comes before the
    # first read, and so on, and the step that would follow the sixth token is never launched
    expected = (
        ["launch", "read"] * 5 if not pipelined else ["launch", *["launch", "read"] * 4, "read"]
    )
    assert decode == expected
    (again,) = admitted_together(parts, [request(max_tokens=6)], pipeline=not pipelined)[0]
    assert again.token_ids == result.token_ids


def test_a_result_is_observed_before_its_request_gets_it(parts):
    """The metrics see a finished request before its client does, so a client that has its
    answer finds it counted; a failing observer loses no request."""
    eng = make_engine(parts)
    observed, seen_first = [], []

    def broken(result):
        raise RuntimeError("observer bug")

    eng.result_observers.extend([observed.append, broken])
    collector = Collector()

    def sink(event):
        if isinstance(event, RequestResult):
            seen_first.append(bool(observed))
        collector(event)

    eng.start()
    try:
        eng.submit(request(max_tokens=3), sink)
        result = collector.wait()
    finally:
        eng.shutdown(timeout=5)
    assert result.generation_tokens == 3 and observed == [result]
    assert seen_first == [True]
