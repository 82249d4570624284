"""The HTTP surface of `odyssey serve`: OpenAI's video API (POST /v1/videos, poll, /content) with Odyssey's fields,
Server-Sent Events, previews, health, and the web page, over a VideoService (cluster/serve/service.py).

Every error, FastAPI's own 404/405/validation ones included, is JSON {"error": {"message", "type", "param"}}.
The app never blocks its event loop on the service: service calls run in the thread pool, event streams wait on a
bounded buffer (_EventBuffer) that the service's thread feeds through loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import socket
import stat
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from pipeline.request import is_utf8

from .cli import is_loopback

__all__ = ["create_app", "APIError", "coerce_json", "coerce_form", "parse_range", "WEB_DIR", "MAX_BUFFERED"]

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
VIDEO_ID = re.compile(r"video_[0-9a-f]{24}")
FINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})
HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies and load balancers from closing an idle stream
CHUNK_BYTES = 256 * 1024
MAX_LIST = 100

# The fields POST /v1/videos takes, by type. JSON keeps its own types (checked); forms send strings (coerced).
_STR, _INT, _FLOAT, _SECONDS = "string", "integer", "number", "seconds"
FIELDS = {"prompt": _STR, "model": _STR, "negative_prompt": _STR, "seed": _INT, "seconds": _SECONDS, "size": _STR,
          "frames": _INT, "fps": _INT, "steps": _INT, "guidance_scale": _FLOAT, "low_noise_guidance_scale": _FLOAT,
          "sampler": _STR, "cache": _STR}
# What OpenAI's API defines and Odyssey cannot do: refused by name rather than silently ignored.
UNSUPPORTED = {"input_reference": "input_reference is not supported: Odyssey generates videos from text only",
               "remix_video_id": "remixing is not supported"}
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,30}")
_FLOAT_TEXT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,4})?")
_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")  # bounded: past 10**19 bytes is no file's offset
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?")  # a Host header: name or [v6], port
MAX_BUFFERED = 64  # events one stream holds for a client that reads slower than they come (see _EventBuffer)
_LATEST_ONLY = frozenset({"progress", "frame", "preview"})  # what a slow client may miss: a later one supersedes it


class APIError(Exception):
    """An error answer: status, one-line message, OpenAI-style type and the parameter it is about."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.type = type or _error_type(status)


def _error_type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error",
            503: "service_unavailable_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")


class _JSON(JSONResponse):
    """JSONResponse that cannot fail to encode: text holding a lone UTF-16 surrogate (JSON's "\\ud800" escape
    decodes to one) has no UTF-8 form, so such a reply goes out with every non-ASCII character escaped."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _text(value: str | None) -> str | None:
    """Text any reply can carry: lone surrogates written as their escapes."""
    return None if value is None else value.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, *, type: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return _JSON({"error": {"message": _text(message), "type": type or _error_type(status), "param": _text(param)}},
                 status_code=status, headers=headers)


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


# -- request fields -------------------------------------------------------------------------------------------------


def _check_names(names: list[str]) -> None:
    for name in names:
        if not is_utf8(name):  # from a JSON escape: no log line, record or reply could hold it as it is
            raise APIError(422, f"the field name {_short(name, 40)} is not valid text (a lone UTF-16 surrogate)",
                           param=name[:100])
        if name in UNSUPPORTED:
            raise APIError(422, UNSUPPORTED[name], param=name)
    unknown = [n for n in names if n not in FIELDS]
    if unknown:
        shown = ", ".join(_short(n, 40) for n in unknown[:5])
        raise APIError(422, f"unknown field{'s' if len(unknown) > 1 else ''} {shown}; known fields: "
                       f"{', '.join(FIELDS)}", param=unknown[0][:100])


def coerce_json(body: Any) -> dict:
    """A parsed JSON body -> the service's typed fields. JSON types must already be right (no "4" for an int, no
    true for a number); null is absent."""
    if not isinstance(body, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(body).__name__}")
    _check_names(list(body))
    fields = {}
    for name, value in body.items():
        if value is None:
            continue
        kind = FIELDS[name]
        if kind == _STR:
            ok = isinstance(value, str)
        elif kind == _INT:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == _FLOAT:
            ok = _finite_number(value)
        else:  # seconds: OpenAI sends a string ("4"); a number is as clear
            ok = isinstance(value, str) or _finite_number(value)
        if not ok:
            want = "a string or a number" if kind == _SECONDS else f"a{'n' if kind == _INT else ''} {kind}"
            raise APIError(422, f"{name} must be {want}, got {_short(value)}", param=name)
        fields[name] = float(value) if kind == _FLOAT else value
    _require_prompt(fields)
    return fields


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)  # an int past float's range raises
    except OverflowError:
        return False


def coerce_form(items: list[tuple[str, Any]]) -> dict:
    """Form fields (multipart or urlencoded: every value a string) -> the service's typed fields. Integers and
    numbers must parse exactly ("4", not "4.5" for an integer, never nan/inf); an empty optional field is absent."""
    _check_names([name for name, _ in items])
    fields: dict = {}
    for name, value in items:
        if name in fields:
            raise APIError(422, f"{name} is given more than once", param=name)
        if isinstance(value, UploadFile):
            raise APIError(422, f"{name} must be a text field, not a file", param=name)
        kind, text = FIELDS[name], value.strip()
        if kind == _STR or kind == _SECONDS:
            if name != "prompt" and not text:
                continue
            fields[name] = value if name in ("prompt", "negative_prompt") else text
        elif not text:
            continue
        elif kind == _INT:
            if not _INT_TEXT.fullmatch(text):
                raise APIError(422, f"{name} must be an integer, got {_short(text)}", param=name)
            fields[name] = int(text)
        else:
            number = float(text) if _FLOAT_TEXT.fullmatch(text) else math.nan
            if not math.isfinite(number):
                raise APIError(422, f"{name} must be a finite number, got {_short(text)}", param=name)
            fields[name] = number
    _require_prompt(fields)
    return fields


def _require_prompt(fields: dict) -> None:
    if fields.get("prompt") is None:
        raise APIError(422, "prompt is required", param="prompt")


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise APIError(422, f"{key} is given more than once", param=key[:100])
        seen[key] = value
    return seen


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) past `limit` bytes: by its Content-Length before reading, and by counting
    while reading (a chunked body has none, and a client can lie)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not re.fullmatch(r"[0-9]{1,20}", declared.strip()):
            raise APIError(400, "Content-Length must be a number of bytes")
        if int(declared) > limit:
            raise APIError(413, f"the request body ({int(declared)} bytes) is over the limit of {limit} bytes "
                           f"(serve.max_body_bytes)")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes (serve.max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_fields(request: Request, body: bytes) -> dict:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not media:  # a no-cors fetch of a Blob sends none: JSON is never assumed (nor text/plain accepted)
        raise APIError(415, "the request has no Content-Type: send application/json, multipart/form-data or "
                       "application/x-www-form-urlencoded")
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        try:
            data = json.loads(body.decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise APIError(400, f"the body is not valid JSON: {str(e)[:200]}") from None
        return coerce_json(data)
    if media == "application/x-www-form-urlencoded":
        try:
            items = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                              errors="strict", max_num_fields=len(FIELDS) * 4)
        except (UnicodeDecodeError, ValueError) as e:
            raise APIError(400, f"the form body cannot be read: {str(e)[:200]}") from None
        return coerce_form(items)
    if media == "multipart/form-data":
        async def replay():
            yield body

        parser = MultiPartParser(request.headers, replay(), max_files=4, max_fields=len(FIELDS) * 4,
                                 max_part_size=len(body) + 1)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise APIError(400, f"the multipart body cannot be read: {e.message}") from None
        try:
            return coerce_form(list(form.multi_items()))
        finally:
            await form.close()
    raise APIError(415, f"unsupported Content-Type {_short(media, 80)}: send application/json, multipart/form-data "
                   f"or application/x-www-form-urlencoded")


# -- content (Range) ------------------------------------------------------------------------------------------------


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """One `bytes=` range -> (start, end inclusive); None to send the whole file (no header, or one this server
    ignores as RFC 9110 allows: malformed, several ranges, last < first); "unsatisfiable" for 416."""
    if header is None:
        return None
    m = _RANGE.fullmatch(header.replace(" ", "").replace("\t", ""))
    if m is None or not (m.group(1) or m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if first:
        start = int(first)
        end = int(last) if last else size - 1
        if last and end < start:
            return None
        if start >= size:
            return "unsatisfiable"
        return start, min(end, size - 1)
    suffix = int(last)
    if suffix == 0 or size == 0:
        return "unsatisfiable"
    return max(0, size - suffix), size - 1


class _EventBuffer:
    """The events one stream has not sent yet, bounded: a client that reads slower than events come (or never reads:
    its TCP window full, the send waits) gets the newest progress and preview instead of every step, and the
    ingress's memory does not grow with it. A new preview replaces one still waiting (each is kilobytes); past
    `limit` waiting events the oldest progress/frame/preview goes. What is kept stays in order, so progress stays
    monotonic; state, started, queued and the final event are never dropped. Event loop thread only."""

    OVERFLOW = object()  # put in place of everything when nothing can be dropped: the stream ends

    def __init__(self, limit: int = MAX_BUFFERED):
        self.items: collections.deque = collections.deque()
        self.limit = limit
        self._ready = asyncio.Event()

    def _drop_first(self, kinds) -> bool:
        for i, item in enumerate(self.items):
            if isinstance(item, tuple) and item[0] in kinds:
                del self.items[i]
                return True
        return False

    def put(self, item) -> None:
        """item: (event, data), or None to end the stream (end_streams)."""
        if self.items and self.items[-1] is self.OVERFLOW:
            return
        if isinstance(item, tuple) and item[0] == "preview":
            self._drop_first(("preview",))
        if len(self.items) >= self.limit and not self._drop_first(_LATEST_ONLY):
            self.items.clear()
            item = self.OVERFLOW
        self.items.append(item)
        self._ready.set()

    async def get(self, timeout: float):
        """The next item; asyncio.TimeoutError after `timeout` seconds without one."""
        if not self.items:
            self._ready.clear()
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self.items.popleft()


class _Stream(StreamingResponse):
    """A streamed body that ends quietly when the client leaves. Behind Ray Serve's proxy a client that left makes
    receive() raise (TaskCancelledError) instead of returning http.disconnect: a disconnect all the same, not an
    error to log with a traceback each time a browser tab closes or a video seeks."""

    def __init__(self, *args, on_close=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_close = on_close  # async, run once the response is over however it ended (shielded)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.on_close is not None:
                with anyio.CancelScope(shield=True):  # a cancelled request would skip an unshielded await
                    await self.on_close()

    async def listen_for_disconnect(self, receive) -> None:
        try:
            await super().listen_for_disconnect(receive)
        except Exception:  # noqa: BLE001 - whatever receive raised, the connection is gone
            pass


def _file_response(request: Request, path: Path, media_type: str) -> Response:
    """Stream the file the service named, opened once (never following a link): 200, 206 for one satisfiable
    Range, 416 otherwise; ETag/Last-Modified so If-Range works for a browser resuming or seeking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise APIError(404, "the video file is gone (deleted or pruned)", param="video_id") from None
    f = os.fdopen(fd, "rb")  # closes the descriptor when collected, should a client leave before the body starts
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise APIError(404, "the video file is gone (deleted or pruned)", param="video_id")
        size = st.st_size
        etag = f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{size:x}"'
        headers = {"Accept-Ranges": "bytes", "ETag": etag, "Last-Modified": formatdate(st.st_mtime, usegmt=True),
                   "Cache-Control": "private, no-cache"}
        header = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if header is not None and if_range is not None and if_range.strip() not in (etag, headers["Last-Modified"]):
            header = None  # the file changed since the client's first part: send it whole
        span = parse_range(header, size)
        if span == "unsatisfiable":
            raise APIError(416, f"the range {header[:60]!r} is outside the file ({size} bytes)", param="range",
                           headers={"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"})
        if span is None:
            start, end, status = 0, size - 1, 200
        else:
            (start, end), status = span, 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            f.close()
            return Response(status_code=status, headers=headers, media_type=media_type)
    except BaseException:
        f.close()
        raise

    async def body():
        offset, left = start, length
        while left > 0:
            chunk = await run_in_threadpool(os.pread, fd, min(CHUNK_BYTES, left), offset)
            if not chunk:  # truncated under us: the Content-Length cannot be kept, end the connection short
                break
            offset, left = offset + len(chunk), left - len(chunk)
            yield chunk

    async def close():
        f.close()

    return _Stream(body(), status_code=status, headers=headers, media_type=media_type, on_close=close)


# -- auth -----------------------------------------------------------------------------------------------------------


def _open_path(path: str) -> bool:
    """The page, its files and the health checks need no token (the page asks for it); everything else does."""
    return path in ("/", "/healthz", "/livez", "/favicon.ico") or path.startswith("/static/")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class _SameOrigin:
    """ASGI middleware against DNS rebinding and cross-site requests: what a token does not cover when there is none
    (the default on loopback), since the user's browser can reach loopback from any page it loads.

    Host: a page on a rebound name (attacker.example resolving to 127.0.0.1 after the page loaded) is same-origin
    with this server in the browser's eyes, so it could read every answer; its requests carry its own name in Host.
    Allowed names: localhost, any IP literal (an address cannot be rebound), the name the server was started on and,
    on a wildcard address, this machine's own names; with a token and a non-loopback address any name (the token
    guards the API; a page on a rebound name does not have it). Ports are not compared: a name is what rebinding
    forges, and a port forward (ssh -L, kubectl port-forward) changes the port legitimately. Else 421.

    Origin: a state-changing request (anything but GET/HEAD/OPTIONS) whose Origin is not this server (its Host, or
    the X-Forwarded-Host a reverse proxy sets: neither can be set by a cross-site page without a CORS preflight,
    which this server never grants), or which the browser marks Sec-Fetch-Site: cross-site, is refused with 403: a
    plain HTML form or a no-cors fetch from any site could otherwise queue or cancel jobs. Clients that are not
    browsers (curl, the OpenAI SDK) send no Origin and pass."""

    SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app, host: str, token: bool):
        self.app = app
        bound = host.strip("[]").lower()
        wildcard = _is_ip(bound) and ipaddress.ip_address(bound).is_unspecified
        self.any_name = token and not is_loopback(bound)
        self.names = {"localhost", bound}
        if wildcard:
            self.names |= {n.lower() for n in (socket.gethostname(), socket.getfqdn()) if n}

    def _host_error(self, host: str | None) -> APIError | None:
        if not host:
            return APIError(400, "the request has no Host header")
        m = _HOST.fullmatch(host.strip())
        if m is None:
            return APIError(400, f"the Host header {_short(host, 60)} is not a host name or address")
        name = m.group(1).strip("[]").lower()
        if self.any_name or name in self.names or _is_ip(name):
            return None
        return APIError(421, f"this server does not answer to the name {_short(name, 60)} (a protection against "
                        f"DNS rebinding): use its address or localhost, or start it with --token-file to accept "
                        f"any name")

    @staticmethod
    def _origin_error(headers: Headers) -> APIError | None:
        origin = headers.get("origin")
        if origin is not None:
            own = {h.strip().lower() for h in (headers.get("host", ""),
                                                headers.get("x-forwarded-host", "").split(",")[0]) if h.strip()}
            scheme, sep, netloc = origin.strip().lower().partition("://")
            if not sep or scheme not in ("http", "https") or netloc.rstrip("/") not in own:
                return APIError(403, f"cross-origin request refused: Origin {_short(origin, 80)} is not this "
                                f"server (send no Origin from programs; browsers must use this server's page)")
        if headers.get("sec-fetch-site", "").strip().lower() == "cross-site":
            return APIError(403, "cross-site request refused (Sec-Fetch-Site: cross-site)")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            error = self._host_error(headers.get("host"))
            if error is None and scope.get("method", "GET") not in self.SAFE_METHODS:
                error = self._origin_error(headers)
            if error is not None:
                await error_response(error.status, error.message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BearerAuth:
    """ASGI middleware: with a token, every path but the open ones needs `Authorization: Bearer <token>`,
    compared in constant time. Deny by default: an unknown path answers 401, not 404, to a stranger."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not _open_path(scope.get("path", "")):
            scheme, _, given = Headers(scope=scope).get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), self.token):
                message = "a valid token is required: Authorization: Bearer <token>" if not scheme else \
                    "the token is not valid"
                response = error_response(401, message, headers={"WWW-Authenticate": 'Bearer realm="odyssey"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _SecurityHeaders:
    """ASGI middleware (not BaseHTTPMiddleware, which would buffer event streams): headers every answer gets."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
               (b"referrer-policy", b"no-referrer")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- the app --------------------------------------------------------------------------------------------------------


def _video_id(video_id: str) -> str:
    if not VIDEO_ID.fullmatch(video_id):
        raise APIError(404, f"no video {_short(video_id, 40)} (ids look like video_<24 hex digits>)",
                       param="video_id")
    return video_id


def _not_found(video_id: str) -> APIError:
    return APIError(404, f"no video {video_id}", param="video_id")


def _service_errors():
    from .service import InvalidField, QueueFull

    return InvalidField, QueueFull


def create_app(service, *, token: str | None = None, max_body_bytes: int = 1_048_576,
               static_dir: Path | None = None, max_streams: int = 256, host: str = "127.0.0.1") -> FastAPI:
    """The FastAPI app over `service` (a started VideoService, or anything with its methods). token: when set, a
    Bearer token every path needs but the page (/, /static/*), /healthz and /livez. static_dir: the web page's
    folder (default: the package's). max_streams: event streams open at once (serve.max_streams; more: 429, as each
    holds one of the ingress's concurrent requests). host: the address the server listens on (the Host names it
    answers to follow from it and the token: _SameOrigin). app.state.end_streams() ends every open event stream."""
    if token is not None and not token:
        raise ValueError("the token is empty")
    static_dir = Path(static_dir) if static_dir is not None else WEB_DIR
    InvalidField, QueueFull = _service_errors()
    app = FastAPI(title="Odyssey", docs_url=None, redoc_url=None, openapi_url=None, default_response_class=_JSON)
    streams: set = set()  # (loop, buffer) of every open event stream
    open_streams = [0]  # counted from the subscription on (the event loop's thread only)
    serve_config = getattr(getattr(service, "config", None), "serve", None)
    retry_after_s = getattr(serve_config, "retry_after_s", 10)

    def end_streams() -> None:
        """End every open event stream now (thread-safe): the service is going away, and a graceful shutdown
        would otherwise wait for each watching client."""
        for loop, buffer in list(streams):
            try:
                loop.call_soon_threadsafe(buffer.put, None)
            except RuntimeError:
                pass

    app.state.end_streams = end_streams

    # -- errors: always {"error": {"message", "type", "param"}}

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, type=exc.type, param=exc.param, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path[:200]}",
                   405: f"method {request.method} is not allowed on {request.url.path[:200]}"}.get(
            exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        return error_response(422, f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid')}",
                              param=loc[-1] if loc else None)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")

    async def call(fn, *args):
        """A service call in the thread pool, its errors turned into HTTP ones."""
        try:
            return await run_in_threadpool(fn, *args)
        except InvalidField as e:
            raise APIError(422, str(e), param=e.param) from None
        except QueueFull as e:
            raise APIError(429, str(e), headers={"Retry-After": str(int(e.retry_after_s))}) from None

    # -- API

    @app.post("/v1/videos")
    async def create_video(request: Request):
        body = await _read_body(request, max_body_bytes)
        fields = await _parse_fields(request, body)
        try:
            video = await call(service.submit, fields)
        except RuntimeError as e:  # QueueFull became a 429 in call(): this is a service that cannot run anything
            raise APIError(503, f"the service cannot take jobs: {str(e)[:500]}") from None
        return _JSON(video)

    @app.get("/v1/videos")
    async def list_videos(request: Request):
        q = request.query_params
        unknown = sorted(set(q) - {"limit", "after", "order"})
        if unknown:
            raise APIError(422, f"unknown query parameter {_short(unknown[0], 40)}", param=unknown[0][:100])
        limit_text = q.get("limit", "20").strip()
        if not _INT_TEXT.fullmatch(limit_text) or not 1 <= int(limit_text) <= MAX_LIST:
            raise APIError(422, f"limit must be an integer in 1..{MAX_LIST}, got {_short(limit_text)}",
                           param="limit")
        if q.get("order", "desc") != "desc":
            raise APIError(422, "order must be desc (newest first)", param="order")
        after = q.get("after") or None
        if after is not None and not VIDEO_ID.fullmatch(after):
            raise APIError(422, f"after must be a video id, got {_short(after, 40)}", param="after")
        limit = int(limit_text)
        videos = await call(service.list, limit + 1, after)
        data = videos[:limit]
        return {"object": "list", "data": data, "has_more": len(videos) > limit,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    @app.get("/v1/videos/{video_id}")
    async def get_video(video_id: str):
        video = await call(service.get, _video_id(video_id))
        if video is None:
            raise _not_found(video_id)
        return video

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str):
        video = await call(service.cancel, _video_id(video_id))
        if video is None:
            raise _not_found(video_id)
        return video

    @app.api_route("/v1/videos/{video_id}/content", methods=["GET", "HEAD"])
    async def video_content(video_id: str, request: Request):
        _video_id(video_id)
        variant = request.query_params.get("variant", "video")
        if variant == "thumbnail":  # the SDK's other asset: the latest preview stands in for it
            return await video_preview(video_id)
        if variant != "video":
            raise APIError(422, f"variant must be video or thumbnail, got {_short(variant, 40)}", param="variant")
        path = await call(service.content_path, video_id)
        if path is None:
            video = await call(service.get, video_id)
            if video is None:
                raise _not_found(video_id)
            state = "deleted" if video.get("deleted") else video.get("status")
            raise APIError(404, f"video {video_id} has no content ({state})", param="video_id")
        return _file_response(request, Path(path), "video/mp4")

    @app.get("/v1/videos/{video_id}/preview")
    async def video_preview(video_id: str):
        png = await call(service.preview_png, _video_id(video_id))
        if png is None:
            if await call(service.get, video_id) is None:
                raise _not_found(video_id)
            raise APIError(404, f"video {video_id} has no preview yet", param="video_id")
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/v1/videos/{video_id}/events")
    async def video_events(video_id: str):
        _video_id(video_id)
        if open_streams[0] >= max_streams:
            raise APIError(429, f"{max_streams} event streams are open (serve.max_streams); poll "
                           f"GET /v1/videos/{video_id} or try again later",
                           headers={"Retry-After": str(retry_after_s)})
        open_streams[0] += 1
        try:
            return await _open_stream(video_id)
        except BaseException:
            open_streams[0] -= 1
            raise

    async def _open_stream(video_id: str):
        loop = asyncio.get_running_loop()
        buffer = _EventBuffer()

        def deliver(event: str, data: dict) -> None:  # from the service's thread (or inside subscribe)
            try:
                loop.call_soon_threadsafe(buffer.put, (event, data))
            except RuntimeError:  # the loop is closed: the stream is long gone
                pass

        unsubscribe = await call(service.subscribe, video_id, deliver)
        if unsubscribe is None:
            raise _not_found(video_id)

        streams.add((loop, buffer))

        async def close():  # the response is over, however it ended
            streams.discard((loop, buffer))
            open_streams[0] -= 1
            await run_in_threadpool(unsubscribe)

        async def stream():
            while True:
                try:
                    item = await buffer.get(HEARTBEAT_S)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if item is None:  # end_streams()
                    yield ": the server is shutting down\n\n"
                    return
                if item is _EventBuffer.OVERFLOW:
                    yield ": too many events waiting for this client; reconnect for the current state\n\n"
                    return
                event, data = item
                yield f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
                if event in FINAL_EVENTS:
                    return

        return _Stream(stream(), media_type="text/event-stream", on_close=close,
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": await call(service.models)}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        for model in await call(service.models):
            if model["id"] == model_id:
                return model
        raise APIError(404, f"no model {_short(model_id, 60)}", param="model")

    @app.get("/livez")
    async def livez():
        """Liveness: 200 whenever the ingress answers (a probe that restarts what does not answer this one)."""
        return {"status": "ok"}

    @app.get("/healthz")
    async def healthz():
        """Readiness, never a liveness probe: 200 once every model replica has loaded, 503 meanwhile (loading a
        14B model takes minutes: a liveness probe on this would restart the service before it is ever up) and
        when no replica can start (the error says why)."""
        health = dict(await call(service.health))
        if health.get("ready"):
            health.pop("error", None)
            return {"status": "ok", **health}
        problem = health.pop("error", None)
        message = problem or f"replicas loading ({health.get('replicas_up', 0)} of {health.get('replicas', '?')} up)"
        return _JSON({"status": "error" if problem else "starting", **health,
                      "error": {"message": message, "type": "service_unavailable_error", "param": None}},
                     status_code=503)

    # -- the web page

    @app.get("/")
    async def index():
        page = static_dir / "index.html"
        if not page.is_file():
            raise APIError(404, "the web page is not installed")
        return FileResponse(page, media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=static_dir, check_dir=False), name="static")

    if token is not None:
        app.add_middleware(_BearerAuth, token=token)
    app.add_middleware(_SameOrigin, host=host, token=token is not None)  # before the token: a rebound page has none
    app.add_middleware(_SecurityHeaders)  # the last added is the outermost: a 401 or 421 gets the headers too
    return app
