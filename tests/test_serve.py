"""The OpenAI-compatible endpoint, driven by the official `openai` client: two adapters trained on
the tiny model and the base, served in one process, answered per request and batched together."""

from __future__ import annotations

import concurrent.futures
import logging
import subprocess
import sys
import threading

import pytest

from tests.helpers import add_version, free_port, two_sum_adapters, wait_until

KEY = "test-key-0123456789abcdef"
PROMPTS = ["what is 2 plus 3", "what is 7 plus 1", "hello world", "the capital of france is"]
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    import uvicorn

    from studio.service import Studio
    from studio.serving.server import create_app, serving_context

    root = tmp_path_factory.mktemp("serve")
    runs = two_sum_adapters(tiny_model_dir, root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_STUDIO_AUTO_PRECISION", "fp32")  # the base alone runs as the runs do
        studio = Studio(root / "runs")
        ctx = serving_context(studio, model=str(tiny_model_dir), api_key=KEY, max_tokens_cap=64)
    ctx.engine.max_wait_s = 0.25  # concurrent test requests land in one batch
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 60, "the API server to start")
    yield f"http://127.0.0.1:{port}/v1", ctx, runs
    server.should_exit = True
    thread.join(20)


def _client(url, key=KEY):
    import openai

    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def _chat(client, model, prompt, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)


def test_models_lists_the_base_adapters_and_checkpoints(served):
    url, ctx, runs = served
    models = {m.id: m for m in _client(url).models.list().data}
    base = ctx.catalog.base
    assert base in models and models[base].parent is None
    for run in runs:
        assert models[run.id].parent == base and models[run.id].root == run.id
        for ckpt in run.checkpoints():
            assert models[f"{run.id}@{ckpt.name}"].parent == base


def test_completion_and_stream_agree_and_count_tokens(served):
    url, ctx, runs = served
    client = _client(url)
    tokenizer = ctx.catalog.tokenizer(ctx.catalog.get(runs[0].id))
    for model in (runs[0].id, ctx.catalog.base):
        full = _chat(client, model, PROMPTS[0])
        choice = full.choices[0]
        assert full.object == "chat.completion" and choice.message.role == "assistant"
        assert choice.finish_reason in ("stop", "length") and full.model == model
        chunks = list(_chat(client, model, PROMPTS[0], stream=True, stream_options={"include_usage": True}))
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == choice.message.content  # temperature 0: the same text either way
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
        usage = chunks[-1].usage  # the last chunk carries usage and no choices
        assert chunks[-1].choices == [] and usage == full.usage
        templated = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, tokenize=False
        )
        assert usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False)["input_ids"])
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert (usage.completion_tokens == 12) == (choice.finish_reason == "length")


def test_the_adapter_changes_the_answer(served):
    url, ctx, runs = served
    client = _client(url)
    answers = {
        m: _chat(client, m, PROMPTS[0], max_tokens=16).choices[0].message.content
        for m in (ctx.catalog.base, runs[0].id, runs[1].id)
    }
    assert len(set(answers.values())) == 3, answers


def test_concurrent_requests_batch_across_adapters_and_equal_each_alone(served, caplog, monkeypatch):
    from studio.serving.routing import Route

    url, ctx, runs = served
    routed_batches = []
    real = Route.set_rows
    monkeypatch.setattr(Route, "set_rows", lambda self, names: routed_batches.append(list(names)) or real(self, names))
    client = _client(url)
    models = [ctx.catalog.base, runs[0].id, runs[1].id]
    jobs = [(models[i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(8)]
    alone = [_chat(client, m, p, max_tokens=10).choices[0].message.content for m, p in jobs]  # one at a time
    caplog.clear()  # the lines of the requests sent alone are not this count's
    with caplog.at_level(logging.INFO, logger="studio.serving"):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda j: _chat(client, *j, max_tokens=10).choices[0].message.content, jobs))
    assert together == alone
    assert any(len(set(n)) > 1 for n in routed_batches)  # rows of several adapters routed in one batch
    lines = [r.getMessage() for r in caplog.records if "batch_models=" in r.getMessage()]
    assert len(lines) == 8
    mixed = [line for line in lines if len(line.split("batch_models=")[1].split()[0].split(",")) > 1]
    assert mixed, lines  # at least one batch served several models at once
    assert any("__base__" in line and runs[0].id in line for line in mixed)
    assert all(
        f"weights={ctx.catalog.weights_hash(ctx.catalog.get(runs[0].id))}" in line
        for line in lines
        if f"model={runs[0].id} " in line
    )


def test_errors_come_in_openais_shape(served):
    import openai

    url, ctx, runs = served
    client = _client(url)
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        _chat(client, "no-such-run", "hi")
    with pytest.raises(openai.BadRequestError, match="`max_tokens` must be an integer from 1 to 64"):
        _chat(client, runs[0].id, "hi", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="`temperature`"):
        _chat(client, runs[0].id, "hi", temperature=9)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        _chat(_client(url, key="wrong-key-0123456789abcdef"), runs[0].id, "hi")


def test_completions_stop_strings_and_metrics(served):
    import httpx

    url, ctx, runs = served
    client = _client(url)
    full = _chat(client, runs[0].id, PROMPTS[1], max_tokens=16).choices[0].message.content
    assert len(full) > 2
    stop = full[1:3]  # a stop string that the greedy answer contains
    cut = _chat(client, runs[0].id, PROMPTS[1], max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    text = client.completions.create(model=runs[0].id, prompt="what is 1 plus", max_tokens=5, temperature=0)
    assert text.object == "text_completion" and text.usage.completion_tokens <= 5
    metrics = httpx.get(url.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert f'finetune_studio_requests_total{{model="{runs[0].id}"}}' in metrics
    assert httpx.get(url.removesuffix("/v1") + "/metrics").status_code == 401


@pytest.mark.process
def test_a_non_local_bind_needs_a_key():
    from studio.launch import resolve_api_key, ui_api_key

    with pytest.raises(SystemExit, match="without a key"):
        resolve_api_key("0.0.0.0", None)
    with pytest.raises(SystemExit, match="at least 16 characters"):
        resolve_api_key("127.0.0.1", "short")
    assert resolve_api_key("127.0.0.1", None) is None and resolve_api_key("0.0.0.0", KEY) == KEY
    # The page's server: the API comes with it on loopback, and beyond it only with a key.
    assert ui_api_key("127.0.0.1", None) == (True, None) and ui_api_key("0.0.0.0", None) == (False, None)
    assert ui_api_key("0.0.0.0", KEY) == (True, KEY)
    proc = subprocess.run(
        [sys.executable, "-m", "studio.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "without a key" in proc.stderr


def test_training_keeps_priority(served, monkeypatch):
    import openai

    url, ctx, runs = served
    monkeypatch.setattr(
        ctx, "busy", lambda: "Training run r1 is using this machine; the API answers again when it ends."
    )
    with pytest.raises(openai.APIStatusError) as err:
        _chat(_client(url), runs[0].id, "hi")
    assert err.value.status_code == 503 and "Training run r1" in str(err.value)
    assert err.value.response.headers["retry-after"] == "30"


@pytest.mark.unit
def test_the_chat_tabs_snippets_are_code_that_names_the_adapter():
    from studio.ui.api_panel import curl_snippet, python_snippet

    code = python_snippet("http://127.0.0.1:7860/v1", "20261126-run@step-4", key_required=True)
    compile(code, "snippet", "exec")  # valid Python as shown
    assert 'model="20261126-run@step-4"' in code and 'os.environ["FINETUNE_STUDIO_API_KEY"]' in code
    curl = curl_snippet("http://127.0.0.1:7860/v1", "r1", key_required=False)
    assert curl.startswith("curl http://127.0.0.1:7860/v1/chat/completions") and "Authorization" not in curl
    assert '"model": "r1"' in curl


def test_a_failed_batch_answers_with_an_error_and_leaves_nothing_behind(served):
    from studio.inference.playground import SamplingSettings
    from studio.serving.engine import Request

    url, ctx, runs = served
    client = _client(url)
    before = _chat(client, runs[0].id, PROMPTS[2]).choices[0].message.content
    # A token id outside the vocabulary fails inside PEFT's mixed-batch forward.
    bad = ctx.engine.submit(Request("bad-1", runs[0].id, [10**7], SamplingSettings(max_new_tokens=2)))
    kind, message = bad.events.get(timeout=120)
    assert kind == "error" and message.startswith("Generation failed")
    hooks = [
        h
        for m in ctx.engine.playground.model.modules()
        for h in m._forward_pre_hooks.values()
        if getattr(getattr(h, "func", None), "__name__", "") == "_adapter_names_pre_forward_hook"
    ]
    assert hooks == []  # no stale adapter choice steers the next request
    assert _chat(client, runs[0].id, PROMPTS[2]).choices[0].message.content == before


def test_ignore_eos_decodes_to_max_tokens(served):
    url, ctx, runs = served
    reply = _chat(_client(url), runs[0].id, PROMPTS[0], max_tokens=20, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 20 and reply.choices[0].finish_reason == "length"


@pytest.mark.process
def test_a_cold_serve_process_answers_first_and_logs_the_request(tiny_model_dir, tmp_path):
    """`finetune-studio serve` as a fresh process whose very first request is a completion; the
    request's log line reaches its output (INFO, with nothing else configuring logging)."""
    import os

    import openai

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "studio.cli", "serve", "--port", str(port), "--model", str(tiny_model_dir),
             "--runs-dir", str(tmp_path / "runs")],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_until(lambda: "OpenAI-compatible API on" in log.read_text() or proc.poll() is not None, 180, "serve")
        assert proc.poll() is None, log.read_text()
        client = _client(url, key="unused-on-localhost")
        replies = []

        def first_reply() -> bool:  # the line is printed just before uvicorn binds the port
            try:
                replies.append(_chat(client, str(tiny_model_dir), "hello world", max_tokens=4))
            except openai.APIConnectionError:
                return False
            return True

        wait_until(first_reply, 60, "the first completion", poll=0.2)
        reply = replies[0]
        assert 1 <= reply.usage.completion_tokens <= 4
        wait_until(lambda: f"request={reply.id}" in log.read_text(), 30, "the request's log line")
        assert "batch_models=__base__" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.unit
def test_a_closed_engine_ends_its_thread_after_what_was_queued():
    """An engine made for one job (an evaluation) leaves no idle thread; a later submit starts one."""
    from studio.serving.engine import Engine, Request

    def resolve(ref):
        raise LookupError(f"no such model {ref}")  # every request ends at once, with a sentence

    engine = Engine(playground=None, resolve=resolve)
    first = engine.submit(Request("a", "x", [1, 2], None))
    engine.close()  # returns once the thread has ended: a process may exit right after it
    assert not engine._thread.is_alive()
    assert first.events.get(timeout=5) == ("error", "no such model x")  # what was queued is still answered
    later = engine.submit(Request("b", "y", [1], None))
    assert later.events.get(timeout=5) == ("error", "no such model y") and engine._thread.is_alive()
    engine.close()
    assert not engine._thread.is_alive()


def _post(url, path, body, key=KEY):
    import httpx

    root = url.removesuffix("/v1")
    return httpx.post(root + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _reference_logprobs(model_dir, weights, ids):
    """Plain transformers (and PEFT for an adapter), fp32: log p(ids[i] | ids[:i]) for i >= 1."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if weights is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(weights))
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(logp[i - 1, t]) for i, t in enumerate(ids) if i]


def test_echo_with_logprobs_scores_every_prompt_token_of_a_batch(served, tiny_model_dir):
    """lm-eval's loglikelihood request: token-id prompts, batched, echo, logprobs, max_tokens 1."""
    url, ctx, runs = served
    tokenizer = ctx.catalog.tokenizer(ctx.catalog.get(ctx.catalog.base))
    prompts = [tokenizer(p)["input_ids"] for p in ("what is 2 plus 3 answer 5", "hello world")]
    for model, weights in ((ctx.catalog.base, None), (runs[0].id, runs[0].weights_dir())):
        body = {"model": model, "prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 2, "temperature": 0}
        reply = _post(url, "/v1/completions", body)
        assert reply.status_code == 200, reply.text
        choices = reply.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1]
        for ids, choice in zip(prompts, choices):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids) + 1  # the prompt and one token
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            assert all(len(top) <= 3 and max(top.values()) <= 0 for top in lp["top_logprobs"][1:])
            assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
            assert choice["text"].startswith(tokenizer.decode(ids))
            expected = _reference_logprobs(tiny_model_dir, weights, ids)
            assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=1e-4)  # fp32 runs
        alone = _post(url, "/v1/completions", body | {"prompt": prompts[1]}).json()["choices"][0]["logprobs"]
        assert alone["token_logprobs"][1:] == pytest.approx(choices[1]["logprobs"]["token_logprobs"][1:], abs=1e-5)


def test_echo_alone_scores_the_prompt_and_logprobs_follow_the_reply(served):
    url, ctx, runs = served
    scored = _post(url, "/v1/completions", {"model": runs[0].id, "prompt": "hello world", "max_tokens": 0,
                                            "echo": True, "logprobs": 0})  # fmt: skip
    choice = scored.json()["choices"][0]
    assert scored.status_code == 200 and choice["text"] == "hello world" and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["token_logprobs"]) == scored.json()["usage"]["prompt_tokens"]
    chat = _chat(_client(url), runs[0].id, PROMPTS[0], logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert _chat(_client(url), runs[0].id, PROMPTS[0]).choices[0].logprobs is None  # not asked: null


@pytest.mark.parametrize(
    "body, param, says",
    [
        ({"prompt": []}, "prompt", "non-empty string, a list of strings, a list of token ids"),
        ({"prompt": [[1, 2], []]}, "prompt", "`prompt[1]` is an empty list of token ids"),
        ({"prompt": [1, 10**6]}, "prompt", "`prompt[1]` is 1000000: token ids must be integers from 0 to"),
        ({"prompt": [[1, -1]]}, "prompt", "`prompt[0][1]` is -1"),
        ({"prompt": [1, "a"]}, "prompt", "`prompt[1]` is 'a'"),
        ({"prompt": ["a", 3]}, "prompt", "(`prompt[1]` is int)"),
        ({"prompt": [[1]] * 129}, "prompt", "at most 128"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs", "`logprobs` must be an integer from 0 to 20"),
        ({"prompt": "hi", "logprobs": True}, "logprobs", "`logprobs` must be an integer"),
        ({"prompt": "hi", "echo": "yes"}, "echo", "`echo` must be true or false"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "from 1 to 64"),
        ({"prompt": "hi", "logprobs": 1, "stream": True}, "stream", "without `logprobs` or `echo`"),
        ({"prompt": ["a", "b"], "stream": True}, "stream", "one prompt"),
        ({"prompt": "hi", "best_of": 3}, "best_of", "`best_of` must be 1"),
        ({"prompt": "hi", "suffix": "end"}, "suffix", "not supported"),
        ({"prompt": "hi", "logit_bias": {"5": 10}}, "logit_bias", "not supported"),
        ({"messages": HI, "top_logprobs": 2}, "top_logprobs", "needs `logprobs: true`"),
        ({"messages": HI, "logprobs": True, "top_logprobs": 30}, "top_logprobs", "from 0 to 20"),
    ],
)  # fmt: skip
def test_unsupported_or_malformed_scoring_requests_are_refused_with_a_sentence(served, body, param, says):
    url, ctx, runs = served
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    reply = _post(url, path, {"model": runs[0].id, "max_tokens": 2} | body)
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["type"] == "invalid_request_error", reply.text
    assert error["param"] == param and says in error["message"], error["message"]


def test_tokenize_and_detokenize_answer_as_vllm_does(served):
    url, ctx, runs = served
    tokenizer = ctx.catalog.tokenizer(ctx.catalog.get(ctx.catalog.base))
    tokens = _post(url, "/tokenize", {"prompt": "hello world", "add_special_tokens": False}).json()
    assert tokens["tokens"] == tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    assert _post(url, "/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": "hello world"}
    chat = _post(url, "/tokenize", {"model": runs[0].id, "messages": [{"role": "user", "content": "hi"}]}).json()
    assert tokenizer.decode(chat["tokens"]).endswith("<|im_start|>assistant\n")
    bad = _post(url, "/detokenize", {"tokens": [1, 10**6]})
    assert bad.status_code == 400 and "`tokens[1]` is 1000000" in bad.json()["error"]["message"]
    root = url.removesuffix("/v1")
    import httpx

    info = httpx.get(root + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["eos_token"] == "<|im_end|>" and info["chat_template"] == tokenizer.chat_template
    assert httpx.get(root + "/tokenizer_info").status_code == 401  # the key guards these too
    assert _post(url, "/tokenize", {"prompt": "hi"}, key="wrong-key-0123456789abcdef").status_code == 401


def test_a_resaved_adapter_is_served_at_once_and_logged(served, tiny_model_dir, caplog):
    """Issue 24: after a run saves a new version, the next request for the run's id answers with
    the new weights (as plain PEFT loading them does) and the log names the version and its hash;
    ``RUN@v1`` still answers as the first version did."""
    import shutil

    from studio.inference.playground import _adapter_name
    from studio.runs import files
    from studio.runs.registry import Run

    url, ctx, runs = served
    clone = runs[0].path.parent / f"{runs[0].id}-resaved"  # a run of its own: the others stay as they are
    shutil.copytree(runs[0].path, clone)
    try:
        ids = ctx.catalog.tokenizer(ctx.catalog.get(ctx.catalog.base))("what is 2 plus 3 answer 5")["input_ids"]

        def scored(model):
            body = {"model": model, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
            reply = _post(url, "/v1/completions", body)
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["logprobs"]["token_logprobs"][1:]

        old = scored(clone.name)
        assert old == pytest.approx(_reference_logprobs(tiny_model_dir, runs[0].weights_dir(), ids), abs=1e-4)
        add_version(Run(clone), runs[1].weights_dir(), kind="continued")
        with caplog.at_level(logging.INFO, logger="studio.serving"):
            new = scored(clone.name)
        assert new == pytest.approx(_reference_logprobs(tiny_model_dir, runs[1].weights_dir(), ids), abs=1e-4)
        assert new != pytest.approx(old, abs=1e-3)  # otherwise the swap proves nothing
        line = [r.getMessage() for r in caplog.records if f"model={clone.name} " in r.getMessage()][-1]
        assert f"-> {clone.name}@v2 weights={files.weights_sha256(runs[1].weights_dir())} " in line
        loaded = [n for n in ctx.engine.playground.model.peft_config if n.startswith(_adapter_name(clone.name))]
        assert _adapter_name(f"{clone.name}@v2") in loaded
        assert scored(f"{clone.name}@v1") == pytest.approx(old, abs=1e-5)  # a version never changes
    finally:
        shutil.rmtree(clone)
