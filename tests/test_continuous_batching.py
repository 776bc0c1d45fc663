"""Continuous batching on the tiny model with two trained adapters: a request that joins a running
batch gets exactly the answer it gets alone, a finished row leaves it, prompts that start alike
reuse one prefill (and still answer the same), the queue is bounded and fair, a client that left
frees its row, and the Chat tab gets the playground between two steps of a busy batch."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from studio.inference.playground import SamplingSettings
from studio.serving.engine import Engine, Request, _Waiting
from studio.serving.prefix_cache import PrefixCache
from tests.helpers import free_port, two_sum_adapters, wait_until

SYSTEM = "You answer sums. " * 12  # a long shared start: the prefix cache's case


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    from studio.service import Studio
    from studio.serving.server import serving_context

    root = tmp_path_factory.mktemp("cb")
    runs = two_sum_adapters(tiny_model_dir, root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_STUDIO_AUTO_PRECISION", "fp32")
        studio = Studio(root / "runs")
        ctx = serving_context(studio, model=str(tiny_model_dir), max_tokens_cap=200)
    yield studio, ctx, [r.id for r in runs]
    ctx.engine.close()


def _ids(ctx, text: str, system: str | None = None) -> list[int]:
    tokenizer = ctx.catalog.tokenizer(ctx.catalog.get(ctx.catalog.base))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))["input_ids"]


def _request(ctx, name: str, ref, text: str, max_tokens: int, system=None, client: str = "") -> Request:
    settings = SamplingSettings(max_new_tokens=max_tokens, temperature=0)
    return Request(name, ref, _ids(ctx, text, system), settings, ignore_eos=True, client=client)


def _engine(ctx, **kw) -> Engine:
    kw.setdefault("max_wait_s", 0)
    return Engine(ctx.engine.playground, ctx.catalog.resolve, **kw)


def _finish(r: Request, timeout: float = 60) -> Request:
    deadline = time.monotonic() + timeout
    while True:
        kind, value = r.events.get(timeout=max(0.01, deadline - time.monotonic()))
        if kind == "done":
            return r
        assert kind != "error", value


def _alone(ctx, ref, text, max_tokens, system=None) -> list[int]:
    engine = _engine(ctx)
    try:
        return _finish(engine.submit(_request(ctx, "alone", ref, text, max_tokens, system))).output_ids
    finally:
        engine.close()


@pytest.fixture
def slow_steps(monkeypatch):
    """Every decode step takes at least 20 ms, so a test can act between steps on any machine."""
    from studio.serving.batch import Batch

    real = Batch.step

    def step(self):
        time.sleep(0.02)
        return real(self)

    monkeypatch.setattr(Batch, "step", step)


def test_a_request_joining_mid_batch_answers_as_alone_and_a_finished_row_leaves(setup, slow_steps):
    studio, ctx, runs = setup
    long_a = _alone(ctx, runs[0], "what is 2 plus 3", 40)
    short_b = _alone(ctx, runs[1], "what is 6 plus 6 and then some more words", 6)
    base_c = _alone(ctx, None, "hello", 3)
    engine = _engine(ctx)
    try:
        a = engine.submit(_request(ctx, "a", runs[0], "what is 2 plus 3", 40))
        wait_until(lambda: len(a.output_ids) >= 5, 30, "the first request to be decoding")
        b = engine.submit(_request(ctx, "b", runs[1], "what is 6 plus 6 and then some more words", 6))
        c = engine.submit(_request(ctx, "c", None, "hello", 3))
        for r in (a, b, c):
            _finish(r)
    finally:
        engine.close()
    assert 5 <= a.completion_tokens and b.first_token_at > a.first_token_at
    assert a.output_ids == long_a and b.output_ids == short_b and c.output_ids == base_c
    assert a.batch_id == b.batch_id == c.batch_id  # they joined the running batch, not a later one
    assert set(a.batch_refs) == {runs[0], runs[1], "__base__"}
    # Rows leave the step they end: a decodes 39 steps after its prefill, b 5, c 2; a static batch
    # would have stepped every row to the end.
    assert engine.counters.rows_stepped == 39 + 5 + 2
    assert engine.counters.steps == 39


def test_the_first_adapter_loading_mid_batch_leaves_a_decoding_base_row_the_base(setup, tiny_model_dir, slow_steps):
    """Loading a playground's first adapter turns its base into a PeftModel in place: a base row
    already decoding must not start answering through that adapter."""
    from studio.service import Studio
    from studio.serving.server import serving_context

    studio, ctx, runs = setup
    base_alone = _alone(ctx, None, "what is 2 plus 3", 30)
    tuned_alone = _alone(ctx, runs[0], "what is 2 plus 3", 5)
    assert base_alone[:5] != tuned_alone  # the adapter answers differently, so a leak would show
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_STUDIO_AUTO_PRECISION", "fp32")
        fresh = serving_context(Studio(studio.runs_root), model=str(tiny_model_dir))
    engine = _engine(fresh)
    try:
        base = engine.submit(_request(fresh, "base", None, "what is 2 plus 3", 30))
        wait_until(lambda: len(base.output_ids) >= 3, 30, "the base row to be decoding")
        assert not fresh.engine.playground.adapters  # nothing loaded yet: a plain model
        tuned = engine.submit(_request(fresh, "tuned", runs[0], "what is 2 plus 3", 5))
        _finish(base)
        _finish(tuned)
    finally:
        engine.close()
    assert base.batch_id == tuned.batch_id
    assert base.output_ids == base_alone and tuned.output_ids == tuned_alone


def test_prompts_that_start_alike_share_a_prefill_and_answer_the_same(setup):
    studio, ctx, runs = setup
    questions = ["what is 1 plus 2", "what is 4 plus 4", "what is 5 plus 1"]
    expected = {(ref, q): _alone(ctx, ref, q, 8, SYSTEM) for ref in (None, runs[0]) for q in questions}
    cache = PrefixCache()
    engine = _engine(ctx, prefix_cache=cache)
    try:
        for ref in (None, runs[0]):
            for q in questions:  # one at a time: each finds the ones before it in the cache
                r = _finish(engine.submit(_request(ctx, "p", ref, q, 8, SYSTEM)))
                assert r.output_ids == expected[(ref, q)], (ref, q)
        together = [engine.submit(_request(ctx, "t", ref, q, 8, SYSTEM)) for ref in (runs[0], None) for q in questions]
        for r in together:
            _finish(r)
        assert [r.output_ids for r in together] == [expected[(ref, q)] for ref in (runs[0], None) for q in questions]
    finally:
        engine.close()
    stats = cache.snapshot()
    shared = len(_ids(ctx, "", SYSTEM)) - 6  # the template's start and the system prompt, at least
    # The first prompt of each model computes everything; the adapter's K/V differ from the base's,
    # so its first prompt misses too. Every later prompt reuses the shared start.
    assert stats.lookups == 12 and stats.hits == 10
    assert stats.tokens_reused >= 10 * shared
    assert "finetune_studio_prefix_cache_hit_rate 0.8333" in engine.prometheus()


@pytest.mark.unit
def test_waiting_requests_are_taken_round_robin_across_clients():
    waiting = _Waiting()
    with waiting.changed:
        for i in range(4):
            waiting.put(Request(f"flood-{i}", None, [1], SamplingSettings(), client="flood"))
        waiting.put(Request("one", None, [1], SamplingSettings(), client="other"))
        order = [waiting.pop().id for _ in range(5)]
    assert order == ["flood-0", "one", "flood-1", "flood-2", "flood-3"]


def test_a_full_queue_refuses_with_503_and_a_clients_share_with_429(setup, tiny_model_dir):
    """Over HTTP with the official client: while the engine cannot start (the playground is held),
    requests wait; the queue's limits answer at once with Retry-After; nothing queued is lost."""
    import openai
    import uvicorn

    from studio.serving.server import create_app, serving_context

    studio, ctx, runs = setup
    api = serving_context(studio, model=str(tiny_model_dir), max_queue=2, max_queue_per_client=1)
    api.engine.max_wait_s = 0
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(api), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    wait_until(lambda: server.started, 60, "the API server to start")
    url = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    answers = []
    try:
        with studio.playground._lock:  # the Chat tab (say) holds the playground: nothing starts
            first = threading.Thread(
                target=lambda: answers.append(client.chat.completions.create(model=runs[0], **body))
            )
            first.start()
            wait_until(lambda: api.engine.waiting == 1, 30, "the first request to wait")
            with pytest.raises(openai.RateLimitError) as limited:  # same client (address), share of 1
                client.chat.completions.create(model=runs[0], **body)
            assert "already have 1 requests waiting" in limited.value.message
            assert int(limited.value.response.headers["retry-after"]) >= 1
            api.engine.max_queue_per_client = 5
            second = threading.Thread(
                target=lambda: answers.append(client.chat.completions.create(model=runs[1], **body))
            )
            second.start()
            wait_until(lambda: api.engine.waiting == 2, 30, "the second request to wait")
            with pytest.raises(openai.InternalServerError) as full:
                client.chat.completions.create(model=runs[0], **body)
            assert full.value.status_code == 503 and "at capacity" in full.value.message
            assert int(full.value.response.headers["retry-after"]) >= 1
        first.join(60)
        second.join(60)
        assert len(answers) == 2 and all(a.usage.completion_tokens == 3 for a in answers)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'finetune_studio_rejected_total{reason="queue_full"} 1' in metrics
        assert 'finetune_studio_rejected_total{reason="client_share"} 1' in metrics
    finally:
        server.should_exit = True
        api.engine.close()


def _ask(client, model, body):
    return client.chat.completions.create(model=model, **body)


def test_a_client_that_leaves_frees_its_row_at_the_next_step(setup, slow_steps):
    studio, ctx, runs = setup
    engine = _engine(ctx)
    try:
        stay = engine.submit(_request(ctx, "stay", runs[0], "what is 1 plus 1", 60))
        leave = engine.submit(_request(ctx, "leave", runs[1], "what is 2 plus 2", 60))
        wait_until(lambda: len(leave.output_ids) >= 3, 30, "both rows to be decoding")
        leave.cancelled.set()  # what the API does when a client disconnects
        wait_until(lambda: leave.finished_at is not None, 5, "the row to leave")
        left_at = len(leave.output_ids)
        _finish(stay)
    finally:
        engine.close()
    assert left_at < 10 and len(leave.output_ids) == left_at and leave.finish_reason == "stop"
    assert stay.completion_tokens == 60
    assert engine.counters.rows_stepped < 59 + left_at + 2


def test_the_chat_tab_gets_the_playground_between_steps_of_a_busy_batch(setup, slow_steps):
    studio, ctx, runs = setup
    engine = _engine(ctx)
    pg = ctx.engine.playground
    try:
        busy = [engine.submit(_request(ctx, f"busy{i}", runs[i % 2], "what is 3 plus 3", 150)) for i in range(3)]
        wait_until(lambda: all(len(r.output_ids) >= 2 for r in busy), 30, "the batch to be decoding")
        pg.activate(studio.registry.get(runs[0]))  # the Chat tab picks a run, then chats
        started = time.monotonic()
        *_, (base_text, tuned_text) = pg.stream_pair(HI, HI, SamplingSettings(max_new_tokens=5, temperature=0))
        chat_s = time.monotonic() - started
        still_running = [r.finished_at is None for r in busy]
        for r in busy:
            _finish(r)
    finally:
        engine.close()
    assert all(still_running), "the chat waited for the whole batch"
    assert chat_s < 10 and engine.counters.lends >= 1
    assert [r.completion_tokens for r in busy] == [150] * 3
    assert [r.output_ids for r in busy[:2]] == [
        _alone(ctx, runs[i % 2], "what is 3 plus 3", 150) for i in range(2)
    ]  # lending the playground changed nobody's answer


HI = [{"role": "user", "content": "hi"}]


def test_an_idle_engine_ends_its_thread_and_the_next_request_starts_one(setup):
    """With GNU OpenMP a live thread that ran torch slows every other thread's parallel work on
    CPU (~1.5x), so an idle engine lets its thread go."""
    studio, ctx, runs = setup
    engine = _engine(ctx, idle_exit_s=0.2)
    first = engine.submit(_request(ctx, "one", runs[0], "hi", 2))
    thread = engine._thread  # set by submit, under the queue's lock
    _finish(first)
    wait_until(lambda: not thread.is_alive(), 10, "the idle thread to end")
    second = _finish(engine.submit(_request(ctx, "two", runs[0], "hi", 2)))
    assert second.output_ids == first.output_ids and engine._thread is not thread
    engine.close()
