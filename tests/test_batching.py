"""Continuous batching (gemmakit.infer.slots, gemmakit.infer.batching).

References: an uncached forward of each row's whole sequence for the slot cache's logits (itself
bit-identical to HF eager, test_model_parity); `Engine.generate` on one prompt alone (whose greedy
tokens equal HF `generate`, test_infer) for the batcher's tokens. The configs have sliding windows of
5 and 7 tokens, shorter than every sequence here, so the rings wrap.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch
from conftest import generation_models

from gemmakit.infer.batching import Batcher, Busy, Failed, Finished, Request, Token
from gemmakit.infer.engine import Engine, GenerationError
from gemmakit.infer.kv_cache import CacheError
from gemmakit.infer.slots import SlotCache

CASES = ["gemma1-mqa", "gemma2", "gemma3", "gemma3-mqa"]


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[2, *torch.randint(3, 300, (n - 1,), generator=g).tolist()] for n in lengths]


def _run(batcher: Batcher, requests: list[dict], timeout: float = 60) -> list[tuple[list[Token], object]]:
    """Submit every request at once; per request (its Token events, its final event)."""
    results: list[list] = [[[], None] for _ in requests]
    done = threading.Semaphore(0)

    def sink(i: int):
        def on_event(e) -> None:
            if isinstance(e, Token):
                results[i][0].append(e)
            else:
                results[i][1] = e
                done.release()

        return on_event

    for i, kw in enumerate(requests):
        batcher.submit(Request(on_event=sink(i), **kw))
    for _ in requests:
        assert done.acquire(timeout=timeout), "a request never finished"
    return [tuple(r) for r in results]


@pytest.mark.parametrize("case", CASES)
def test_slot_cache_rows_joining_and_leaving_give_the_uncached_logits(case: str) -> None:
    model = generation_models(case)[1]
    seqs = _prompts(3, [20, 14, 13])
    cache = SlotCache(model.config, 3, 32)
    got: list[list[torch.Tensor]] = [[], [], []]

    def feed(row: int, ids: list[int]) -> None:  # a prefill chunk of one row
        feed_rows(row, [ids])

    def feed_rows(first: int, chunks: list[list[int]]) -> None:  # chunks of rows first.., left-padded
        width = max(map(len, chunks))
        tokens = torch.tensor([[0] * (width - len(c)) + c for c in chunks])
        pos = torch.tensor([[-1] * (width - len(c)) + list(range(cache.lengths[first + j], cache.lengths[first + j] + len(c)))
                            for j, c in enumerate(chunks)])  # fmt: skip
        cache.bind(first, first + len(chunks), [len(c) for c in chunks])
        with torch.inference_mode():
            out = model(tokens, pos, cache=cache)
        for j, c in enumerate(chunks):
            got[first + j].append(out[j, width - len(c) :])

    def step(rows: int, at: list[int]) -> None:  # one token for rows [0, rows), each at its own length
        cache.bind(0, rows)
        tokens = torch.tensor([[seqs[r][at[r]]] for r in range(rows)])
        pos = torch.tensor([[cache.lengths[r]] for r in range(rows)])
        with torch.inference_mode():
            out = model(tokens, pos, cache=cache)
        for r in range(rows):
            got[r].append(out[r])
            at[r] += 1

    # row 0 prefills a chunk; then its second chunk and row 1's first go in one ragged, left-padded
    # forward (row 0 has keys, row 1 none); both decode; row 2 joins; all three decode
    feed(0, seqs[0][:4])
    feed_rows(0, [seqs[0][4:8], seqs[1][:3]])
    at = [8, 3, 0]
    for _ in range(3):
        step(2, at)
    feed(2, seqs[2][:7])
    at[2] = 7
    step(3, at)
    # the scheduler moves rows around: swap rows 0 and 2 (keys, positions and lengths go along)
    cache.swap(0, 2)
    for lst in (seqs, got, at):
        lst[0], lst[2] = lst[2], lst[0]
    for _ in range(5):
        step(3, at)
    for r in range(3):
        cached = torch.cat(got[r])
        with torch.inference_mode():
            full = model(torch.tensor([seqs[r][: at[r]]]))[0]
        # float32 summation order differs (keys in another order and count): ~1e-6 of logits ~1-10
        torch.testing.assert_close(cached, full, rtol=0, atol=2e-5 * float(full.abs().max()))
        assert torch.equal(cached.argmax(-1), full.argmax(-1))


def test_slot_cache_truncate_swap_and_limits() -> None:
    model = generation_models("gemma2")[1]  # sliding window 5
    cache = SlotCache(model.config, 2, 16)
    cache.bind(0, 1)
    with torch.inference_mode():
        model(torch.tensor([[2, 5, 6, 7, 8, 9, 10, 11]]), torch.arange(8)[None], cache=cache)
    assert cache.lengths == [8, 0] and cache.ring_len == 5
    # the ring wrapped (8 > 5): cutting 1 token keeps every key the next query needs, cutting 2 does not
    assert cache.keepable(0, 7) and not cache.keepable(0, 6) and cache.keepable(0, 0)
    with pytest.raises(CacheError, match="cannot keep 6"):
        cache.truncate(0, 6)
    cache.swap(0, 1)
    assert cache.lengths == [0, 8] and (cache.pos_global[1, :8] == torch.arange(8)).all()
    cache.truncate(1, 0)
    assert cache.lengths == [0, 0] and (cache.pos_global == -1).all() and (cache.pos_local == -1).all()
    cache.bind(0, 2, [3, 4])
    with pytest.raises(CacheError, match="valid counts"):  # more real tokens than the chunk has
        model(torch.zeros(2, 3, dtype=torch.long), torch.arange(3).expand(2, 3), cache=cache)
    with pytest.raises(CacheError, match="2 counts for 1 rows"):
        cache.bind(0, 1, [1, 2])
    with pytest.raises(CacheError, match="outside"):
        cache.bind(1, 3)


@pytest.mark.parametrize("case", CASES)
def test_batcher_greedy_tokens_equal_engine_alone(case: str) -> None:
    model = generation_models(case)[1]
    prompts = _prompts(5, [6, 11, 3, 9, 14])
    engine = Engine(model)
    want = [engine.generate([p], 12)[0] for p in prompts]
    # 2 rows for 5 requests, prefill in chunks of 4: requests queue, join mid-way and leave
    batcher = Batcher(model, n_slots=2, max_len=40, prefill_chunk=4)
    try:
        results = _run(batcher, [dict(prompt=p, max_new_tokens=12) for p in prompts])
    finally:
        batcher.close()
    for (tokens, end), w, p in zip(results, want, prompts, strict=True):
        assert [t.id for t in tokens] == w
        assert end == Finished("length", len(p), 12, end.cached_tokens)


def test_batched_greedy_argmax_with_logit_bias_equals_one_row_at_a_time() -> None:
    # 4 rows take the batched argmax (plus each row's bias); 1 row takes the per-row sampler
    model = generation_models("gemma2")[1]
    prompts = _prompts(8, [5, 9, 7, 12])
    alone = Engine(model).generate([prompts[0]], 10)[0]
    biases = [None, {alone[0]: -100.0, alone[1]: -100.0}, {t: 5.0 for t in alone[2:6]}, {3: 100.0}]
    requests = [dict(prompt=p, max_new_tokens=10, logit_bias=b) for p, b in zip(prompts, biases, strict=True)]
    got = []
    for rows in (4, 1):
        batcher = Batcher(model, n_slots=rows, max_len=40)
        try:
            got.append([[t.id for t in tokens] for tokens, _ in _run(batcher, requests)])
        finally:
            batcher.close()
    assert got[0] == got[1]
    assert got[0][3] == [3] * 10 and got[0][0] == alone and alone[0] not in got[0][1]  # the biases acted


def test_stop_tokens_seeded_sampling_and_logprobs() -> None:
    model = generation_models("gemma3")[1]
    [p] = _prompts(7, [8])
    engine = Engine(model)
    greedy = engine.generate([p], 10)[0]
    stop = greedy[4]
    sampled = engine.generate([p], 10, temperature=1.0, seed=11)[0]
    batcher = Batcher(model, n_slots=3, max_len=40)
    try:
        (s_tokens, s_end), (g_tokens, g_end), (lp_tokens, _) = _run(batcher, [
            dict(prompt=p, max_new_tokens=10, temperature=1.0, seed=11),
            dict(prompt=p, max_new_tokens=10, stop_tokens=frozenset([stop])),
            dict(prompt=p, max_new_tokens=3, logprobs=2),
        ])  # fmt: skip
    finally:
        batcher.close()
    assert [t.id for t in s_tokens] == sampled and s_end.reason == "length"
    # the stop token ends the request and is neither emitted nor counted
    assert [t.id for t in g_tokens] == greedy[: greedy.index(stop)]
    assert g_end.reason == "stop" and g_end.completion_tokens == greedy.index(stop)
    with torch.inference_mode():
        logits = model(torch.tensor([p + greedy[:2]]))[0, len(p) - 1 :]
    logp = torch.log_softmax(logits, -1)
    for i, t in enumerate(lp_tokens):
        assert t.id == greedy[i] and t.logprob == pytest.approx(float(logp[i, t.id]), abs=1e-5)
        assert [a for a, _ in t.top] == logp[i].topk(2).indices.tolist() and t.top[0][0] == t.id


def test_next_turn_reuses_the_finished_row() -> None:
    model = generation_models("gemma3")[1]  # window 5: rows of <= max_len 64 tokens keep all keys
    [p] = _prompts(9, [10])
    batcher = Batcher(model, n_slots=2, max_len=64)
    try:
        [(first, end1)] = _run(batcher, [dict(prompt=p, max_new_tokens=6)])
        reply = [t.id for t in first]
        turn2 = p + reply + [7, 8, 9]
        [(second, end2)] = _run(batcher, [dict(prompt=turn2, max_new_tokens=6)])
    finally:
        batcher.close()
    # the row holds the prompt and the 5 fed reply tokens (the last sampled one was never fed)
    assert end1.cached_tokens == 0 and end2.cached_tokens == len(p) + len(reply) - 1
    assert [t.id for t in second] == Engine(model).generate([turn2], 6)[0]


def test_cancel_frees_the_row_and_a_full_queue_is_busy() -> None:
    model = generation_models("gemma1-mqa")[1]
    [p] = _prompts(1, [5])
    batcher = Batcher(model, n_slots=1, max_len=200, queue_limit=1)
    events: queue.Queue = queue.Queue()
    try:
        long = batcher.submit(Request(p, 190, events.put))
        assert isinstance(events.get(timeout=30), Token)  # running
        batcher.submit(Request(p, 5, lambda e: None))  # queued: the only row is taken
        with pytest.raises(Busy, match="queue is full"):
            batcher.submit(Request(p, 5, lambda e: None))
        long.cancel()
        while not isinstance(e := events.get(timeout=30), Finished):
            pass
        assert e.reason == "cancelled" and e.completion_tokens < 190
        with pytest.raises(GenerationError, match="exceeds the context size 200"):
            batcher.submit(Request(p, 196, lambda e: None))
        with pytest.raises(GenerationError, match="temperature"):
            batcher.submit(Request(p, 5, lambda e: None, temperature=-1.0))
    finally:
        batcher.close()
    assert batcher.running == 0 and batcher.waiting == 0 and not batcher.alive
    with pytest.raises(Busy, match="shutting down"):
        batcher.submit(Request(p, 5, lambda e: None))


def test_a_burst_into_an_idle_batcher_fills_the_free_rows_and_the_queue() -> None:
    model = generation_models("gemma1-mqa")[1]
    [p] = _prompts(1, [5])
    batcher = Batcher(model, n_slots=2, max_len=200, queue_limit=1)
    try:
        burst = [batcher.submit(Request(p, 190, lambda e: None)) for _ in range(3)]  # 2 rows + 1 queued
        with pytest.raises(Busy, match="queue is full"):
            batcher.submit(Request(p, 5, lambda e: None))
        for r in burst:
            r.cancel()
    finally:
        batcher.close()


class _Faulty(torch.nn.Module):
    """The model, raising on its `fail_at`-th forward (counting from 1)."""

    def __init__(self, model: torch.nn.Module, fail_at: int) -> None:
        super().__init__()
        self.inner, self.config, self.fail_at, self.calls = model, model.config, fail_at, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected fault")
        return self.inner(*args, **kwargs)


def test_a_failed_forward_fails_its_requests_and_the_next_one_runs() -> None:
    inner = generation_models("gemma2")[1]
    model = _Faulty(inner, fail_at=4)  # prefill, 2 decode steps, then the fault
    [p] = _prompts(2, [6])
    batcher = Batcher(model, n_slots=2, max_len=40)
    try:
        [(tokens, end)] = _run(batcher, [dict(prompt=p, max_new_tokens=10)])
        assert len(tokens) == 3 and isinstance(end, Failed) and "injected fault" in end.message
        assert not batcher.healthy and batcher.counters["failures"] == 1
        [(tokens, end)] = _run(batcher, [dict(prompt=p, max_new_tokens=10)])
        assert [t.id for t in tokens] == Engine(inner).generate([p], 10)[0] and end.reason == "length"
        assert batcher.healthy and batcher.running == 0
    finally:
        batcher.close()


def test_deadline_ends_a_request_with_length() -> None:
    model = generation_models("gemma1-mqa")[1]
    [p] = _prompts(4, [5])
    batcher = Batcher(model, n_slots=1, max_len=250)
    try:
        # past its deadline while queued: ends before it runs; mid-run: ends at the next token boundary
        [(tokens, end)] = _run(batcher, [dict(prompt=p, max_new_tokens=240, deadline=time.monotonic())])
        assert end == Finished("length", 5, 0, 0) and tokens == []
        events: queue.Queue = queue.Queue()
        r = batcher.submit(Request(p, 240, events.put))
        assert isinstance(events.get(timeout=30), Token)
        r.deadline = time.monotonic()
        while not isinstance(e := events.get(timeout=30), Finished):
            pass
        assert e.reason == "length" and e.completion_tokens < 240
    finally:
        batcher.close()


class _Killer(_Faulty):
    """Raises an error that is not an Exception (as a bug in the worker's own code would escape)."""

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise SystemExit("injected worker death")
        return self.inner(*args, **kwargs)


def test_a_dead_worker_fails_every_request_and_refuses_new_ones() -> None:
    model = _Killer(generation_models("gemma2")[1], fail_at=3)  # prefill, one decode, then death
    prompts = _prompts(5, [6, 7, 8])
    died = threading.Event()
    batcher = Batcher(model, n_slots=1, max_len=40, on_death=died.set)  # one row: two requests queue
    try:
        results = _run(batcher, [dict(prompt=p, max_new_tokens=10) for p in prompts])
        assert [len(t) for t, _ in results] == [2, 0, 0]  # the running one got 2 tokens, the queued none
        assert all(isinstance(end, Failed) and "worker stopped" in end.message for _, end in results)
        assert died.wait(5) and not batcher.alive and not batcher.healthy and "SystemExit" in batcher.dead
        with pytest.raises(Busy, match="engine stopped"):
            batcher.submit(Request(prompts[0], 5, lambda e: None))
    finally:
        batcher.close()
