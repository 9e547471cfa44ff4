"""`morelora serve`: answers equal the offline predictions under concurrent mixed-task load, bad input,
queue full / timeouts / failing batches, SIGTERM drain and kill -9 + restart; `morelora export --all-tasks`."""

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
from morelora.serve import MAX_CHOICES, Batcher, ServeOptions, _Metrics, serving
from morelora.training import load_run, train
from morelora.training.evaluate import make_collator

TASKS = ["rte", "sst2", "arc_easy"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_bert) -> Path:
    from conftest import tiny_run_config

    cfg = tiny_run_config(tiny_bert, tmp_path_factory.mktemp("serve") / "run", max_steps=2, save_steps=0)
    cfg["model"]["max_length"] = 128
    return train(RunConfig.from_dict(cfg))


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir)


@pytest.fixture(scope="module")
def offline(run_dir) -> dict[str, list]:
    tasks = json.loads((run_dir / "test_predictions.json").read_text())["tasks"]
    return {t: v["predictions"] for t, v in tasks.items()}


def _fits(run, t: int, ex: dict) -> bool:
    """Inputs the server accepts: not cut by max_length (offline evaluation cuts longer ones)."""
    tok, limit = run.tokenizer, run.cfg.model.max_length
    pairs = [(ex["query"], c) for c in ex["choices"]] if "choices" in ex else [(ex["text"], ex.get("text_pair"))]
    return max(len(tok(a, b)["input_ids"]) for a, b in pairs) <= limit


def _inputs(run, t: int) -> list[tuple[int, dict]]:
    """(index in the test split, input without its label) of the test examples that fit."""
    drop = {"label", "gold"}
    return [(i, {k: v for k, v in ex.items() if k not in drop}) for i, ex in enumerate(run.data[t]["test"])
            if _fits(run, t, ex)]


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
    long = " ".join(["word"] * 200)
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
        ({"task": "sst2", "inputs": ["ok", long]}, 422, "inputs[1] is 202 tokens long; this model reads at most 128"),
        ({"task": "sst2", "inputs": ["x"] * 5}, 422, "5 inputs in one request; at most 4 (--max-batch-size)"),
    ]
    with serving(run, ServeOptions(max_batch_size=4)) as url, httpx.Client(base_url=url, timeout=60) as http:
        for body, status, message in cases:
            r = http.post("/v1/predict", json=body)
            assert r.status_code == status, (body, r.text)
            assert message in r.json()["error"]["message"], (message, r.text)
        r = http.post("/v1/predict", content=b'{"task": "sst2", "inputs": [',
                      headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["message"].startswith("malformed JSON body")
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

    def forward(self, **kwargs):
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


def _accepted(run, t: int) -> list[tuple[int, dict]]:
    """``_inputs`` cut to those the server takes whole (a causal prompt leaves room for the template and answer)."""
    from morelora.serve import RequestError, parse_inputs

    def takes(x: dict) -> bool:
        try:
            return bool(parse_inputs(run, t, [x]))
        except RequestError:
            return False

    return [(i, x) for i, x in _inputs(run, t) if takes(x)]


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, tiny_llama):
    """A LLaMA run (text-to-text through the causal LM) on a pair, a single-text and a choice task."""
    from conftest import tiny_run_config

    cfg = tiny_run_config(tiny_llama, tmp_path_factory.mktemp("serve_causal") / "run", max_steps=2, save_steps=0)
    cfg["method"]["target_modules"] = ["q_proj", "v_proj"]
    cfg["data"]["max_eval_per_task"] = 8
    cfg["model"]["max_length"] = 128
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
    prompts = [(i, x["text"]) for i, x in _accepted(run, sst2)]
    pairs = _accepted(run, rte)
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
    for i, x, body in pred:
        prediction, text = alone(rte, x)
        assert body["outputs"] == [{"prediction": prediction, "text": text}]
        assert prediction == offline["rte"][i]


def test_causal_generations_do_not_depend_on_the_batch(causal_run) -> None:
    """Prompts of two tasks in one left-padded generate call: each text equals its prompt generated alone."""
    run = load_run(causal_run)
    metrics = _Metrics()
    sst2, rte = TASKS.index("sst2"), TASKS.index("rte")
    mine = [(sst2, x) for _, x in _accepted(run, sst2)[:3]] + [(rte, x) for _, x in _accepted(run, rte)[:3]]
    results = _queued_then_run(run, [[f] for f in mine], metrics)
    assert metrics.batch_size._sum.get() == 6 and metrics.batch_tasks._sum.get() == 2   # one batch, 2 tasks
    lengths = {len(run.tokenizer(x["text"], x.get("text_pair"))["input_ids"]) for _, x in mine}
    assert len(lengths) > 1   # the prompts were padded to one length
    collator = make_collator(run, train=False)
    from morelora.training.evaluate import predict_batch

    for (t, x), [(prediction, text)] in zip(mine, results):
        with torch.no_grad():
            assert predict_batch(run, run.model, collator, [(t, x)])[0] == (prediction, text)
