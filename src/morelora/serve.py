"""Serve every task of a run from one model: ``morelora serve RUN_DIR`` (FastAPI + uvicorn).

Requests of any task share one queue. A single worker takes up to ``max_batch_size`` examples from it
(waiting at most ``max_wait_ms`` for more after the first), runs them as ONE forward pass with per-example
task ids (MoRE's mixed batch: one pair of matmuls per layer whatever the mix) and answers each request with
its own rows. Predictions come from :func:`morelora.training.evaluate.predict_batch`, the code that writes
``test_predictions.json``, so a served answer is the offline prediction for the same input.

* ``POST /v1/predict`` ``{"task": T, "inputs": [...]}``: inputs in the task files' formats (classification /
  regression ``{"text", "text_pair"?}`` or a plain string, multiple choice ``{"query", "choices"}``,
  text-to-text ``{"input"}`` or a plain string).
* ``POST /v1/completions``: OpenAI's completions form with ``model`` = the task, for causal / seq2seq runs.
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus).

A full queue answers 503 with ``Retry-After``; a request not answered within ``request_timeout_s`` gets
504. A batch that raises is re-run request by request, so only the request at fault gets an error. On
SIGTERM uvicorn stops accepting connections and waits for the requests in flight; the worker answers them
before it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from morelora.errors import MoreLoraError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from morelora.training.build import Run

__all__ = ["MAX_CHOICES", "BackgroundServer", "Batcher", "ServeOptions", "create_app", "parse_inputs"]

#: Most choices a multiple-choice input may have (text-to-text prompts label the options A) to Z)).
MAX_CHOICES = 26


class RequestError(MoreLoraError):
    """A request the server refuses; ``status`` is the HTTP status, ``param`` the field at fault."""

    def __init__(self, message: str, status: int = 422, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers or {}


@dataclass
class ServeOptions:
    """Batching and admission limits of one server."""

    max_batch_size: int = 32       # examples per forward pass; also the most inputs one request may hold
    max_wait_ms: float = 5.0       # after the first request, how long the worker waits for more
    max_queue: int = 256           # requests waiting; beyond: 503 with Retry-After
    request_timeout_s: float = 60.0  # a request not answered in time gets 504

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise MoreLoraError("max_batch_size and max_queue must be at least 1")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise MoreLoraError("max_wait_ms must be >= 0 and request_timeout_s > 0")


# ------------------------------------------------------------------------------------------------ inputs


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{where}.{field} must be a string, got {type(value).__name__}", param=field)
    return value


def parse_inputs(run: Run, task: int, inputs: list[Any], param: str = "inputs") -> list[dict]:
    """Validate a request's inputs for task ``task`` and return them as examples in the task-file format.

    Raises :class:`RequestError` naming the input and field at fault: wrong type for the task's kind, too
    many choices (:data:`MAX_CHOICES`), or more tokens than the model reads (``model.max_length``; offline
    evaluation would cut such an input, the server says so instead of answering for a cut input).
    """
    spec = run.specs[task]
    examples = []
    for i, raw in enumerate(inputs):
        where = f"{param}[{i}]"
        if spec.kind in ("classification", "regression", "text2text") and isinstance(raw, str):
            raw = {"input" if spec.kind == "text2text" else "text": raw}
        if not isinstance(raw, dict):
            raise RequestError(f"{where} must be an object for {spec.kind} task {spec.name!r}, got "
                               f"{type(raw).__name__}", param=param)
        if spec.kind == "multiple_choice":
            if "query" not in raw or "choices" not in raw:
                raise RequestError(f"{where}: multiple-choice task {spec.name!r} takes "
                                   '{"query": str, "choices": [str, ...]}', param=param)
            choices = raw["choices"]
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                raise RequestError(f"{where}.choices must be a non-empty list of strings", param=param)
            if len(choices) > MAX_CHOICES:
                raise RequestError(f"{where} has {len(choices)} choices; at most {MAX_CHOICES} are accepted",
                                   param=param)
            ex = {"query": _text(raw["query"], where, "query"), "choices": list(choices)}
        elif spec.kind == "text2text":
            if "input" not in raw:
                raise RequestError(f'{where}: text-to-text task {spec.name!r} takes {{"input": str}} or a string',
                                   param=param)
            ex = {"input": _text(raw["input"], where, "input")}
        else:
            if "text" not in raw:
                raise RequestError(f'{where}: {spec.kind} task {spec.name!r} takes {{"text": str, '
                                   '"text_pair": str (optional)}} or a string', param=param)
            ex = {"text": _text(raw["text"], where, "text")}
            if raw.get("text_pair") is not None:
                ex["text_pair"] = _text(raw["text_pair"], where, "text_pair")
        _check_length(run, task, ex, where, param)
        examples.append(ex)
    return examples


def _check_length(run: Run, task: int, ex: dict, where: str, param: str) -> None:
    m, tok = run.cfg.model, run.tokenizer
    if run.kind == "encoder":
        if m.encoding == "siamese":
            seqs = [(t, None) for t in [ex.get("query", ex.get("text")), *ex.get("choices", []),
                                        *([ex["text_pair"]] if "text_pair" in ex else [])]]
        elif "choices" in ex:
            seqs = [(ex["query"], c) for c in ex["choices"]]
        else:
            seqs = [(ex["text"], ex.get("text_pair"))]
        limit = m.max_length
        longest = max(len(tok(a, b)["input_ids"]) for a, b in seqs)
    else:
        from morelora.data.collate import to_text2text
        from morelora.training.evaluate import with_placeholder_label

        prompt, _ = to_text2text(run.specs[task], with_placeholder_label(run.specs[task], ex))
        limit = m.max_length - (m.max_target_length + 1 if run.kind == "causal" else 0)
        longest = len(tok(prompt + (" answer:" if run.kind == "causal" else ""))["input_ids"])
    if longest > limit:
        raise RequestError(f"{where} is {longest} tokens long; this model reads at most {limit} "
                           "(model.max_length of the run): shorten it", param=param)


def format_output(run: Run, task: int, prediction: Any, output: Any) -> dict[str, Any]:
    """The JSON answer for one input: label + probabilities, choice + scores, value, or generated text."""
    spec = run.specs[task]
    if run.kind != "encoder":
        return {"prediction": prediction, "text": output}
    if spec.kind == "regression":
        return {"value": float(prediction)}
    if spec.kind == "multiple_choice":
        return {"choice": int(prediction), "scores": output.tolist()}
    answer: dict[str, Any] = {"label": int(prediction), "probabilities": torch.softmax(output, -1).tolist()}
    if spec.label_words:
        answer["label_name"] = spec.label_words[int(prediction)]
    return answer


class PredictRequest(BaseModel):
    """``POST /v1/predict``: a task and its inputs (unknown fields are refused)."""

    model_config = ConfigDict(extra="forbid")
    task: str
    inputs: list[Any] = Field(min_length=1)


class CompletionRequest(BaseModel):
    """``POST /v1/completions`` (OpenAI's form); decoding is greedy, as in evaluation."""

    model_config = ConfigDict(extra="ignore")   # OpenAI clients send sampling fields we do not use
    model: str
    prompt: str | list[str]
    stream: bool = False
    n: int = 1


# ---------------------------------------------------------------------------------------------- batching


@dataclass
class _Request:
    features: list[tuple[int, dict]]
    future: asyncio.Future


class Batcher:
    """One bounded queue for all tasks and one worker running mixed-task forward passes in a thread."""

    def __init__(self, run: Run, options: ServeOptions, metrics: _Metrics | None = None) -> None:
        self.run, self.options, self.metrics = run, options, metrics
        self.queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=options.max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="morelora-model")
        self._worker: asyncio.Task | None = None
        self._held: _Request | None = None   # taken from the queue but did not fit the last batch
        self._busy = False                    # a batch is running
        self.in_flight = 0                    # requests submitted and not answered yet
        from morelora.training.evaluate import make_collator

        self.collator = make_collator(run, train=False)
        self.device = next(run.model.parameters()).device
        run.model.eval()

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        """Answer everything queued, then stop the worker."""
        while not self.queue.empty() or self._held is not None or self._busy:
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=True)

    async def submit(self, features: list[tuple[int, dict]]) -> list[tuple[Any, Any]]:
        """Queue one request; its ``(prediction, output)`` per input once its batch has run."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Request(features, future))
        except asyncio.QueueFull:
            raise RequestError(f"the server is busy: {self.options.max_queue} requests are queued "
                               "(--max-queue); retry shortly", status=503, headers={"Retry-After": "1"}) from None
        self._gauge()
        self.in_flight += 1
        try:
            return await asyncio.wait_for(future, self.options.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(f"no answer within {self.options.request_timeout_s:g} s (the server's request "
                               "timeout); retry or lower the load", status=504) from None
        finally:
            self.in_flight -= 1

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queue.qsize())

    async def _next_batch(self) -> list[_Request]:
        first = self._held or await self.queue.get()
        self._held = None
        batch, size = [first], len(first.features)
        deadline = time.monotonic() + self.options.max_wait_ms / 1000
        while size < self.options.max_batch_size:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if size + len(item.features) > self.options.max_batch_size:
                self._held = item
                break
            batch.append(item)
            size += len(item.features)
        self._gauge()
        return [r for r in batch if not r.future.done()]   # timed-out requests are not run

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self._busy = True
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, batch)
            finally:
                self._busy = False
            for request, result in zip(batch, results):
                if request.future.done():
                    continue
                if isinstance(result, BaseException):
                    request.future.set_exception(result)
                else:
                    request.future.set_result(result)

    def _run_batch(self, batch: list[_Request]) -> list[list[tuple[Any, Any]] | BaseException]:
        """All requests in one forward pass; if it raises, each request alone (only the faulty one fails)."""
        features = [f for r in batch for f in r.features]
        t0 = time.perf_counter()
        try:
            out = self._predict(features)
        except Exception as e:  # noqa: BLE001 - a bad batch must not take the worker down
            if len(batch) == 1:
                return [RequestError(f"prediction failed: {type(e).__name__}: {e}", status=500)]
            return [r for request in batch for r in self._run_batch([request])]
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(features))
            self.metrics.batch_tasks.observe(len({t for t, _ in features}))
            self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        results, start = [], 0
        for request in batch:
            results.append(out[start:start + len(request.features)])
            start += len(request.features)
        return results

    def _predict(self, features: list[tuple[int, dict]]) -> list[tuple[Any, Any]]:
        from morelora.training.evaluate import predict_batch

        with torch.no_grad():
            return predict_batch(self.run, self.run.model, self.collator, features, self.device)


# ----------------------------------------------------------------------------------------------- metrics


class _Metrics:
    """Prometheus metrics in a registry of their own (several servers may live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("morelora_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("morelora_request_latency_seconds", "time from arrival to answer", ["endpoint"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.batch_size = Histogram("morelora_batch_size", "examples per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_tasks = Histogram("morelora_batch_tasks", "distinct tasks per forward pass",
                                     buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.batch_seconds = Histogram("morelora_batch_seconds", "time of one forward pass (or generation)",
                                       registry=r)
        self.queue_depth = Gauge("morelora_queue_depth", "requests waiting for the worker", registry=r)


# --------------------------------------------------------------------------------------------------- app


def create_app(run: Run, options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI app serving every task of ``run`` (its model must accept per-example ``task_ids``)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    options = options or ServeOptions()
    metrics = _Metrics()
    tasks = run.task_names
    state: dict[str, Batcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = Batcher(run, options, metrics)
        batcher.start()
        state["batcher"] = batcher
        yield
        await batcher.stop()

    app = FastAPI(title="morelora", lifespan=lifespan)

    def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
        kind = {404: "not_found_error", 503: "overloaded_error", 504: "timeout_error", 500: "server_error"}
        body = {"error": {"message": message, "type": kind.get(status, "invalid_request_error"), "param": param}}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            reason = first.get("ctx", {}).get("error", "invalid JSON")
            return error(422, f"malformed JSON body ({reason}); send a JSON object")
        field = ".".join(str(p) for p in first["loc"][1:]) or "body"
        return error(422, f"field {field!r}: {first['msg']}", param=field)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, str(exc), exc.param, exc.headers)

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Any:
        t0 = time.perf_counter()
        response = await call_next(request)
        endpoint = request.url.path
        if endpoint != "/metrics":
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    def task_index(name: str, param: str) -> int:
        if name not in tasks:
            raise RequestError(f"unknown task {name!r}; this server has tasks: {', '.join(tasks)}", status=404,
                               param=param)
        return tasks.index(name)

    @app.post("/v1/predict")
    async def predict(body: PredictRequest) -> dict[str, Any]:
        t = task_index(body.task, "task")
        if len(body.inputs) > options.max_batch_size:
            raise RequestError(f"{len(body.inputs)} inputs in one request; at most {options.max_batch_size} "
                               "(--max-batch-size): split the request", param="inputs")
        examples = parse_inputs(run, t, body.inputs)
        answers = await state["batcher"].submit([(t, ex) for ex in examples])
        return {"task": body.task, "outputs": [format_output(run, t, p, o) for p, o in answers]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict[str, Any]:
        if run.kind == "encoder":
            raise RequestError("this run is an encoder model with task heads: use POST /v1/predict", status=400)
        t = task_index(body.model, "model")
        if body.stream or body.n != 1:
            raise RequestError("only stream=false and n=1 are supported (greedy decoding, as in evaluation)",
                               status=400, param="stream" if body.stream else "n")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise RequestError("field 'prompt' is an empty list", param="prompt")
        if len(prompts) > options.max_batch_size:
            raise RequestError(f"{len(prompts)} prompts in one request; at most {options.max_batch_size}",
                               param="prompt")
        if run.specs[t].kind == "multiple_choice":
            raise RequestError(f"task {body.model!r} is multiple choice: send the query and choices to "
                               "POST /v1/predict", status=400, param="model")
        examples = parse_inputs(run, t, prompts, param="prompt")
        answers = await state["batcher"].submit([(t, ex) for ex in examples])
        tok = run.tokenizer
        used = sum(len(tok(p)["input_ids"]) for p in prompts)
        made = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for _, o in answers)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model,
                "choices": [{"index": i, "text": o, "logprobs": None, "finish_reason": "stop"}
                            for i, (_, o) in enumerate(answers)],
                "usage": {"prompt_tokens": used, "completion_tokens": made, "total_tokens": used + made}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": s.name, "object": "model", "created": 0, "owned_by": "morelora",
                                            "kind": s.kind} for s in run.specs]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        batcher = state.get("batcher")
        return {"status": "ok", "method": run.cfg.method_name, "kind": run.kind, "tasks": tasks,
                "queue_depth": batcher.queue.qsize() if batcher else 0,
                "in_flight": batcher.in_flight if batcher else 0}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# --------------------------------------------------------------------------------------------- running


def serve(run: Run, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None) -> None:
    """Serve ``run`` until SIGINT / SIGTERM (which drain the requests in flight)."""
    import uvicorn

    uvicorn.run(create_app(run, options), host=host, port=port, log_level="info", timeout_graceful_shutdown=None)


class BackgroundServer:
    """A uvicorn server on 127.0.0.1 and a free port, in a thread (tests and the load benchmark)."""

    def __init__(self, run: Run, options: ServeOptions | None = None) -> None:
        import uvicorn

        config = uvicorn.Config(create_app(run, options), host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise MoreLoraError("the background server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@contextlib.contextmanager
def serving(run: Run, options: ServeOptions | None = None) -> Iterator[str]:
    """``with serving(run) as url: ...``: a background server's base URL."""
    with BackgroundServer(run, options) as server:
        yield server.url
