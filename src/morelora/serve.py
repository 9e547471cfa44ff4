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

Limits: a body over ``max_body_bytes`` gets 413, a body not received within ``body_timeout_s`` 408 (a slow or
stalled client holds nothing for long); inputs are validated and tokenised in a thread of their own, off the
event loop, so a large body never stalls ``/health`` or other clients. An input longer than ``model.max_length``
is truncated exactly as evaluation truncates it and its answer says ``"truncated": true``. A full queue answers
503 with ``Retry-After``; a request not answered within ``request_timeout_s`` gets 504. Requests whose client
disconnected or timed out leave the queue at once: they never run and never count against ``max_queue``. A
batch that raises is re-run request by request, so only the request at fault gets an error. Every error is
``{"error": {"message", "type", "param"}}`` (no traceback). On SIGTERM uvicorn stops accepting connections
and waits for the requests in flight, at most ``shutdown_timeout_s``; the worker answers them before it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from morelora.errors import MoreLoraError

if TYPE_CHECKING:
    from morelora.training.build import Run

__all__ = ["MAX_CHOICES", "BackgroundServer", "Batcher", "BodyGuard", "ServeOptions", "create_app", "is_truncated",
           "pair_tasks", "parse_inputs"]

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
    """Batching, admission and time limits of one server."""

    max_batch_size: int = 32       # examples per forward pass; also the most inputs one request may hold
    max_wait_ms: float = 5.0       # after the first request, how long the worker waits for more
    max_queue: int = 256           # requests waiting; beyond: 503 with Retry-After
    request_timeout_s: float = 60.0  # a request not answered in time gets 504
    max_body_bytes: int = 1 << 20  # a larger request body gets 413
    body_timeout_s: float = 10.0   # a body not received in full within this time gets 408
    shutdown_timeout_s: float = 30.0  # on SIGTERM, the longest wait for requests in flight

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_body_bytes < 1:
            raise MoreLoraError("max_batch_size, max_queue and max_body_bytes must be at least 1")
        if self.max_wait_ms < 0 or min(self.request_timeout_s, self.body_timeout_s, self.shutdown_timeout_s) <= 0:
            raise MoreLoraError("max_wait_ms must be >= 0; request_timeout_s, body_timeout_s and shutdown_timeout_s "
                                "> 0")


# ------------------------------------------------------------------------------------------------ inputs


#: The fields an input of each task kind may have.
_FIELDS = {"classification": ("text", "text_pair"), "regression": ("text", "text_pair"),
           "multiple_choice": ("query", "choices"), "text2text": ("input",)}


def _text(value: Any, where: str, field: str, param: str) -> str:
    """``value`` if it is a non-blank string the tokenizer can read, else a 422 naming ``where.field``."""
    if not isinstance(value, str):
        raise RequestError(f"{where}.{field} must be a string, got {type(value).__name__}", param=param)
    if not value.strip():
        raise RequestError(f"{where}.{field} is empty: send some text", param=param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{where}.{field} is not valid Unicode (it holds a lone surrogate such as \\ud800)",
                           param=param) from None
    return value


def pair_tasks(run: Run) -> set[int]:
    """The tasks that take a ``text_pair``: those whose data has one (all tasks if the run has no data loaded)."""
    out = set()
    for t, spec in enumerate(run.specs):
        examples = [ex for split in (run.data[t] if t < len(run.data) else {}).values() for ex in split]
        if spec.kind in ("classification", "regression") and (
                not examples or any(ex.get("text_pair") is not None for ex in examples)):
            out.add(t)
    return out


def parse_inputs(run: Run, task: int, inputs: list[Any], param: str = "inputs", tokenizer: Any = None,
                 pairs: set[int] | None = None) -> list[tuple[dict, bool]]:
    """Validate a request's inputs for task ``task``: ``(example in the task-file format, truncated)`` per input.

    Raises :class:`RequestError` (422) naming the input and field at fault: wrong type for the task's kind, an
    unknown field, blank text, a ``text_pair`` for a task without pairs (``pairs``: :func:`pair_tasks`), too
    many choices (:data:`MAX_CHOICES`). ``truncated``: the input is longer than the model reads
    (``model.max_length``); the collator cuts it exactly as in offline evaluation. ``tokenizer`` (default the
    run's) counts the tokens; the server passes a copy of its own, used by one thread only.
    """
    from morelora.training.evaluate import make_collator

    spec = run.specs[task]
    pairs = pair_tasks(run) if pairs is None else pairs
    collator = make_collator(run, train=False, tokenizer=tokenizer or run.tokenizer)   # one per request
    out = []
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
            if not isinstance(choices, list) or not choices:
                raise RequestError(f"{where}.choices must be a non-empty list of strings", param=param)
            if len(choices) > MAX_CHOICES:
                raise RequestError(f"{where} has {len(choices)} choices; at most {MAX_CHOICES} are accepted",
                                   param=param)
            ex = {"query": _text(raw["query"], where, "query", param),
                  "choices": [_text(c, where, f"choices[{j}]", param) for j, c in enumerate(choices)]}
        elif spec.kind == "text2text":
            if "input" not in raw:
                raise RequestError(f'{where}: text-to-text task {spec.name!r} takes {{"input": str}} or a string',
                                   param=param)
            ex = {"input": _text(raw["input"], where, "input", param)}
        else:
            if "text" not in raw:
                raise RequestError(f'{where}: {spec.kind} task {spec.name!r} takes {{"text": str, '
                                   '"text_pair": str (optional)}} or a string', param=param)
            ex = {"text": _text(raw["text"], where, "text", param)}
            if raw.get("text_pair") is not None:
                if task not in pairs:
                    raise RequestError(f"{where}.text_pair: task {spec.name!r} takes single texts (its data has no "
                                       "text_pair); send the text alone", param=param)
                ex["text_pair"] = _text(raw["text_pair"], where, "text_pair", param)
        unknown = [k for k in raw if k not in _FIELDS[spec.kind]]
        if unknown:
            raise RequestError(f"{where} has unknown field {unknown[0]!r}; {spec.kind} task {spec.name!r} takes "
                               f"{', '.join(_FIELDS[spec.kind])}", param=param)
        out.append((ex, is_truncated(run, task, ex, collator=collator)))
    return out


def is_truncated(run: Run, task: int, ex: dict, tokenizer: Any = None, collator: Any = None) -> bool:
    """Whether the collator cuts ``ex``: the run's own collator decides (siamese rows, choices, task prefix, label
    texts, causal prompts with their answer cue or chat template). Pass ``collator`` (the run's, built once) when
    asking for many inputs; otherwise one is built with ``tokenizer`` (default the run's)."""
    from morelora.training.evaluate import make_collator, with_placeholder_label

    collator = collator or make_collator(run, train=False, tokenizer=tokenizer or run.tokenizer)
    return collator.truncates(task, with_placeholder_label(run.specs[task], ex))


def format_output(run: Run, task: int, prediction: Any, output: Any, truncated: bool = False) -> dict[str, Any]:
    """The JSON answer for one input: label + probabilities, choice + scores, value, or generated text; and
    whether the input was truncated to the model's length."""
    spec = run.specs[task]
    answer: dict[str, Any]
    if run.kind != "encoder":
        answer = {"prediction": prediction, "text": output}
    elif spec.kind == "regression":
        answer = {"value": float(prediction)}
    elif spec.kind == "multiple_choice":
        answer = {"choice": int(prediction), "scores": output.tolist()}
    else:
        answer = {"label": int(prediction), "probabilities": torch.softmax(output, -1).tolist()}
        if spec.label_words:
            answer["label_name"] = spec.label_words[int(prediction)]
    answer["truncated"] = truncated
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


@dataclass(eq=False)
class _Request:
    features: list[tuple[int, dict]]
    future: asyncio.Future


class Batcher:
    """One bounded queue for all tasks and one worker running mixed-task forward passes in a thread.

    The queue holds live requests only: a request whose client disconnected or timed out is taken out at
    once (:meth:`submit`), so it never runs and never counts against ``max_queue``.
    """

    def __init__(self, run: Run, options: ServeOptions, metrics: _Metrics | None = None) -> None:
        self.run, self.options, self.metrics = run, options, metrics
        self.queue: deque[_Request] = deque()
        self._arrived = asyncio.Event()       # set when a request is queued
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

    async def stop(self, timeout_s: float | None = None) -> None:
        """Answer everything queued (waiting at most ``timeout_s``; what is left then gets 503), then stop."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.queue or self._held is not None or self._busy:
            if deadline is not None and time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        running = self._busy   # a batch still running past the deadline is not waited for
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for request in [*self.queue, *([self._held] if self._held else [])]:
            if not request.future.done():
                request.future.set_exception(RequestError("the server is shutting down", status=503))
        self._executor.shutdown(wait=not running)

    async def submit(self, features: list[tuple[int, dict]],
                     disconnected: Awaitable[Any] | None = None) -> list[tuple[Any, Any]]:
        """Queue one request; its ``(prediction, output)`` per input once its batch has run.

        ``disconnected``: completes when the client goes away; the request then leaves the queue (499). So does
        a request not answered within ``request_timeout_s`` (504) or whose handler is cancelled."""
        if len(self.queue) >= self.options.max_queue:
            raise RequestError(f"the server is busy: {self.options.max_queue} requests are queued "
                               "(--max-queue); retry shortly", status=503, headers={"Retry-After": "1"})
        request = _Request(features, asyncio.get_running_loop().create_future())
        self.queue.append(request)
        self._arrived.set()
        self._gauge()
        self.in_flight += 1
        watch = asyncio.ensure_future(disconnected) if disconnected is not None else None
        try:
            done, _ = await asyncio.wait([request.future, *([watch] if watch else [])],
                                         timeout=self.options.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if request.future in done:
                return request.future.result()
            if watch is not None and watch in done:
                raise RequestError("the client disconnected; the request was dropped", status=499)
            raise RequestError(f"no answer within {self.options.request_timeout_s:g} s (the server's request "
                               "timeout); retry or lower the load", status=504)
        finally:
            self.in_flight -= 1
            if watch is not None:
                watch.cancel()
            self._drop(request)

    def _drop(self, request: _Request) -> None:
        """Take an answered or abandoned request out of the queue (if it is still there)."""
        if not request.future.done():
            request.future.cancel()
        if self._held is request:
            self._held = None
        with contextlib.suppress(ValueError):
            self.queue.remove(request)
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.queue))

    async def _wait_arrival(self, timeout: float | None) -> bool:
        """Wait for a request to be queued (True), at most ``timeout`` seconds (False)."""
        self._arrived.clear()
        if self.queue:
            return True
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _next_batch(self) -> list[_Request]:
        while self._held is None and not self.queue:
            await self._wait_arrival(None)
        first = self._held or self.queue.popleft()
        self._held = None
        batch, size = [first], len(first.features)
        deadline = time.monotonic() + self.options.max_wait_ms / 1000
        while size < self.options.max_batch_size:
            if not self.queue:
                left = deadline - time.monotonic()
                if left <= 0 or not await self._wait_arrival(left):
                    break
                continue
            item = self.queue.popleft()
            if size + len(item.features) > self.options.max_batch_size:
                self._held = item
                break
            batch.append(item)
            size += len(item.features)
        self._gauge()
        return [r for r in batch if not r.future.done()]   # abandoned while the batch gathered: not run

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

_ERROR_TYPES = {404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 499: "client_closed",
                503: "overloaded_error", 504: "timeout_error", 500: "server_error"}


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """The documented error JSON, ``{"error": {"message", "type", "param"}}`` (ASCII: any text survives)."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param}}).encode()


class BodyGuard:
    """ASGI middleware: reads each request body in full before the app sees it, refusing one over
    ``max_bytes`` (413, also when Content-Length announces it) or not received within ``timeout_s`` (408); both
    close the connection. Counts every answer in ``metrics`` (Prometheus)."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float, metrics: _Metrics) -> None:
        self.app, self.max_bytes, self.timeout_s, self.metrics = app, max_bytes, timeout_s, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            body = await self._read(scope, receive, counted_send)
            if body is not None:
                replayed = False

                async def replay() -> dict:
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()   # after the body: waits for the client's disconnect

                await self.app(scope, replay, counted_send)
        finally:
            if scope["path"] != "/metrics":
                self.metrics.requests.labels(scope["path"], str(status[0])).inc()
                self.metrics.latency.labels(scope["path"]).observe(time.perf_counter() - t0)

    async def _read(self, scope: dict, receive: Any, send: Any) -> bytes | None:
        """The whole body, or None once a 413 / 408 is sent (or the client left)."""
        limit = f"the request body is over {self.max_bytes} bytes (--max-body-bytes); send fewer or shorter inputs"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, 413, limit)
            return None

        async def read() -> bytes | None:
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_bytes:
                    await self._refuse(send, 413, limit)
                    return None
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), self.timeout_s)
        except asyncio.TimeoutError:
            await self._refuse(send, 408, f"the request body did not arrive within {self.timeout_s:g} s "
                                          "(--body-timeout-s)")
            return None

    @staticmethod
    async def _refuse(send: Any, status: int, message: str) -> None:
        body = error_body(status, message)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_app(run: Run, options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI app serving every task of ``run`` (its model must accept per-example ``task_ids``)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException

    options = options or ServeOptions()
    metrics = _Metrics()
    tasks = run.task_names
    pairs = pair_tasks(run)
    state: dict[str, Any] = {}
    # Inputs are checked and tokenised here, off the event loop, with a tokenizer of its own (a fast tokenizer
    # changes its truncation settings on every call: sharing one with the model's thread is not safe).
    parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="morelora-parse")
    parse_tokenizer = copy.deepcopy(run.tokenizer)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = Batcher(run, options, metrics)
        batcher.start()
        state["batcher"] = batcher
        yield
        await batcher.stop(options.shutdown_timeout_s)
        parser.shutdown(wait=False)

    app = FastAPI(title="morelora", lifespan=lifespan)
    app.add_middleware(BodyGuard, max_bytes=options.max_body_bytes, timeout_s=options.body_timeout_s,
                       metrics=metrics)

    def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> Response:
        return Response(error_body(status, message, param), status_code=status, headers=headers,
                        media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            reason = first.get("ctx", {}).get("error", "invalid JSON")
            return error(422, f"malformed JSON body ({reason}); send a JSON object")
        field = ".".join(str(p) for p in first["loc"][1:]) or "body"
        return error(422, f"field {field!r}: {first['msg']}", param=field)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> Response:
        return error(exc.status, str(exc), exc.param, exc.headers)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            message = f"no endpoint {request.url.path}; see GET /v1/models, POST /v1/predict, GET /health"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "-")
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
        elif exc.status_code == 400:
            message = "the body is not a JSON object in UTF-8 (or nests too deeply); send a JSON object"
        else:
            message = str(exc.detail)
        return error(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        return error(500, f"internal server error ({type(exc).__name__}); the server log has the details")

    def task_index(name: str, param: str) -> int:
        if name not in tasks:
            raise RequestError(f"unknown task {name!r}; this server has tasks: {', '.join(tasks)}", status=404,
                               param=param)
        return tasks.index(name)

    async def parse(t: int, inputs: list[Any], param: str) -> list[tuple[dict, bool]]:
        return await asyncio.get_running_loop().run_in_executor(
            parser, lambda: parse_inputs(run, t, inputs, param, tokenizer=parse_tokenizer, pairs=pairs))

    async def answer(request: Request, t: int, parsed: list[tuple[dict, bool]]) -> list[tuple[Any, Any]]:
        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        return await state["batcher"].submit([(t, ex) for ex, _ in parsed], disconnected())

    @app.post("/v1/predict")
    async def predict(body: PredictRequest, request: Request) -> dict[str, Any]:
        t = task_index(body.task, "task")
        if len(body.inputs) > options.max_batch_size:
            raise RequestError(f"{len(body.inputs)} inputs in one request; at most {options.max_batch_size} "
                               "(--max-batch-size): split the request", param="inputs")
        parsed = await parse(t, body.inputs, "inputs")
        answers = await answer(request, t, parsed)
        return {"task": body.task, "outputs": [format_output(run, t, p, o, cut)
                                               for (p, o), (_, cut) in zip(answers, parsed)]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> dict[str, Any]:
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
        parsed = await parse(t, prompts, "prompt")
        answers = await answer(request, t, parsed)

        def count() -> tuple[int, int]:
            tok = parse_tokenizer
            return (sum(len(tok(p)["input_ids"]) for p in prompts),
                    sum(len(tok(o, add_special_tokens=False)["input_ids"]) for _, o in answers))
        used, made = await asyncio.get_running_loop().run_in_executor(parser, count)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model,
                "choices": [{"index": i, "text": o, "logprobs": None, "finish_reason": "stop", "truncated": cut}
                            for i, ((_, o), (_, cut)) in enumerate(zip(answers, parsed))],
                "usage": {"prompt_tokens": used, "completion_tokens": made, "total_tokens": used + made}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": s.name, "object": "model", "created": 0, "owned_by": "morelora",
                                            "kind": s.kind} for s in run.specs]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        batcher = state.get("batcher")
        return {"status": "ok", "method": run.cfg.method_name, "kind": run.kind, "tasks": tasks,
                "queue_depth": len(batcher.queue) if batcher else 0,
                "in_flight": batcher.in_flight if batcher else 0}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# --------------------------------------------------------------------------------------------- running


def _uvicorn_config(run: Run, options: ServeOptions, host: str, port: int, log_level: str) -> Any:
    import uvicorn

    return uvicorn.Config(create_app(run, options), host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=options.shutdown_timeout_s)


def serve(run: Run, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None) -> None:
    """Serve ``run`` until SIGINT / SIGTERM (which drain the requests in flight, at most ``shutdown_timeout_s``)."""
    import uvicorn

    uvicorn.Server(_uvicorn_config(run, options or ServeOptions(), host, port, "info")).run()


class BackgroundServer:
    """A uvicorn server on 127.0.0.1 and a free port, in a thread (tests and the load benchmark)."""

    def __init__(self, run: Run, options: ServeOptions | None = None) -> None:
        import uvicorn

        self.server = uvicorn.Server(_uvicorn_config(run, options or ServeOptions(), "127.0.0.1", 0, "warning"))
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
