"""The FastAPI app: OpenAI-compatible chat completions, task endpoints, the web page.

    app = create_app(PaliGemma.from_pretrained("pg2-3b-224"), ServeConfig(api_key="..."))

Routes (OpenAPI page at /docs):
  GET  /                      the web page (static/index.html)
  GET  /health                {"status", "in_progress", "running", "done", "cancelled", "failed"}
  GET  /v1/models             the one model served, with the tasks it can do
  POST /v1/chat/completions   one user message: an image (base64 data URL) + the task prefix
                              as text ("caption en", "detect cat"); `stream: true` is SSE
  POST /v1/detect             {"image", "objects"} -> boxes in pixels of the image sent
  POST /v1/segment            {"image", "object", "mask_format": "png"|"rle"} -> boxes, masks
  POST /v1/explain            {"image", "prompt"} -> text, per-token attention maps, heatmap PNG

Errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP status: 400 bad
input, 401 missing/wrong API key, 413 over a size limit, 429 queue full, 503 shutting down,
504 timed out. Work for a client that disconnects or times out is dropped at the next decode
step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from ..annotate import draw_attention, to_pil
from ..api import PaliGemma
from ..image import preprocess
from ..tasks import parse_detections, parse_segments, task_prefix
from .engine import Busy, Done, Engine, Failed, Sampling, ShuttingDown, Ticket, Token
from .media import BadInput, decode_image, encode_mask, png_data_url

logger = logging.getLogger("paligemma.serve")


@dataclass
class ServeConfig:
    """Limits and settings of one server (CLI flags of `paligemma serve`)."""

    model_id: str = "paligemma"
    api_key: str | None = None  # required as "Authorization: Bearer <key>" on /v1 when set
    max_image_bytes: int = 8 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_prompt_tokens: int = 128  # text tokens of the prefix (the image's are on top)
    max_tokens: int = 256  # the most a request may ask for
    default_max_tokens: int = 64
    max_batch: int = 8  # requests decoded together
    max_queue: int = 64  # requests admitted at once (running + waiting); more get 429
    timeout: float = 120.0  # seconds per request, queueing included; then 504
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish on shutdown


# -- request bodies ---------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use


class ImageURL(_Body):
    url: str


class ContentPart(_Body):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart]


class ChatRequest(_Body):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2, description="0 (default) decodes greedily, "
                               "as PaliGemma's tasks expect")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per request")


class DetectRequest(_Body):
    image: str = Field(description="data:image/...;base64,...")
    objects: str | list[str] = Field(description="'cat ; dog' or ['cat', 'dog']")
    max_tokens: int | None = Field(None, ge=1)


class SegmentRequest(_Body):
    image: str = Field(description="data:image/...;base64,...")
    object: str = Field(min_length=1)
    mask_format: Literal["png", "rle"] = "png"
    max_tokens: int | None = Field(None, ge=1)


class ExplainRequest(_Body):
    image: str = Field(description="data:image/...;base64,...")
    prompt: str = Field(min_length=1, description="the task prefix, e.g. 'caption en'")
    max_tokens: int | None = Field(None, ge=1)
    layers: list[int] | None = Field(None, description="decoder layers to average (all)")
    heads: list[int] | None = Field(None, description="query heads to average (all)")


# -- errors -----------------------------------------------------------------------------------

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "server_unavailable", 504: "timeout"}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": status}}, status_code=status, headers=headers)


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', '?')})", None
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    return (f"{where or 'body'}: {first['msg']}" + (f" ({len(exc.errors()) - 1} more "
            "problems)" if len(exc.errors()) > 1 else "")), where or None


# -- the app ----------------------------------------------------------------------------------

def create_app(pg: PaliGemma, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    engine = Engine(pg, max_batch=config.max_batch, max_queue=config.max_queue)
    # One thread decodes images: more would fight the model's thread for the GIL, which its
    # many small torch calls take back after every op.
    images = ThreadPoolExecutor(1, thread_name_prefix="paligemma-images")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        # uvicorn has already waited for in-flight responses (its graceful-shutdown timeout);
        # whatever is still admitted gets shutdown_timeout more, then fails with 503.
        await run_in_threadpool(engine.shutdown, config.shutdown_timeout)
        images.shutdown()

    # base64 inflates 3 bytes to 4; the rest of the body is small
    max_body = 4 * config.max_image_bytes // 3 + 65536
    app = FastAPI(title="paligemma-torch", version="0.1.0", lifespan=lifespan,
                  description="PaliGemma over HTTP: OpenAI-compatible chat completions (image as "
                  "a base64 data URL, the task prefix as text) and detect / segment / explain.")
    app.state.engine = engine
    app.state.config = config
    # The inner one stops a body without Content-Length that grows too large (its
    # HTTPException(413) reaches our JSON handler); the outer one refuses a body declared too
    # large before reading it.
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=max_body)
    app.add_middleware(_DeclaredSizeLimit, max_body=max_body)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, str(exc), headers=exc.headers)

    @app.exception_handler(BadInput)
    async def _bad_input(request: Request, exc: BadInput) -> JSONResponse:
        return error_response(exc.status, str(exc), exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, *_validation_message(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error on %s", request.url.path, exc_info=exc)
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log")

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(),
                                                                 config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           {"WWW-Authenticate": "Bearer"})

    v1 = [Depends(check_key)]
    tasks = ["caption", "describe", "answer", "ocr", "detect", "explain"]
    if pg.vae is not None:
        tasks.insert(5, "segment")

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html")
                            .read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "in_progress": engine.load, "running": engine.scheduler.num_active,
                **{k: engine.stats[k] for k in ("done", "cancelled", "failed")}}

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict[str, Any]:
        cfg = pg.model.config
        return {"object": "list", "data": [{
            "id": config.model_id, "object": "model", "created": 0,
            "owned_by": "paligemma-torch", "tasks": tasks,
            "image_size": cfg.vision.image_size, "max_tokens": config.max_tokens}]}

    # -- helpers ------------------------------------------------------------------------------

    async def read_image(url: str, param: str = "image") -> tuple[Any, torch.Tensor]:
        """-> (float [H, W, 3] array, preprocessed pixels [3, R, R]), off the event loop."""
        def work() -> tuple[Any, torch.Tensor]:
            array = decode_image(url, config.max_image_bytes, config.max_image_pixels, param)
            return array, preprocess([array], pg.image_size)[0]
        return await asyncio.get_running_loop().run_in_executor(images, work)

    def check_prompt(prefix: str, max_tokens: int | None, param: str = "prompt") -> int:
        """Checks the limits; returns max_tokens (the default when None)."""
        max_tokens = config.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens > config.max_tokens:
            raise BadInput(f"max_tokens: {max_tokens} is over the server's limit of "
                           f"{config.max_tokens}", param="max_tokens")
        n = len(pg.tokenizer.prompt(prefix)[0])
        if n > config.max_prompt_tokens:
            raise BadInput(f"{param}: {n} tokens, over the server's limit of "
                           f"{config.max_prompt_tokens}", param=param)
        total = pg.model.config.num_image_tokens + n + max_tokens
        if total > pg.max_seq_len:
            raise BadInput(f"{param}: image + prompt + max_tokens = {total} tokens, over the "
                           f"model's {pg.max_seq_len}", param=param)
        return max_tokens

    def submit(fn: Any, *args: Any) -> Ticket:
        try:
            return fn(*args)
        except Busy as e:
            raise ApiError(429, str(e), {"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise ApiError(503, str(e)) from None

    async def finish(request: Request, ticket: Ticket) -> Done:
        """The ticket's result; drops the work if the client leaves or time runs out."""
        waiter = asyncio.ensure_future(ticket.result())
        deadline = time.monotonic() + config.timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(504, f"request timed out after {config.timeout:g} s")
                done, _ = await asyncio.wait({waiter}, timeout=min(0.25, left))
                if done:
                    return waiter.result()
                if await request.is_disconnected():
                    raise ClientGone()
        except ShuttingDown as e:
            raise ApiError(503, str(e)) from None
        finally:
            if not waiter.done():
                waiter.cancel()
                ticket.cancel()

    async def generate(request: Request, pixels: torch.Tensor, prefix: str,
                       sampling: Sampling) -> tuple[str, Done]:
        done = await finish(request, submit(engine.generate, pixels, prefix, sampling))
        return pg.tokenizer.decode(done.tokens), done

    # -- OpenAI-compatible chat completions ---------------------------------------------------

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        image_url, prefix = _image_and_prompt(body.messages)
        max_tokens = check_prompt(prefix, body.max_completion_tokens or body.max_tokens,
                                  "messages")
        _, pixels = await read_image(image_url, "messages.image_url")
        sampling = Sampling(max_tokens, body.temperature, body.top_p, body.seed)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        prompt_tokens = pg.model.config.num_image_tokens + len(pg.tokenizer.prompt(prefix)[0])
        if body.stream:
            ticket = submit(engine.generate, pixels, prefix, sampling)
            return StreamingResponse(
                _sse(ticket, completion_id, created, prompt_tokens),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, done = await generate(request, pixels, prefix, sampling)
        return {
            "id": completion_id, "object": "chat.completion", "created": created,
            "model": config.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": _usage(prompt_tokens, len(done.tokens)),
        }

    async def _sse(ticket: Ticket, completion_id: str, created: int,
                   prompt_tokens: int) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, then `data: [DONE]`. The generator is
        closed when the client disconnects; `finally` then drops the work."""
        def chunk(delta: dict[str, Any], finish_reason: str | None = None,
                  **extra: Any) -> str:
            return "data: " + json.dumps({
                "id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": config.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                **extra}) + "\n\n"

        deadline = time.monotonic() + config.timeout
        ids: list[int] = []
        emitted = ""
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    event = await asyncio.wait_for(ticket.events.get(),
                                                   deadline - time.monotonic())
                except TimeoutError:
                    event = Failed(ApiError(504, f"request timed out after "
                                                 f"{config.timeout:g} s"))
                if isinstance(event, Token):
                    ids.append(event.id)
                    text = pg.tokenizer.decode(ids)
                    if not text.endswith("\ufffd"):  # wait for the rest of a UTF-8 character
                        yield chunk({"content": text[len(emitted):]})
                        emitted = text
                    continue
                if isinstance(event, Failed):
                    error = event.error
                    status = (error.status if isinstance(error, ApiError)
                              else 503 if isinstance(error, ShuttingDown) else 500)
                    yield f"data: {error_response(status, str(error)).body.decode()}\n\n"
                    return
                text = pg.tokenizer.decode(ids)
                if text != emitted:
                    yield chunk({"content": text[len(emitted):]})
                yield chunk({}, event.finish_reason,
                            usage=_usage(prompt_tokens, len(event.tokens)))
                yield "data: [DONE]\n\n"
                return
        finally:
            ticket.cancel()  # no-op once done; drops the work if the client went away

    # -- task endpoints -----------------------------------------------------------------------

    @app.post("/v1/detect", dependencies=v1)
    async def detect(body: DetectRequest, request: Request) -> dict[str, Any]:
        prefix = _prefix("detect", body.objects, "objects")
        max_tokens = check_prompt(prefix, body.max_tokens, "objects")
        array, pixels = await read_image(body.image)
        text, _ = await generate(request, pixels, prefix, Sampling(max_tokens))
        height, width = array.shape[:2]
        objects = parse_detections(text, width, height)
        return {"model": config.model_id, "prompt": prefix, "text": text, "width": width,
                "height": height, "objects": [o.to_json() for o in objects]}

    @app.post("/v1/segment", dependencies=v1)
    async def segment(body: SegmentRequest, request: Request) -> dict[str, Any]:
        if pg.vae is None:
            raise BadInput("segment needs the mask VAE: start the server with --vae "
                           "(vae-oid.npz or its converted directory)", param="object")
        prefix = _prefix("segment", body.object, "object")
        max_tokens = check_prompt(prefix, body.max_tokens, "object")
        array, pixels = await read_image(body.image)
        text, _ = await generate(request, pixels, prefix, Sampling(max_tokens))
        height, width = array.shape[:2]

        def masks() -> list[dict[str, Any]]:
            return [{**o.to_json(), "mask": encode_mask(o.mask, body.mask_format)}
                    for o in parse_segments(text, width, height, pg.vae)]
        return {"model": config.model_id, "prompt": prefix, "text": text, "width": width,
                "height": height, "mask_format": body.mask_format,
                "objects": await run_in_threadpool(masks)}

    @app.post("/v1/explain", dependencies=v1)
    async def explain(body: ExplainRequest, request: Request) -> dict[str, Any]:
        prefix = body.prompt.strip()
        max_tokens = check_prompt(prefix, body.max_tokens)
        array, pixels = await read_image(body.image)

        def run() -> Any:
            return pg.explain(array, prefix, layers=body.layers, heads=body.heads,
                              max_new_tokens=max_tokens)
        try:
            result = (await finish(request, submit(engine.call, run))).value
        except ValueError as e:  # layer / head indices out of range
            raise BadInput(str(e), param="layers") from None
        maps = result.maps
        mean = maps.mean(0) if len(maps) else maps.sum(0)
        heatmap = None
        if len(maps):
            titles = [f"all: {result.text}"[:40], *(repr(p) for p in result.pieces)]
            heatmap = png_data_url(draw_attention(to_pil(array), [mean, *maps], titles))
        return {"model": config.model_id, "prompt": prefix, "text": result.text,
                "pieces": result.pieces, "grid": int(mean.shape[-1]) if len(maps) else 0,
                "maps": [m.round(5).tolist() for m in maps],
                "mean": mean.round(5).tolist(), "heatmap": heatmap}

    return app


class _DeclaredSizeLimit:
    """ASGI middleware: a JSON 413 for a request whose Content-Length is over `max_body`."""

    def __init__(self, app: ASGIApp, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = Headers(scope=scope).get("content-length", "")
            if length.isdigit() and int(length) > self.max_body:
                response = error_response(413, f"request body of {length} bytes is over the "
                                          f"server's limit of {self.max_body} bytes")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _prefix(task: str, text: str | list[str], param: str) -> str:
    try:
        return task_prefix(task, text)
    except ValueError as e:
        raise BadInput(f"{param}: {e}", param=param) from None


def _image_and_prompt(messages: list[Message]) -> tuple[str, str]:
    """The one user message -> (image data URL, task prefix). System messages are ignored:
    PaliGemma takes no instructions beyond the task prefix."""
    turns = [m for m in messages if m.role not in ("system", "developer")]
    if len(turns) != 1 or turns[0].role != "user":
        raise BadInput("messages: PaliGemma answers one user message (an image and the task "
                       f"prefix), got {len(turns)} non-system messages", param="messages")
    content = turns[0].content
    parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else content
    images = [p.image_url for p in parts if p.type == "image_url"]
    texts = [p.text or "" for p in parts if p.type == "text"]
    if len(images) != 1 or images[0] is None:
        raise BadInput(f"messages: expected exactly one image_url part, got {len(images)}",
                       param="messages")
    prefix = " ".join(t.strip() for t in texts).strip()
    if not prefix:
        raise BadInput("messages: the text part must hold the task prefix, e.g. 'caption en' "
                       "or 'detect cat'", param="messages")
    url = images[0] if isinstance(images[0], str) else images[0].url
    return url, prefix

