"""`morelora serve`: answers equal the offline predictions under concurrent mixed-task load (inputs longer than
the run's max_length included: truncated as in evaluation), bad input and the error shape, body-size and body-time
limits, abandoned requests, queue full / timeouts / failing batches, bounded shutdown, SIGTERM drain and kill -9 +
restart; `morelora export --all-tasks` and exports' max length."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch

from morelora.cli import main
from morelora.config import RunConfig
from morelora.serve import MAX_CHOICES, BackgroundServer, Batcher, ServeOptions, _Metrics, serving
from morelora.training import load_run, train
from morelora.training.evaluate import make_collator

TASKS = ["rte", "sst2", "arc_easy"]
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_bert) -> Path:
    from conftest import tiny_run_config

    cfg = tiny_run_config(tiny_bert, tmp_path_factory.mktemp("serve") / "run", max_steps=2, save_steps=0)
    cfg["model"]["max_length"] = MAX_LENGTH   # most rte / arc_easy inputs are longer: truncated
    return train(RunConfig.from_dict(cfg))


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir)


@pytest.fixture(scope="module")
def offline(run_dir) -> dict[str, list]:
    tasks = json.loads((run_dir / "test_predictions.json").read_text())["tasks"]
    return {t: v["predictions"] for t, v in tasks.items()}


def _cut(run, ex: dict) -> bool:
    """Whether the collator truncates ``ex`` (cross encoding: the longest (text, pair) / (query, choice) sequence)."""
    tok, limit = run.tokenizer, run.cfg.model.max_length
    pairs = [(ex["query"], c) for c in ex["choices"]] if "choices" in ex else [(ex["text"], ex.get("text_pair"))]
    return max(len(tok(a, b)["input_ids"]) for a, b in pairs) > limit


def _inputs(run, t: int) -> list[tuple[int, dict]]:
    """(index in the test split, input without its label) of every test example."""
    drop = {"label", "gold"}
    return [(i, {k: v for k, v in ex.items() if k not in drop}) for i, ex in enumerate(run.data[t]["test"])]


def _alone(run, t: int, ex: dict) -> torch.Tensor:
    """The task's logits for one example run on its own (no batch to be influenced by)."""
    batch = make_collator(run)([(t, {**ex, "label": 0, "gold": 0})])
    batch.pop("labels")
    with torch.no_grad():
        row = run.model(**batch).logits[0]
    return row[torch.isfinite(row)]


def test_concurrent_clients_get_offline_predictions(run, offline) -> None:
    """4 clients x 6 requests of mixed tasks: every request answered once, with the offline prediction and the
    logits of its inputs run alone."""
    pool = [(t, i, x) for t in range(3) for i, x in _inputs(run, t)]
    assert len({t for t, _, _ in pool}) == 3 and len(pool) >= 24

    def client(c: int, url: str) -> list[tuple[int, list[int], dict]]:
        got = []
        with httpx.Client(base_url=url, timeout=60) as http:
            for j in range(6):
                picks = [pool[(c * 13 + j * 5 + k) % len(pool)] for k in range(1 + (c + j) % 2)]
                picks = [p for p in picks if p[0] == picks[0][0]]   # one task per request
                t = picks[0][0]
                r = http.post("/v1/predict", json={"task": TASKS[t], "inputs": [x for _, _, x in picks]})
                assert r.status_code == 200, r.text
                got.append((t, [i for _, i, _ in picks], [x for _, _, x in picks], r.json()))
        return got

    with serving(run, ServeOptions(max_batch_size=8, max_wait_ms=20)) as url:
        with ThreadPoolExecutor(4) as ex:
            answers = [a for f in [ex.submit(client, c, url) for c in range(4)] for a in f.result()]
        metrics = httpx.get(url + "/metrics").text
    assert len(answers) == 24
    assert 'morelora_requests_total{endpoint="/v1/predict",status="200"} 24.0' in metrics
    for t, indices, inputs, body in answers:
        assert body["task"] == TASKS[t] and len(body["outputs"]) == len(indices)
        for i, x, out in zip(indices, inputs, body["outputs"]):
            logits = _alone(run, t, x)
            if TASKS[t] == "arc_easy":
                assert out["choice"] == offline["arc_easy"][i]
                torch.testing.assert_close(torch.tensor(out["scores"]), logits, atol=1e-5, rtol=1e-5)
            else:
                assert out["label"] == offline[TASKS[t]][i]
                assert out["label_name"] == run.specs[t].label_words[out["label"]]
                torch.testing.assert_close(torch.tensor(out["probabilities"]), torch.softmax(logits, -1),
                                           atol=1e-5, rtol=1e-5)


def test_every_test_input_is_served_with_its_offline_prediction(run, offline) -> None:
    """All test inputs of the run, long ones included (max_length 32: cut as evaluation cuts them, and the answer
    says so): each served answer is the prediction in test_predictions.json."""
    cut = 0
    with serving(run, ServeOptions(max_batch_size=8)) as url, httpx.Client(base_url=url, timeout=60) as http:
        for t, task in enumerate(TASKS):
            inputs = _inputs(run, t)
            assert len(inputs) == len(offline[task]) == 16
            for start in range(0, len(inputs), 8):
                chunk = inputs[start:start + 8]
                r = http.post("/v1/predict", json={"task": task, "inputs": [x for _, x in chunk]})
                assert r.status_code == 200, r.text
                for (i, x), out in zip(chunk, r.json()["outputs"]):
                    assert out["choice" if task == "arc_easy" else "label"] == offline[task][i], (task, i)
                    assert out["truncated"] is _cut(run, x)
                    cut += out["truncated"]
    assert 16 <= cut < 48   # both kinds were served


def _queued_then_run(run, requests: list[list[tuple[int, dict]]], metrics: _Metrics) -> list:
    """Every request queued before the batcher's worker starts (so they can share a batch), then their answers."""

    async def go():
        batcher = Batcher(run, ServeOptions(max_batch_size=16, max_wait_ms=50), metrics)
        futures = [asyncio.ensure_future(batcher.submit(r)) for r in requests]
        await asyncio.sleep(0)           # all queued before the worker looks
        batcher.start()
        out = await asyncio.gather(*futures)
        await batcher.stop()
        return out

    return asyncio.run(go())


def test_requests_of_three_tasks_share_one_forward_pass(run, offline) -> None:
    metrics = _Metrics()
    results = _queued_then_run(run, [[(t, x) for _, x in _inputs(run, t)[:2]] for t in range(3)], metrics)
    assert metrics.batch_size._sum.get() == 6 and metrics.batch_tasks._sum.get() == 3   # one batch, 3 tasks
    for t, answers in enumerate(results):
        for (i, x), (pred, logits) in zip(_inputs(run, t)[:2], answers):
            assert pred == offline[TASKS[t]][i]
            torch.testing.assert_close(logits, _alone(run, t, x), atol=1e-5, rtol=1e-5)


def test_bad_inputs_get_clear_errors_and_the_server_goes_on(run) -> None:
    good = {"task": "sst2", "inputs": ["a fine film"]}
    cases = [
        ({"task": "nope", "inputs": ["x"]}, 404, "unknown task 'nope'; this server has tasks: rte, sst2, arc_easy"),
        ({"inputs": ["x"]}, 422, "field 'task': Field required"),
        ({"task": "sst2", "inputs": []}, 422, "field 'inputs': List should have at least 1 item"),
        ({"task": "sst2", "inputs": "x"}, 422, "field 'inputs': Input should be a valid list"),
        ({"task": "sst2", "inputs": ["x"], "extra": 1}, 422, "field 'extra': Extra inputs are not permitted"),
        ({"task": "arc_easy", "inputs": ["x"]}, 422, "inputs[0] must be an object for multiple_choice task"),
        ({"task": "arc_easy", "inputs": [{"text": "x"}]}, 422, 'takes {"query": str, "choices": [str, ...]}'),
        ({"task": "arc_easy", "inputs": [{"query": "q", "choices": [f"c{i}" for i in range(MAX_CHOICES + 1)]}]},
         422, f"inputs[0] has {MAX_CHOICES + 1} choices; at most {MAX_CHOICES} are accepted"),
        ({"task": "sst2", "inputs": [{"query": "q", "choices": ["a"]}]}, 422,
         'classification task \'sst2\' takes {"text"'),
        ({"task": "sst2", "inputs": [{"text": 3}]}, 422, "inputs[0].text must be a string, got int"),
        ({"task": "sst2", "inputs": ["ok", ""]}, 422, "inputs[1].text is empty: send some text"),
        ({"task": "sst2", "inputs": [{"text": " \n\t "}]}, 422, "inputs[0].text is empty"),
        ({"task": "rte", "inputs": [{"text": "a", "text_pair": "  "}]}, 422, "inputs[0].text_pair is empty"),
        ({"task": "arc_easy", "inputs": [{"query": "q", "choices": ["a", ""]}]}, 422, "inputs[0].choices[1] is empty"),
        ({"task": "sst2", "inputs": [{"text": "fine", "lable": 1}]}, 422,
         "inputs[0] has unknown field 'lable'; classification task 'sst2' takes text, text_pair"),
        ({"task": "arc_easy", "inputs": [{"query": "q", "choices": ["a", "b"], "gold": 0}]}, 422,
         "inputs[0] has unknown field 'gold'; multiple_choice task 'arc_easy' takes query, choices"),
        ({"task": "sst2", "inputs": [{"text": "fine", "text_pair": "dull"}]}, 422,
         "inputs[0].text_pair: task 'sst2' takes single texts (its data has no text_pair)"),
        ({"task": "sst2", "inputs": ["bad \ud800 text"]}, 422, "inputs[0].text is not valid Unicode (it holds a lone"),
        ({"task": "bad \ud800", "inputs": ["x"]}, 404, "unknown task 'bad \\ud800'; this server has tasks"),
        ({"task": "sst2", "inputs": ["x"] * 5}, 422, "5 inputs in one request; at most 4 (--max-batch-size)"),
    ]
    with serving(run, ServeOptions(max_batch_size=4)) as url, httpx.Client(base_url=url, timeout=60) as http:
        for body, status, message in cases:   # json.dumps: ASCII, so a lone surrogate travels as \ud800
            r = http.post("/v1/predict", content=json.dumps(body), headers={"content-type": "application/json"})
            assert r.status_code == status, (body, r.text)
            assert message in r.json()["error"]["message"], (message, r.text)
        r = http.post("/v1/predict", content=b'{"task": "sst2", "inputs": [',
                      headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["message"].startswith("malformed JSON body")
        raw = [  # bodies that fail before validation, and routes that do not exist: the same error shape
            ("POST", "/v1/predict", b'{"task": "sst2", "inputs": ["\xff\xfe"]}', 400,
             "the body is not a JSON object in UTF-8 (or nests too deeply)"),
            ("POST", "/v1/predict", b"[" * 100_000 + b"]" * 100_000, 400, "the body is not a JSON object in UTF-8"),
            ("GET", "/v1/nothing", b"", 404, "no endpoint /v1/nothing; see GET /v1/models, POST /v1/predict"),
            ("GET", "/v1/predict", b"", 405, "GET is not allowed on /v1/predict (allowed: POST)"),
        ]
        for method, path, content, status, message in raw:
            r = http.request(method, path, content=content, headers={"content-type": "application/json"})
            assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
            assert set(r.json()) == {"error"} and r.json()["error"]["message"].startswith(message), r.text
        r = http.post("/v1/completions", json={"model": "sst2", "prompt": "x"})
        assert r.status_code == 400 and "encoder model with task heads: use POST /v1/predict" in r.text
        assert http.post("/v1/predict", json=good).status_code == 200
        models = http.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == TASKS and models["data"][2]["kind"] == "multiple_choice"
        assert http.get("/health").json()["status"] == "ok"


class _Gated(torch.nn.Module):
    """The run's model behind a gate the test opens; raises on inputs holding the token ``boom_id``."""

    def __init__(self, inner: torch.nn.Module, boom_id: int) -> None:
        super().__init__()
        self.inner, self.boom_id = inner, boom_id
        self.gate, self.entered = threading.Event(), threading.Event()
        self.examples = 0   # examples that reached the model

    def forward(self, **kwargs):
        self.examples += len(kwargs["task_ids"])
        self.entered.set()
        assert self.gate.wait(30)
        if (kwargs["input_ids"] == self.boom_id).any():
            raise RuntimeError("boom")
        return self.inner(**kwargs)


def test_queue_full_timeout_and_a_failing_request(run, offline) -> None:
    boom = run.tokenizer.convert_tokens_to_ids("boom")
    gated = _Gated(run.model, boom)
    gated_run = replace(run, model=gated)
    i, x = _inputs(run, 1)[0]
    body = {"task": "sst2", "inputs": [x]}

    with serving(gated_run, ServeOptions(max_batch_size=1, max_queue=2, request_timeout_s=30)) as url:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(httpx.post, url + "/v1/predict", json=body, timeout=60)
            assert gated.entered.wait(30)                       # the worker holds request 1
            queued = [pool.submit(httpx.post, url + "/v1/predict", json=body, timeout=60) for _ in range(2)]
            deadline = time.monotonic() + 30
            while httpx.get(url + "/health").json()["queue_depth"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            r = httpx.post(url + "/v1/predict", json=body, timeout=60)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "the server is busy: 2 requests are queued (--max-queue)" in r.json()["error"]["message"]
            gated.gate.set()
            for f in [first, *queued]:
                assert f.result().json()["outputs"][0]["label"] == offline["sst2"][i]

    gated.gate.clear()
    gated.entered.clear()
    with serving(gated_run, ServeOptions(request_timeout_s=0.3)) as url:
        r = httpx.post(url + "/v1/predict", json=body, timeout=60)
        assert r.status_code == 504 and "no answer within 0.3 s" in r.json()["error"]["message"]
        gated.gate.set()

    with serving(gated_run, ServeOptions(max_batch_size=8, max_wait_ms=500)) as url:
        with ThreadPoolExecutor(2) as pool:
            bad = pool.submit(httpx.post, url + "/v1/predict", json={"task": "sst2", "inputs": ["boom"]}, timeout=60)
            ok = pool.submit(httpx.post, url + "/v1/predict", json=body, timeout=60)
            assert bad.result().status_code == 500
            assert bad.result().json()["error"]["message"] == "prediction failed: RuntimeError: boom"
            assert ok.result().status_code == 200 and ok.result().json()["outputs"][0]["label"] == offline["sst2"][i]
        assert httpx.post(url + "/v1/predict", json=body, timeout=60).status_code == 200   # the worker lives


def _wait_queue(http: httpx.Client, depth: int) -> None:
    deadline = time.monotonic() + 10
    while http.get("/health").json()["queue_depth"] != depth:
        assert time.monotonic() < deadline, f"queue_depth never became {depth}"
        time.sleep(0.02)


def test_abandoned_requests_leave_the_queue_and_never_run(run, offline) -> None:
    """Clients that disconnect, and requests that time out, free their place in the queue at once (no needless
    503) and never reach the model."""
    gated = _Gated(run.model, -1)
    gated_run = replace(run, model=gated)
    i, x = _inputs(run, 1)[0]
    body = {"task": "sst2", "inputs": [x]}

    def post(url: str, timeout: float = 60) -> httpx.Response:
        return httpx.post(url + "/v1/predict", json=body, timeout=timeout)

    with serving(gated_run, ServeOptions(max_batch_size=1, max_queue=2)) as url, httpx.Client(base_url=url) as http:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(post, url)
            assert gated.entered.wait(30)                        # the worker holds the first request
            gone = [pool.submit(post, url, 1.0) for _ in range(2)]   # these clients give up after 1 s
            for f in gone:
                with pytest.raises(httpx.ReadTimeout):
                    f.result()
            _wait_queue(http, 0)                                 # their places are free again
            fresh = [pool.submit(post, url) for _ in range(2)]
            _wait_queue(http, 2)
            gated.gate.set()
            for f in [first, *fresh]:
                assert f.result().status_code == 200 and f.result().json()["outputs"][0]["label"] == offline["sst2"][i]
    assert gated.examples == 3                                   # the two abandoned requests never ran

    gated.gate.clear()
    gated.entered.clear()
    gated.examples = 0
    with serving(gated_run, ServeOptions(max_batch_size=1, max_queue=1, request_timeout_s=0.5)) as url, \
            httpx.Client(base_url=url) as http:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, url)
            assert gated.entered.wait(30)
            late = post(url)                                     # queued behind the first, then timed out
            assert late.status_code == 504
            assert http.get("/health").json()["queue_depth"] == 0
            assert first.result().status_code == 504              # it runs on, but nobody waits for it
            gated.gate.set()
            assert post(url).status_code == 200
    assert gated.examples == 2                                   # the first and the last: the late one never ran


def _raw(port: int, head: bytes, wait_s: float = 10) -> tuple[bytes, float]:
    """Send ``head`` (request line, headers, part of a body) and read until the server closes: (reply, seconds)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(head)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply, time.monotonic() - t0


def test_a_stalled_body_gets_408_and_shutdown_is_bounded(run) -> None:
    """A client that never finishes its body is answered 408 after --body-timeout-s (and closed), and neither it nor
    a request stuck in the model holds a shutdown longer than --shutdown-timeout-s."""
    head = (b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n"
            b"\r\n{\"task\": ")
    gated = _Gated(run.model, -1)
    options = ServeOptions(body_timeout_s=0.5, shutdown_timeout_s=1.0)
    server = BackgroundServer(replace(run, model=gated), options)
    with server:
        port = int(server.url.rsplit(":", 1)[1])
        reply, seconds = _raw(port, head)
        assert reply.startswith(b"HTTP/1.1 408 ") and 0.4 < seconds < 5, (reply, seconds)
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["message"] == \
            "the request body did not arrive within 0.5 s (--body-timeout-s)"

        with ThreadPoolExecutor(2) as pool:
            stuck = pool.submit(httpx.post, server.url + "/v1/predict", json={"task": "sst2", "inputs": ["x"]},
                                timeout=30)
            assert gated.entered.wait(30)                        # one request in the model, which never returns
            stalled = pool.submit(_raw, port, head)              # one body that never ends
            time.sleep(0.2)
            server.server.should_exit = True
            t0 = time.monotonic()
            server.thread.join(timeout=15)
            stopped = time.monotonic() - t0
            gated.gate.set()
            assert not server.thread.is_alive() and stopped < 4, stopped
            assert stalled.result()[0].startswith(b"HTTP/1.1 408 ")
            with pytest.raises(httpx.HTTPError):
                stuck.result().raise_for_status()


class _SlowTokenizer:
    """The run's tokenizer, taking ``delay`` seconds more for a text over 1000 characters (as a large body does)."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay

    def __call__(self, *texts, **kwargs):
        if any(len(t) > 1000 for x in texts for t in ([x] if isinstance(x, str) else x or [])):
            time.sleep(self.delay)
        return self.inner(*texts, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __deepcopy__(self, memo: dict) -> _SlowTokenizer:
        return _SlowTokenizer(copy.deepcopy(self.inner, memo), self.delay)


def test_a_large_body_does_not_stall_the_server_and_the_size_limit_holds(run) -> None:
    """Tokenising a large input (made 1.5 s slower here) happens off the event loop: /health answers meanwhile
    (it used to wait for the whole tokenisation). A 300 kB input is served, truncated; a body over --max-body-bytes
    gets 413, announced (content-length) or not (chunked)."""
    big = "a gripping and funny film " * 40_000
    slow = replace(run, tokenizer=_SlowTokenizer(run.tokenizer, 1.5))
    with serving(slow) as url, httpx.Client(base_url=url, timeout=60) as http:
        with ThreadPoolExecutor(1) as pool:
            t0 = time.perf_counter()
            f = pool.submit(httpx.post, url + "/v1/predict", json={"task": "sst2", "inputs": [big[:2000]]},
                            timeout=60)
            waits = []
            while not f.done():
                t = time.perf_counter()
                assert http.get("/health").status_code == 200
                waits.append(time.perf_counter() - t)
                time.sleep(0.01)
            took = time.perf_counter() - t0
        assert took > 1.5 and len(waits) >= 5 and max(waits) < 0.5, (took, len(waits), max(waits))
        assert f.result().status_code == 200 and f.result().json()["outputs"][0]["truncated"] is True
    with serving(run) as url:   # the default limit, 1 MiB
        r = httpx.post(url + "/v1/predict", json={"task": "sst2", "inputs": [big[:300_000]]}, timeout=300)
        assert r.status_code == 200 and r.json()["outputs"][0]["truncated"] is True
    with serving(run, ServeOptions(max_body_bytes=1000)) as url:
        message = "the request body is over 1000 bytes (--max-body-bytes); send fewer or shorter inputs"
        for content in (b"x" * 1001, iter([b"x" * 600, b"x" * 600])):
            r = httpx.post(url + "/v1/predict", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["message"] == message, r.text
            assert r.headers["connection"] == "close"
        assert httpx.post(url + "/v1/predict", json={"task": "sst2", "inputs": ["fine"]}).status_code == 200


def test_an_unexpected_error_is_a_json_500_without_traceback(run, monkeypatch) -> None:
    import morelora.serve

    def broken(*args, **kwargs):
        raise ValueError("internal detail")

    monkeypatch.setattr(morelora.serve, "format_output", broken)
    with serving(run) as url:
        r = httpx.post(url + "/v1/predict", json={"task": "sst2", "inputs": ["fine"]}, timeout=60)
    assert r.status_code == 500 and r.json() == {"error": {
        "message": "internal server error (ValueError); the server log has the details", "type": "server_error",
        "param": None}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run_dir: Path, port: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "morelora", "serve", str(run_dir), "--port", str(port), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "server did not start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)


@pytest.mark.slow
def test_kill_9_restart_and_sigterm_drain(run, run_dir, offline) -> None:
    port = _free_port()
    proc = _start(run_dir, port)
    proc.kill()                                                  # kill -9: no clean-up at all
    proc.wait(timeout=30)
    proc = _start(run_dir, port, "--max-wait-ms", "3000", "--max-batch-size", "64")   # same port, serves again
    base = f"http://127.0.0.1:{port}"
    inputs = _inputs(run, 1)[:3]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(httpx.post, base + "/v1/predict", json={"task": "sst2", "inputs": [x]}, timeout=60)
                   for _, x in inputs]
        while httpx.get(base + "/health", timeout=10).json()["in_flight"] < 3:   # all 3 in the batching window
            assert not any(f.done() for f in futures)
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)                         # in the 3 s batching window
        answers = [f.result() for f in futures]
    assert proc.wait(timeout=60) == -signal.SIGTERM              # uvicorn re-raises the signal once drained
    for (i, _), r in zip(inputs, answers):
        assert r.status_code == 200 and r.json()["outputs"][0]["label"] == offline["sst2"][i]
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/health", timeout=2)
    log = proc.stdout.read()
    assert "Waiting for connections to close" in log and "Finished server process" in log
    assert "serving 3 tasks (more, encoder)" in log


def test_export_all_tasks_uniform_rank_loads_in_peft(run, run_dir, tiny_bert, tmp_path, capsys) -> None:
    import transformers
    from peft import PeftModel

    out = tmp_path / "adapters"
    assert main(["export", str(run_dir), "--all-tasks", "--uniform-rank", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(TASKS)
    assert capsys.readouterr().out.count("as a PEFT LoRA adapter") == 3
    for t, task in enumerate(TASKS):
        cfg = json.loads((out / task / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and not cfg["rank_pattern"] and not cfg["alpha_pattern"]
        meta = json.loads((out / task / "morelora_task.json").read_text())
        config = transformers.AutoConfig.from_pretrained(tiny_bert)
        for k, v in meta["config_updates"].items():
            setattr(config, k, v)
        base = getattr(transformers, meta["auto_class"]).from_pretrained(tiny_bert, config=config)
        peft_model = PeftModel.from_pretrained(base, out / task).eval()
        examples = run.data[t]["test"][:3]
        batch = make_collator(run)([(t, ex) for ex in examples])
        with torch.no_grad():
            want = run.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            if task != "arc_easy":
                inputs = {k: v[:, 0] for k, v in inputs.items()}
            got = peft_model(**inputs).logits
        torch.testing.assert_close(got, want[:, :got.shape[1]], atol=1e-4, rtol=1e-4)


def test_export_carries_the_runs_max_length(run, run_dir, tiny_bert, tmp_path) -> None:
    """The exported tokenizer cuts where the run cut (model_max_length = model.max_length, not the base's 512), so
    the README's plain-PEFT call (truncation=True) gives the run's logits on inputs longer than that too."""
    import transformers
    from peft import PeftModel

    out = tmp_path / "rte"
    assert main(["export", str(run_dir), "--task", "rte", "--out", str(out)]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.model_max_length == MAX_LENGTH
    updates = json.loads((out / "morelora_task.json").read_text())["config_updates"]
    updates["id2label"] = {int(i): word for i, word in updates["id2label"].items()}
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert, **updates)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    examples = [x for _, x in _inputs(run, 0) if _cut(run, x)][:4]
    assert len(examples) == 4
    batch = make_collator(run)([(0, {**x, "label": 0}) for x in examples])
    batch.pop("labels")
    with torch.no_grad():
        want = run.model(**batch).logits
        got = peft_model(**tokenizer([x["text"] for x in examples], [x["text_pair"] for x in examples],
                                     return_tensors="pt", padding=True, truncation=True)).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_uniform_rank_export_of_a_causal_lm_matches_more(tmp_path) -> None:
    """The engine-neutral form on a LLaMA: rank r everywhere, outputs of plain PEFT equal MoRE's per task."""
    from _tiny import ids, tiny_llama
    from peft import PeftModel
    from test_more import shuffle_router

    from morelora import MoREConfig, get_more_model

    fresh = tiny_llama()
    m = get_more_model(copy.deepcopy(fresh), MoREConfig(r=8, lora_alpha=16, tasks=["a", "b", "c"],
                                                         init_lora_weights=False, lora_dropout=0.0)).eval()
    shuffle_router(m)
    x = ids(2, 7)
    for task in ("a", "b", "c"):
        m.export_lora(task, tmp_path / task, uniform_rank=True)
        cfg = json.loads((tmp_path / task / "adapter_config.json").read_text())
        assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and not cfg["rank_pattern"] and not cfg["alpha_pattern"]
        peft_model = PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / task).eval()
        shapes = {mod.lora_A["default"].weight.shape[0] for mod in peft_model.modules() if hasattr(mod, "lora_A")
                  and "default" in mod.lora_A}
        assert shapes == {8}
        with torch.no_grad():
            torch.testing.assert_close(peft_model(input_ids=x).logits, m(input_ids=x, task_ids=[task] * 2).logits,
                                       atol=1e-4, rtol=1e-4)
    assert min(k for ranks in m.task_ranks().values() for k in ranks.values()) < 8   # padding was exercised


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, tiny_llama):
    """A LLaMA run (text-to-text through the causal LM) on a pair, a single-text and a choice task."""
    from conftest import tiny_run_config

    cfg = tiny_run_config(tiny_llama, tmp_path_factory.mktemp("serve_causal") / "run", max_steps=2, save_steps=0)
    cfg["method"]["target_modules"] = ["q_proj", "v_proj"]
    cfg["data"]["max_eval_per_task"] = 8
    cfg["model"]["max_length"] = 40   # 31 prompt tokens: long prompts are cut at their beginning
    return train(RunConfig.from_dict(cfg))


def test_completions_on_a_causal_run_give_the_offline_generations(causal_run) -> None:
    """OpenAI-form completions mixed with /v1/predict requests of other tasks: each text is the greedy generation of
    its prompt run alone, and it maps to the prediction in test_predictions.json."""
    from morelora.metrics import predictions_from_text
    from morelora.training.evaluate import predict_batch

    run = load_run(causal_run)
    assert run.kind == "causal"
    offline = {t: v["predictions"] for t, v in
               json.loads((causal_run / "test_predictions.json").read_text())["tasks"].items()}
    sst2, rte = TASKS.index("sst2"), TASKS.index("rte")
    prompts = [(i, x["text"]) for i, x in _inputs(run, sst2)]
    pairs = _inputs(run, rte)
    assert len(prompts) >= 6 and len(pairs) >= 4
    collator = make_collator(run, train=False)

    def alone(t: int, ex: dict) -> tuple:
        with torch.no_grad():
            return predict_batch(run, run.model, collator, [(t, ex)])[0]

    def completion(url: str, batch: list[tuple[int, str]]) -> dict:
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post("/v1/completions", json={"model": "sst2", "prompt": [p for _, p in batch],
                                                   "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()

    def predict(url: str, i: int, x: dict) -> dict:
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post("/v1/predict", json={"task": "rte", "inputs": [x]})
            assert r.status_code == 200, r.text
            return r.json()

    with serving(run, ServeOptions(max_batch_size=8, max_wait_ms=30)) as url:
        with ThreadPoolExecutor(4) as ex:
            comp = [(b, ex.submit(completion, url, b)) for b in (prompts[0:1], prompts[1:3], prompts[3:6])]
            pred = [(i, x, ex.submit(predict, url, i, x)) for i, x in pairs[:4]]
            comp = [(b, f.result()) for b, f in comp]
            pred = [(i, x, f.result()) for i, x, f in pred]
        with httpx.Client(base_url=url, timeout=60) as http:
            refused = http.post("/v1/completions", json={"model": "arc_easy", "prompt": "x"})
            streamed = http.post("/v1/completions", json={"model": "sst2", "prompt": "x", "stream": True})
    assert refused.status_code == 400 and "multiple choice: send the query and choices to POST /v1/predict" \
        in refused.json()["error"]["message"]
    assert streamed.status_code == 400 and "only stream=false and n=1" in streamed.json()["error"]["message"]
    spec = run.specs[sst2]
    for batch, body in comp:
        assert body["object"] == "text_completion" and body["model"] == "sst2"
        assert [c["index"] for c in body["choices"]] == list(range(len(batch)))
        made = 0
        for (i, prompt), choice in zip(batch, body["choices"]):
            prediction, text = alone(sst2, {"text": prompt})
            assert choice["text"] == text and choice["finish_reason"] == "stop"
            assert predictions_from_text(spec, [text], [{"text": prompt}]) == [prediction] == [offline["sst2"][i]]
            made += len(run.tokenizer(text, add_special_tokens=False)["input_ids"])
        used = sum(len(run.tokenizer(p)["input_ids"]) for _, p in batch)
        assert body["usage"] == {"prompt_tokens": used, "completion_tokens": made, "total_tokens": used + made}
    def cut(t: int, x: dict) -> bool:   # the prompt has more tokens than max_length leaves it (40 - 8 - 1)
        prompt, _ = collator.texts((t, {**x, "label": 0}))
        return len(run.tokenizer(prompt)["input_ids"]) > 31

    for batch, body in comp:
        assert [c["truncated"] for c in body["choices"]] == [cut(sst2, {"text": p}) for _, p in batch]
    for i, x, body in pred:
        prediction, text = alone(rte, x)
        assert body["outputs"] == [{"prediction": prediction, "text": text, "truncated": cut(rte, x)}]
        assert prediction == offline["rte"][i]
    assert all(cut(rte, x) for i, x, _ in pred)   # long prompts too give the offline answer


def test_causal_generations_do_not_depend_on_the_batch(causal_run) -> None:
    """Prompts of two tasks in one left-padded generate call: each text equals its prompt generated alone."""
    run = load_run(causal_run)
    metrics = _Metrics()
    sst2, rte = TASKS.index("sst2"), TASKS.index("rte")
    mine = [(sst2, x) for _, x in _inputs(run, sst2)[:3]] + [(rte, x) for _, x in _inputs(run, rte)[:3]]
    results = _queued_then_run(run, [[f] for f in mine], metrics)
    assert metrics.batch_size._sum.get() == 6 and metrics.batch_tasks._sum.get() == 2   # one batch, 2 tasks
    lengths = {len(run.tokenizer(x["text"], x.get("text_pair"))["input_ids"]) for _, x in mine}
    assert len(lengths) > 1   # the prompts were padded to one length
    collator = make_collator(run, train=False)
    from morelora.training.evaluate import predict_batch

    for (t, x), [(prediction, text)] in zip(mine, results):
        with torch.no_grad():
            assert predict_batch(run, run.model, collator, [(t, x)])[0] == (prediction, text)


def test_a_request_builds_the_collator_once(run, monkeypatch) -> None:
    """parse_inputs asks one collator about every input of a request (it used to build one per input); the
    truncation flags are those of the independent token count."""
    import importlib

    from morelora.serve import parse_inputs

    evaluate = importlib.import_module("morelora.training.evaluate")   # the package's `evaluate` is the function

    built = []
    real = evaluate.make_collator
    monkeypatch.setattr(evaluate, "make_collator", lambda *a, **k: built.append(1) or real(*a, **k))
    t = TASKS.index("rte")
    inputs = [x for _, x in _inputs(run, t)]
    parsed = parse_inputs(run, t, inputs)
    assert len(built) == 1 and len(inputs) == 16
    assert [cut for _, cut in parsed] == [_cut(run, x) for x in inputs]


def test_evaluation_batches_by_length_and_answers_in_file_order(run, monkeypatch) -> None:
    """`evaluate` groups examples of similar length (longest first) and returns each example's prediction at its
    own index: equal to the example scored alone, in the data's order."""
    import importlib

    from morelora.training.evaluate import evaluate, text_length

    module = importlib.import_module("morelora.training.evaluate")
    batches: list[list[int]] = []
    real = module.predict_batch
    monkeypatch.setattr(module, "predict_batch", lambda r, m, c, features, *a: batches.append(
        [text_length(ex) for _, ex in features]) or real(r, m, c, features, *a))
    result = evaluate(run, "test", batch_size=4, keep_predictions=True)
    for t, task in enumerate(TASKS):
        alone = [int(_alone(run, t, x).argmax()) for _, x in _inputs(run, t)]
        assert result["predictions"][task]["predictions"] == alone, task
    lengths = [n for b in batches for n in b]
    assert len(batches) == 12 and len(lengths) == 48
    for t in range(3):   # within each task: non-increasing lengths across its 4 batches
        task_lengths = lengths[16 * t:16 * (t + 1)]
        assert task_lengths == sorted(task_lengths, reverse=True)
        assert task_lengths != [text_length(x) for _, x in _inputs(run, t)]   # the file order is not sorted
