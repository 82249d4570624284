"""The HTTP surface of `odyssey serve` (cluster/serve/api.py) over a fake VideoService: every route, field coercion
from JSON, multipart and urlencoded bodies, every error code and its JSON shape, Range requests, Server-Sent Events
(order, late join, heartbeat, unsubscribe on disconnect), auth, body limits and Retry-After. The real service
behind it, through Ray Serve and the OpenAI SDK: tests/test_serve_e2e.py."""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient

from cluster.serve import api
from cluster.serve.api import create_app, parse_range
from cluster.serve.service import InvalidField, QueueFull

TOKEN = "s3cret-token-for-tests"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))


class FakeService:
    """VideoService's interface with scripted state: what it was asked is recorded, events are pushed by the test
    (from another thread, as the real service's pump does)."""

    model_name = "tiny"

    def __init__(self, folder: Path):
        self.folder = folder
        self.videos: dict[str, dict] = {}  # insertion order = creation order
        self.submitted: list[dict] = []
        self.subscribers: dict[str, list] = {}
        self.unsubscribed: list[str] = []
        self.paths: dict[str, Path] = {}
        self.previews: dict[str, bytes] = {}
        self.queue_full = False
        self.broken: str | None = None
        self.ready = True
        self.lock = threading.Lock()

    # -- the interface
    def health(self):
        return {"ready": self.ready, "replicas_up": int(self.ready), "replicas": 1, "queued": 0, "running": 0,
                "error": None}

    def models(self):
        return [{"id": "tiny", "object": "model", "created": 1, "owned_by": "odyssey"}]

    def submit(self, fields):
        self.submitted.append(fields)
        if self.broken:
            raise RuntimeError(self.broken)
        if self.queue_full:
            raise QueueFull("1000 jobs are queued (serve.max_queued); try again later", 7)
        if fields.get("model") not in (None, "tiny"):
            raise InvalidField("model", f"unknown model {fields['model']!r}; this server serves 'tiny'")
        if fields.get("steps") is not None and fields["steps"] > 1000:
            raise InvalidField("steps", f"steps {fields['steps']} is over the limit 1000 (limits.max_steps)")
        return self.add(prompt=fields["prompt"])

    def get(self, video_id):
        return self.videos.get(video_id)

    def list(self, limit=20, after=None):
        newest = list(reversed(self.videos.values()))
        if after is not None:
            ids = [v["id"] for v in newest]
            newest = newest[ids.index(after) + 1:] if after in ids else []
        return newest[:limit]

    def cancel(self, video_id):
        video = self.videos.get(video_id)
        if video is None:
            return None
        video.update(status="cancelled", deleted=True)
        self.emit(video_id, "cancelled", dict(video))
        return dict(video)

    def content_path(self, video_id):
        return self.paths.get(video_id)

    def preview_png(self, video_id):
        return self.previews.get(video_id)

    def subscribe(self, video_id, callback):
        video = self.videos.get(video_id)
        if video is None:
            return None
        callback("state", dict(video))
        if video["status"] in ("completed", "failed", "cancelled"):
            callback(video["status"], dict(video))
            return lambda: None
        with self.lock:
            self.subscribers.setdefault(video_id, []).append(callback)

        def unsubscribe():
            with self.lock:
                self.subscribers[video_id].remove(callback)
                self.unsubscribed.append(video_id)

        return unsubscribe

    def close(self):
        pass

    # -- test helpers
    def add(self, status="queued", prompt="a red circle moving right"):
        video_id = f"video_{secrets.token_hex(12)}"
        self.videos[video_id] = {"id": video_id, "object": "video", "status": status, "progress": 0,
                                 "created_at": int(time.time()), "prompt": prompt, "model": "tiny", "deleted": False}
        return dict(self.videos[video_id])

    def emit(self, video_id, event, data):
        with self.lock:
            callbacks = list(self.subscribers.get(video_id, ()))
        for cb in callbacks:
            cb(event, data)

    def wait_subscribed(self, video_id, timeout=10):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if self.subscribers.get(video_id):
                    return
            time.sleep(0.01)
        raise AssertionError("the stream never subscribed")


@pytest.fixture
def service(tmp_path):
    return FakeService(tmp_path)


@pytest.fixture
def web(tmp_path):
    folder = tmp_path / "web"
    folder.mkdir()
    (folder / "index.html").write_text("<!doctype html><title>Odyssey</title>")
    (folder / "app.js").write_text("console.log('odyssey')")
    (tmp_path / "secret.txt").write_text("outside the web folder")
    return folder


def _client(app, base_url="http://127.0.0.1:8000"):
    """A client of the app in-process, as a user on this machine reaches it (the Host a browser sends)."""
    return TestClient(app, base_url=base_url, raise_server_exceptions=False)


@pytest.fixture
def client(service, web):
    return _client(create_app(service, static_dir=web))


def assert_error(response, status, param=None, type_=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error"} and set(body["error"]) == {"message", "type", "param"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["param"] == param, body
    if type_ is not None:
        assert body["error"]["type"] == type_, body
    return body["error"]


# -- POST /v1/videos: JSON, multipart, urlencoded ---------------------------------------------------------------


def test_create_from_json_keeps_json_types(client, service):
    body = {"prompt": "a red circle moving right", "model": "tiny", "seed": 3, "steps": 4, "frames": 9, "fps": 8,
            "guidance_scale": 5, "seconds": "2", "size": "32x32", "negative_prompt": "", "sampler": "euler",
            "cache": "fbcache:0.1"}
    r = client.post("/v1/videos", json={**body, "sampler": None})
    assert r.status_code == 200, r.text
    video = r.json()
    assert video["status"] == "queued" and video["id"] in service.videos
    fields = service.submitted[-1]
    expected = {**body, "guidance_scale": 5.0}
    del expected["sampler"]  # null = absent
    assert fields == expected
    assert type(fields["seed"]) is int and type(fields["guidance_scale"]) is float and fields["negative_prompt"] == ""


def test_create_from_multipart_as_the_openai_sdk_sends_it(client, service):
    form = {"prompt": "  a blue ball moving up ", "model": "tiny", "seconds": "2.1", "size": "32x32", "seed": "3",
            "steps": " 4 ", "guidance_scale": "4.5", "negative_prompt": "", "sampler": "", "cache": "", "fps": "",
            "frames": " "}
    r = client.post("/v1/videos", files={k: (None, v) for k, v in form.items()})
    assert r.status_code == 200, r.text
    assert service.submitted[-1] == {"prompt": "  a blue ball moving up ", "model": "tiny", "seconds": "2.1",
                                     "size": "32x32", "seed": 3, "steps": 4, "guidance_scale": 4.5}


def test_create_from_urlencoded_form(client, service):
    r = client.post("/v1/videos", data={"prompt": "a white square moving left", "frames": "17", "fps": "+8",
                                        "guidance_scale": "1e0"})
    assert r.status_code == 200, r.text
    assert service.submitted[-1] == {"prompt": "a white square moving left", "frames": 17, "fps": 8,
                                     "guidance_scale": 1.0}


def test_low_noise_guidance_scale_is_a_number_field_in_every_encoding(client, service):
    """Two-expert models (Wan2.2 T2V-A14B) take the low-noise expert's guidance like guidance_scale: a JSON number
    (an int becomes a float), a form's text parsed strictly; a string in JSON or a non-number in a form is a 422."""
    r = client.post("/v1/videos", json={"prompt": "a red circle", "guidance_scale": 4, "low_noise_guidance_scale": 3})
    assert r.status_code == 200, r.text
    assert service.submitted[-1] == {"prompt": "a red circle", "guidance_scale": 4.0, "low_noise_guidance_scale": 3.0}
    assert type(service.submitted[-1]["low_noise_guidance_scale"]) is float
    r = client.post("/v1/videos", files={"prompt": (None, "a red circle"), "low_noise_guidance_scale": (None, " 2.5")})
    assert r.status_code == 200, r.text
    assert service.submitted[-1] == {"prompt": "a red circle", "low_noise_guidance_scale": 2.5}
    r = client.post("/v1/videos", data={"prompt": "a red circle", "low_noise_guidance_scale": ""})
    assert r.status_code == 200 and service.submitted[-1] == {"prompt": "a red circle"}  # empty: the default
    submitted = len(service.submitted)
    for bad in ({"json": {"prompt": "x", "low_noise_guidance_scale": "3"}},
                {"json": {"prompt": "x", "low_noise_guidance_scale": True}},
                {"data": {"prompt": "x", "low_noise_guidance_scale": "nan"}},
                {"files": {"prompt": (None, "x"), "low_noise_guidance_scale": (None, "3,5")}}):
        err = assert_error(client.post("/v1/videos", **bad), 422, param="low_noise_guidance_scale")
        assert "low_noise_guidance_scale" in err["message"]
    assert len(service.submitted) == submitted


@pytest.mark.parametrize("field,value", [
    ("steps", "4.5"), ("steps", "four"), ("steps", "1e3"), ("seed", "0x10"), ("frames", "nan"),
    ("guidance_scale", "nan"), ("guidance_scale", "inf"), ("guidance_scale", "-Infinity"), ("guidance_scale", "1,5"),
    ("guidance_scale", "1e999"), ("guidance_scale", "1e99999"), ("steps", "9" * 40),
])
@pytest.mark.parametrize("encoding", ["multipart", "urlencoded"])
def test_form_numbers_are_strict(client, service, field, value, encoding):
    form = {"prompt": "a red circle moving right", field: value}
    r = (client.post("/v1/videos", files={k: (None, v) for k, v in form.items()}) if encoding == "multipart"
         else client.post("/v1/videos", data=form))
    assert_error(r, 422, param=field, type_="invalid_request_error")
    assert not service.submitted


@pytest.mark.parametrize("field,value", [
    ("steps", True), ("steps", "4"), ("steps", 4.0), ("steps", 4.5), ("seed", [3]), ("guidance_scale", False),
    ("guidance_scale", "5"), ("guidance_scale", 10**400), ("prompt", 7), ("size", 32), ("seconds", True),
    ("seconds", {"s": 1}), ("seconds", 10**400),
    ("negative_prompt", ["x"]),
])
def test_json_types_are_checked(client, service, field, value):
    r = client.post("/v1/videos", json={"prompt": "a red circle moving right", field: value})
    err = assert_error(r, 422, param=field)
    assert field in err["message"]
    assert not service.submitted


@pytest.mark.parametrize("send", ["json", "multipart", "urlencoded"])
def test_unknown_and_unsupported_fields_are_named(client, service, send):
    def post(form):
        if send == "json":
            return client.post("/v1/videos", json=form)
        if send == "multipart":
            return client.post("/v1/videos", files={k: (None, str(v)) for k, v in form.items()})
        return client.post("/v1/videos", data=form)

    err = assert_error(post({"prompt": "x", "stepz": "4"}), 422, param="stepz")
    assert "stepz" in err["message"] and "steps" in err["message"]  # the known names help the typo
    err = assert_error(post({"prompt": "x", "input_reference": "img"}), 422, param="input_reference")
    assert "text only" in err["message"]
    assert_error(post({"model": "tiny"}), 422, param="prompt")
    assert not service.submitted


def test_form_field_twice_or_as_a_file_is_refused(client, service):
    r = client.post("/v1/videos", content=b"prompt=a&prompt=b", headers={"content-type":
                                                                       "application/x-www-form-urlencoded"})
    assert_error(r, 422, param="prompt")
    r = client.post("/v1/videos", files={"prompt": ("p.txt", b"a red circle", "text/plain")})
    assert_error(r, 422, param="prompt")
    r = client.post("/v1/videos", files={"prompt": (None, "a red circle"),
                                         "input_reference": ("ref.png", PNG, "image/png")})
    assert_error(r, 422, param="input_reference")
    assert not service.submitted


def test_bad_bodies(client, service):
    for raw in (b"{", b"[1, 2]", b'"prompt"', b'{"prompt": "x", "guidance_scale": NaN}', b"\xff\xfe",
                b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}"):
        r = client.post("/v1/videos", content=raw, headers={"content-type": "application/json"})
        assert_error(r, 400)
    r = client.post("/v1/videos", content=b'{"prompt": "a", "prompt": "b"}',
                    headers={"content-type": "application/json"})
    assert_error(r, 422, param="prompt")
    r = client.post("/v1/videos", content=b"prompt", headers={"content-type": "text/plain"})
    assert_error(r, 415)
    r = client.post("/v1/videos", content=b"--x\r\nnot multipart", headers={"content-type":
                                                                          "multipart/form-data; boundary=zz"})
    assert r.status_code in (400, 422), r.text  # never a 500
    assert_error(r, r.status_code, param=r.json()["error"]["param"])
    # no Content-Type at all is refused: what a no-cors fetch of a Blob sends from any web page
    r = client.post("/v1/videos", content=json.dumps({"prompt": "a red circle moving right"}).encode())
    assert_error(r, 415)
    assert "Content-Type" in r.json()["error"]["message"]
    assert service.submitted == []


def test_replies_never_fail_to_encode(client, service):
    """JSON's "\\ud800" escape decodes to a lone surrogate, which has no UTF-8 form: a field NAME holding one is a
    422 (values are the service's to refuse), and any text of the service holding one still goes out as JSON."""
    for raw in (b'{"prompt": "x", "\\ud800": 1}', b'{"prompt": "x", "\\udc80x": 1, "\\udc80x": 2}'):
        r = client.post("/v1/videos", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        err = assert_error(r, 422, param=r.json()["error"]["param"])
        assert err["param"].startswith("\\ud"), err  # written as its escape
        assert "not valid text" in err["message"] or "more than once" in err["message"], err
    assert service.submitted == []
    video = service.add(prompt="a record from before \udc80 was refused")
    r = client.get(f"/v1/videos/{video['id']}")
    assert r.status_code == 200 and r.json()["prompt"] == video["prompt"]
    assert client.get("/v1/videos").json()["data"][0]["prompt"] == video["prompt"]
    # UTF-8 as such stays UTF-8 (escaping is only the fallback)
    utf8 = service.add(prompt="un cercle rouge, été")
    assert "été".encode() in client.get(f"/v1/videos/{utf8['id']}").content


def test_service_errors_map_to_422_429_503(client, service):
    assert_error(client.post("/v1/videos", json={"prompt": "x", "model": "sora-2"}), 422, param="model")
    assert_error(client.post("/v1/videos", json={"prompt": "x", "steps": 5000}), 422, param="steps")
    service.queue_full = True
    r = client.post("/v1/videos", json={"prompt": "x"})
    assert_error(r, 429, type_="rate_limit_error")
    assert r.headers["retry-after"] == "7"
    service.queue_full, service.broken = False, "no replica can start: bad weights"
    err = assert_error(client.post("/v1/videos", json={"prompt": "x"}), 503)
    assert "bad weights" in err["message"]


def test_body_over_the_limit_is_413_before_parsing(service, web):
    client = _client(create_app(service, max_body_bytes=100, static_dir=web))
    big = json.dumps({"prompt": "x" * 200}).encode()
    assert_error(client.post("/v1/videos", content=big, headers={"content-type": "application/json"}), 413)

    def chunks():  # no Content-Length: chunked, counted while reading
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 10
        yield b'"}'

    assert_error(client.post("/v1/videos", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert not service.submitted
    ok = json.dumps({"prompt": "x" * 50}).encode()
    assert client.post("/v1/videos", content=ok, headers={"content-type": "application/json"}).status_code == 200


def test_lying_content_length_is_still_counted(service, web):
    """A declared length under the limit does not let a longer body through (the ASGI body is counted)."""
    import asyncio

    app = create_app(service, max_body_bytes=100, static_dir=web)
    body = json.dumps({"prompt": "x" * 300}).encode()
    sent = []

    async def run():
        parts = [body[i:i + 50] for i in range(0, len(body), 50)]

        async def receive():
            if parts:
                return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/videos", "raw_path": b"/v1/videos",
                 "query_string": b"", "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                                                          (b"content-length", b"10")],
                 "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "scheme": "http",
                 "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}
        await app(scope, receive, send)

    asyncio.run(run())
    assert sent[0]["status"] == 413
    assert json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]["type"] == "invalid_request_error"
    assert not service.submitted


# -- reading videos -------------------------------------------------------------------------------------------


def test_get_list_and_delete(client, service):
    ids = [service.add()["id"] for _ in range(5)]  # oldest first
    r = client.get(f"/v1/videos/{ids[2]}")
    assert r.status_code == 200 and r.json()["id"] == ids[2]
    page = client.get("/v1/videos", params={"limit": 2}).json()
    assert page["object"] == "list" and [v["id"] for v in page["data"]] == [ids[4], ids[3]]
    assert page["has_more"] is True and page["first_id"] == ids[4] and page["last_id"] == ids[3]
    page = client.get("/v1/videos", params={"limit": 2, "after": page["last_id"]}).json()
    assert [v["id"] for v in page["data"]] == [ids[2], ids[1]] and page["has_more"] is True
    page = client.get("/v1/videos", params={"limit": 2, "after": page["last_id"]}).json()
    assert [v["id"] for v in page["data"]] == [ids[0]] and page["has_more"] is False
    page = client.get("/v1/videos").json()
    assert len(page["data"]) == 5 and page["has_more"] is False
    page = client.get("/v1/videos", params={"limit": 5}).json()
    assert len(page["data"]) == 5 and page["has_more"] is False
    empty = client.get("/v1/videos", params={"after": ids[0]}).json()
    assert empty == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
    for params, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "2.5"}, "limit"),
                          ({"after": "../etc"}, "after"), ({"order": "asc"}, "order"), ({"page": 2}, "page")):
        assert_error(client.get("/v1/videos", params=params), 422, param=param)

    r = client.delete(f"/v1/videos/{ids[1]}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["deleted"] is True


@pytest.mark.parametrize("method,suffix", [("GET", ""), ("DELETE", ""), ("GET", "/content"), ("GET", "/preview"),
                                          ("GET", "/events")])
def test_unknown_and_malformed_ids_are_404(client, method, suffix):
    for video_id in (f"video_{'0' * 24}", "video_123", f"video_{'A' * 24}", f"video_{'0' * 24}0", "x" * 300,
                     "..%2f..%2fsecret"):
        r = client.request(method, f"/v1/videos/{video_id}{suffix}")
        assert_error(r, 404, param=None if "%2f" in video_id else "video_id")  # %2f: no route at all


def test_routes_and_methods_errors_are_json(client):
    err = assert_error(client.get("/v1/nothing"), 404)
    assert "/v1/nothing" in err["message"]
    r = client.put("/v1/videos")
    assert_error(r, 405)
    assert "POST" in r.headers["allow"]
    assert_error(client.post("/healthz"), 405)
    assert r.headers["x-content-type-options"] == "nosniff"


def _video_file(service, tmp_path, size=1000):
    video = service.add(status="completed")
    path = tmp_path / f"{video['id']}.mp4"
    data = bytes((i * 7) % 251 for i in range(size))
    path.write_bytes(data)
    service.paths[video["id"]] = path
    return video["id"], data


def test_content_whole_and_ranges(client, service, tmp_path):
    video_id, data = _video_file(service, tmp_path)
    url = f"/v1/videos/{video_id}/content"
    r = client.get(url)
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-type"] == "video/mp4" and r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-length"] == str(len(data))
    etag = r.headers["etag"]
    for header, (start, end) in {"bytes=0-9": (0, 9), "bytes=990-": (990, 999), "bytes=-15": (985, 999),
                                 "bytes=500-5000": (500, 999), "bytes = 3-3": (3, 3), "bytes=-5000": (0, 999)}.items():
        r = client.get(url, headers={"range": header})
        assert r.status_code == 206, header
        assert r.content == data[start:end + 1], header
        assert r.headers["content-range"] == f"bytes {start}-{end}/{len(data)}", header
        assert r.headers["content-length"] == str(end - start + 1)
    for header in ("bytes=1000-", "bytes=5000-6000", "bytes=-0"):
        r = client.get(url, headers={"range": header})
        assert_error(r, 416, param="range")
        assert r.headers["content-range"] == f"bytes */{len(data)}"
    for header in ("bytes=0-1,5-6", "items=0-1", "bytes=9-3", "bytes=-"):  # ignored: the whole file
        r = client.get(url, headers={"range": header})
        assert r.status_code == 200 and r.content == data, header
    r = client.get(url, headers={"range": "bytes=10-19", "if-range": etag})
    assert r.status_code == 206 and r.content == data[10:20]
    r = client.get(url, headers={"range": "bytes=10-19", "if-range": '"stale"'})
    assert r.status_code == 200 and r.content == data
    r = client.head(url, headers={"range": "bytes=0-9"})
    assert r.status_code == 206 and r.headers["content-length"] == "10" and r.content == b""
    r = client.get(url, params={"variant": "spritesheet"})
    assert_error(r, 422, param="variant")


def test_parse_range_edges():
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=0-", 0) == "unsatisfiable"
    assert parse_range("bytes=-3", 0) == "unsatisfiable"
    assert parse_range("bytes=-3", 2) == (0, 1)
    assert parse_range("bytes=9999999999999999999-", 10) == "unsatisfiable"  # 19 digits: still a number
    for huge in ("bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes=-" + "9" * 5000, "bytes=" + "1" * 20 + "-"):
        assert parse_range(huge, 10) is None  # past any file: ignored as RFC 9110 allows (was int() of 5000 digits)


def test_a_huge_range_number_is_not_a_500(client, service, tmp_path):
    video_id, data = _video_file(service, tmp_path)
    r = client.get(f"/v1/videos/{video_id}/content", headers={"range": "bytes=" + "9" * 5000 + "-"})
    assert r.status_code == 200 and r.content == data


def test_content_is_404_until_completed_and_never_through_a_link(client, service, tmp_path):
    queued = service.add()["id"]
    err = assert_error(client.get(f"/v1/videos/{queued}/content"), 404, param="video_id")
    assert "queued" in err["message"]
    video_id, _ = _video_file(service, tmp_path)
    link = tmp_path / "link.mp4"
    link.symlink_to(tmp_path / "secret.txt")
    service.paths[video_id] = link  # the service would never name one: the API still does not follow it
    assert_error(client.get(f"/v1/videos/{video_id}/content"), 404, param="video_id")
    service.paths[video_id] = tmp_path / "gone.mp4"
    assert_error(client.get(f"/v1/videos/{video_id}/content"), 404, param="video_id")


def test_preview(client, service):
    video_id = service.add(status="in_progress")["id"]
    err = assert_error(client.get(f"/v1/videos/{video_id}/preview"), 404, param="video_id")
    assert "preview" in err["message"]
    service.previews[video_id] = PNG
    r = client.get(f"/v1/videos/{video_id}/preview")
    assert r.status_code == 200 and r.content == PNG and r.headers["content-type"] == "image/png"
    assert r.headers["cache-control"] == "no-store"
    r = client.get(f"/v1/videos/{video_id}/content", params={"variant": "thumbnail"})
    assert r.status_code == 200 and r.content == PNG


def test_models_and_healthz(client, service):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert client.get("/v1/models/tiny").json()["owned_by"] == "odyssey"
    assert_error(client.get("/v1/models/sora-2"), 404, param="model")
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["replicas_up"] == 1
    service.ready = False
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "starting" and r.json()["ready"] is False
    assert_error(r, 503, type_="service_unavailable_error")
    assert "0 of 1" in r.json()["error"]["message"]


def test_livez_answers_while_replicas_load(service, web):
    """/livez is for liveness probes: 200 as long as the ingress answers, while /healthz (readiness) says 503
    during the minutes a big model loads, and with a token it stays open like /healthz."""
    service.ready = False
    for client in (_client(create_app(service, static_dir=web)),
                   _client(create_app(service, static_dir=web, token=TOKEN))):
        assert client.get("/healthz").status_code == 503
        r = client.get("/livez")
        assert r.status_code == 200 and r.json() == {"status": "ok"}


# -- the web page -----------------------------------------------------------------------------------------------


def test_web_page_and_static_files(client, web):
    r = client.get("/")
    assert r.status_code == 200 and "Odyssey" in r.text and r.headers["content-type"].startswith("text/html")
    r = client.get("/static/app.js")
    assert r.status_code == 200 and "odyssey" in r.text
    assert_error(client.get("/static/missing.js"), 404)
    for path in ("/static/../secret.txt", "/static/%2e%2e/secret.txt", "/static/..%2fsecret.txt"):
        r = client.get(path)
        assert r.status_code == 404 and "outside" not in r.text, path


def test_default_web_folder_is_the_packages(service):
    client = _client(create_app(service))
    r = client.get("/")
    assert r.status_code == 200 and r.text == (api.WEB_DIR / "index.html").read_text()


# -- same origin: DNS rebinding and cross-site requests ---------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "LocalHost", "[::1]:8000", "127.0.0.1:9000",
                                  "192.168.1.7:8000", "[fe80::1]:8000"])
def test_addresses_and_localhost_are_answered(service, web, host):
    """A name is what rebinding forges: addresses and localhost cannot be, whatever the port (a port forward)."""
    client = _client(create_app(service, static_dir=web))
    for path in ("/v1/videos", "/healthz", "/"):
        assert client.get(path, headers={"host": host}).status_code == 200, (host, path)


def test_a_rebound_name_is_refused_on_every_path(client, service):
    """DNS rebinding: a page on attacker.example whose name now resolves to 127.0.0.1 is same-origin with the server
    in the browser's eyes; its requests carry its own name in Host and get 421 everywhere, before any work."""
    video_id = service.add()["id"]
    for method, path in (("GET", "/v1/videos"), ("GET", f"/v1/videos/{video_id}"), ("GET", "/"),
                         ("GET", "/healthz"), ("GET", "/livez"), ("GET", "/static/app.js"), ("POST", "/v1/videos"),
                         ("DELETE", f"/v1/videos/{video_id}"), ("GET", f"/v1/videos/{video_id}/events")):
        r = client.request(method, path, headers={"host": "attacker.example:8000"}, json={"prompt": "x"})
        assert_error(r, 421)
        assert r.headers["x-content-type-options"] == "nosniff"
    assert service.submitted == [] and service.videos[video_id]["status"] == "queued"
    assert service.subscribers == {}
    for bad in ("a b", "x/y", "host:80:80", "host:123456", "[::1"):
        assert_error(client.get("/v1/videos", headers={"host": bad}), 400)


def test_no_host_header_is_a_400(service, web):
    import asyncio

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/v1/videos", "raw_path": b"/v1/videos", "query_string": b"",
             "headers": [], "asgi": {"version": "3.0"}, "http_version": "1.0", "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}
    asyncio.run(create_app(service, static_dir=web)(scope, receive, send))
    assert sent[0]["status"] == 400
    assert "Host" in json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]["message"]


def test_names_a_server_answers_to(service, web):
    auth = {"authorization": f"Bearer {TOKEN}"}
    # started on a name (--host gpu.lan --insecure): that name and addresses; no other name
    client = _client(create_app(service, static_dir=web, host="gpu.lan"))
    assert client.get("/v1/videos", headers={"host": "GPU.lan:8000"}).status_code == 200
    assert_error(client.get("/v1/videos", headers={"host": "other.lan:8000"}), 421)
    # a wildcard without a token (--insecure): addresses and this machine's own names
    client = _client(create_app(service, static_dir=web, host="0.0.0.0"))
    assert client.get("/v1/videos", headers={"host": f"{socket.gethostname()}:8000"}).status_code == 200
    assert client.get("/v1/videos", headers={"host": "10.0.0.7:8000"}).status_code == 200
    assert_error(client.get("/v1/videos", headers={"host": "attacker.example"}), 421)
    # a non-loopback address with a token: any name (a Kubernetes Service's; a rebound page has no token)
    for host in ("0.0.0.0", "::", "10.0.0.7"):
        client = _client(create_app(service, static_dir=web, host=host, token=TOKEN))
        r = client.get("/v1/videos", headers={"host": "odyssey-serve-svc.default.svc:8000", **auth})
        assert r.status_code == 200, (host, r.text)
        assert_error(client.get("/v1/videos", headers={"host": "anything.example"}), 401)
    # loopback with a token: the token does not widen the names
    client = _client(create_app(service, static_dir=web, token=TOKEN))
    assert_error(client.get("/v1/videos", headers={"host": "attacker.example", **auth}), 421)


def test_cross_site_writes_are_refused(client, service):
    """A plain HTML form or a no-cors fetch from any page the user visits reaches a loopback server; the browser
    marks it with Origin (and Sec-Fetch-Site): POST and DELETE from another origin are 403, nothing done."""
    video_id = service.add()["id"]
    form = {"prompt": "x"}
    for headers in ({"origin": "http://attacker.example"}, {"origin": "null"}, {"origin": "http://127.0.0.1:9999"},
                    {"origin": "http://localhost:8000"},  # another name of this machine is another origin
                    {"origin": "http://127.0.0.1:8000.attacker.example"}, {"sec-fetch-site": "cross-site"},
                    {"origin": "http://127.0.0.1:8000", "sec-fetch-site": "cross-site"}):
        assert_error(client.post("/v1/videos", data=form, headers=headers), 403, type_="permission_error")
        assert_error(client.post("/v1/videos", json=form, headers=headers), 403)
        assert_error(client.delete(f"/v1/videos/{video_id}", headers=headers), 403)
    assert service.submitted == [] and service.videos[video_id]["status"] == "queued"
    # the page itself (same origin) and programs (no Origin: curl, the OpenAI SDK) pass
    same = {"origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"}
    assert client.post("/v1/videos", json=form, headers=same).status_code == 200
    assert client.post("/v1/videos", json=form).status_code == 200
    # behind a reverse proxy that sets X-Forwarded-Host (its Host is the upstream's)
    proxied = {"origin": "https://video.example.com", "x-forwarded-host": "video.example.com"}
    assert client.post("/v1/videos", json=form, headers=proxied).status_code == 200
    # reading is left alone: the browser does not show a cross-origin answer to the page that asked
    assert client.get("/v1/videos", headers={"origin": "http://attacker.example"}).status_code == 200
    assert client.delete(f"/v1/videos/{video_id}", headers=same).json()["status"] == "cancelled"


# -- auth -------------------------------------------------------------------------------------------------------


def test_token_guards_every_api_route_and_leaves_the_page_open(service, web, tmp_path):
    client = _client(create_app(service, token=TOKEN, static_dir=web))
    video_id, _ = _video_file(service, tmp_path)
    guarded = [("GET", "/v1/videos"), ("POST", "/v1/videos"), ("GET", f"/v1/videos/{video_id}"),
               ("GET", f"/v1/videos/{video_id}/content"), ("GET", f"/v1/videos/{video_id}/preview"),
               ("GET", f"/v1/videos/{video_id}/events"), ("DELETE", f"/v1/videos/{video_id}"),
               ("GET", "/v1/models"), ("GET", "/v1/unknown"), ("GET", "/elsewhere")]
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN},
                    {"authorization": f"Basic {TOKEN}"}, {"authorization": f"Bearer {TOKEN}x"}):
        for method, path in guarded:
            r = client.request(method, path, headers=headers, json={"prompt": "x"})
            assert_error(r, 401, type_="authentication_error")
            assert r.headers["www-authenticate"].startswith("Bearer")
    assert not service.submitted and service.videos[video_id]["status"] == "completed"
    ok = {"authorization": f"Bearer {TOKEN}"}
    assert client.get("/v1/videos", headers=ok).status_code == 200
    assert client.get("/v1/videos", headers={"authorization": f"bearer  {TOKEN} "}).status_code == 200
    assert client.post("/v1/videos", headers=ok, json={"prompt": "x"}).status_code == 200
    assert client.get(f"/v1/videos/{video_id}/content", headers=ok).status_code == 200
    for path in ("/", "/static/app.js", "/healthz"):  # open: the page asks for the token itself
        assert client.get(path).status_code == 200, path
    with pytest.raises(ValueError):
        create_app(service, token="")


# -- Server-Sent Events -----------------------------------------------------------------------------------------


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        events.append((fields["event"], json.loads(fields["data"])))
    return events


@contextlib.contextmanager
def serving(app):
    """The app on a real server (uvicorn on a free loopback port): streams arrive as they are sent."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def live(service, web):
    app = create_app(service, static_dir=web)
    service.app = app  # for tests that end the streams as the deployment's shutdown does
    with serving(app) as url:
        yield url


def test_events_of_a_finished_job_are_state_then_final(service, live):
    video = service.add(status="completed")
    with httpx.Client(base_url=live, timeout=5) as http:  # a stream that never ends: ReadTimeout (heartbeat 15 s)
        r = http.get(f"/v1/videos/{video['id']}/events")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    events = parse_sse(r.text)
    assert [e for e, _ in events] == ["state", "completed"] and events[0][1]["id"] == video["id"]


def _read_events(response):
    buffer = ""
    for chunk in response.iter_text():
        buffer += chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            yield block


def test_live_events_arrive_in_order_and_end_after_the_final_one(service, live):
    video_id = service.add()["id"]
    service.previews[video_id] = PNG
    sent = [("started", {"attempt": 1, "replica": 0})]
    sent += [("progress", {"stage": "denoise", "step": s, "total": 4, "progress": 2 + 22 * s}) for s in range(1, 5)]
    sent += [("preview", {"step": 2, "total": 4, "image": "data:image/png;base64,AAAA"})]
    sent += [("frame", {"index": i, "total": 3, "progress": 90 + 3 * i}) for i in range(3)]
    sent += [("completed", {"id": video_id, "status": "completed", "progress": 100})]
    with httpx.Client(base_url=live, timeout=5) as http, http.stream("GET", f"/v1/videos/{video_id}/events") as r:
        assert r.status_code == 200
        blocks = _read_events(r)
        first = parse_sse(next(blocks))
        assert first[0][0] == "state" and first[0][1]["id"] == video_id
        service.wait_subscribed(video_id)

        def push():
            for event, data in sent:
                service.emit(video_id, event, data)
            service.emit(video_id, "progress", {"after": "final"})  # never seen: the stream ended

        threading.Thread(target=push).start()
        got = [parse_sse(b)[0] for b in blocks]
    assert got == sent
    deadline = time.time() + 5
    while video_id not in service.unsubscribed and time.time() < deadline:
        time.sleep(0.02)
    assert service.unsubscribed == [video_id]


def test_a_client_that_leaves_is_unsubscribed_and_heartbeats_flow(service, live, monkeypatch):
    monkeypatch.setattr(api, "HEARTBEAT_S", 0.2)
    video_id = service.add(status="in_progress")["id"]
    with httpx.Client(base_url=live, timeout=20) as http:
        with http.stream("GET", f"/v1/videos/{video_id}/events") as r:
            raw, checked = "", False
            for chunk in r.iter_text():
                raw += chunk
                if not checked and "event: state" in raw:
                    # while the client still reads: leaving the loop below closes the response (httpx)
                    service.wait_subscribed(video_id)
                    assert service.unsubscribed == []
                    checked = True
                if raw.count(": keep-alive") >= 2:
                    break
            assert checked and parse_sse(raw)[0][0] == "state"
        # the response is closed: the server notices and lets go of the subscription
        deadline = time.time() + 10
        while video_id not in service.unsubscribed and time.time() < deadline:
            time.sleep(0.02)
    assert service.unsubscribed == [video_id]
    assert service.subscribers[video_id] == []


def _asgi_get(app, path: str, receive) -> list[dict]:
    import asyncio

    sent = []

    async def send(message):  # a slow client: the body outlasts the connection
        sent.append(message)
        await asyncio.sleep(0.02)

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"host", b"127.0.0.1:8000")], "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    return sent


@pytest.mark.parametrize("suffix", ["events", "content"])
def test_a_receive_that_raises_is_a_disconnect(service, web, tmp_path, suffix):
    """Behind Ray Serve's proxy, receive() raises TaskCancelledError when the client leaves: the stream ends
    and lets go of its subscription, quietly (no 500, no traceback per closed tab)."""
    import asyncio

    video_id = service.add(status="in_progress")["id"]
    if suffix == "content":
        video_id, _ = _video_file(service, tmp_path, size=api.CHUNK_BYTES * 40)
    calls = 0

    async def receive():
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(0.2)
        raise RuntimeError("Task was cancelled (what Ray Serve raises)")

    sent = _asgi_get(create_app(service, static_dir=web), f"/v1/videos/{video_id}/{suffix}", receive)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    if suffix == "events":
        assert service.unsubscribed == [video_id]
    else:
        assert sent[-1].get("more_body") is True, "the whole file went out before the client left: no test"


def test_open_streams_are_bounded(service, web):
    """serve.max_streams: each stream holds one of the ingress's concurrent requests; past the bound, 429."""
    first, second = service.add(status="in_progress")["id"], service.add(status="in_progress")["id"]
    with serving(create_app(service, static_dir=web, max_streams=1)) as url, \
            httpx.Client(base_url=url, timeout=5) as http:
        with http.stream("GET", f"/v1/videos/{first}/events") as r:
            assert r.status_code == 200
            service.wait_subscribed(first)
            refused = http.get(f"/v1/videos/{second}/events")
            assert_error(refused, 429, type_="rate_limit_error")
            assert refused.headers["retry-after"] == "10"
            assert_error(http.get(f"/v1/videos/video_{'0' * 24}/events"), 429)  # counted before the lookup
        deadline = time.time() + 5  # the first client left: its slot is free again
        while service.unsubscribed != [first] and time.time() < deadline:
            time.sleep(0.02)
        assert_error(http.get(f"/v1/videos/video_{'0' * 24}/events"), 404, param="video_id")  # frees its slot
        with http.stream("GET", f"/v1/videos/{second}/events") as r:
            assert r.status_code == 200


def test_a_client_that_never_reads_holds_a_bounded_buffer(service, web):
    """A client whose TCP window is full (it never reads) blocks the stream's send: what the service emits
    meanwhile must not pile up. It gets the newest progress and preview, in order, and every final event."""
    import asyncio

    video_id = service.add(status="in_progress")["id"]
    steps, previews = 5000, 40
    released, sent, requested = threading.Event(), [], []

    async def receive():
        if not requested:
            requested.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(120)  # the client never leaves
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message.get("body") and not released.is_set():  # the `state` event went out; then the window is full
            await asyncio.get_running_loop().run_in_executor(None, released.wait, 60)

    def push():
        try:
            service.wait_subscribed(video_id)
        except AssertionError:
            released.set()
            raise
        for step in range(1, steps + 1):
            service.emit(video_id, "progress", {"stage": "denoise", "step": step, "total": steps, "progress": step})
            if step % (steps // previews) == 0:
                service.emit(video_id, "preview", {"step": step, "image": "data:image/png;base64," + "A" * 10_000})
        for n in range(30):  # a burst: each preview is kilobytes, only the newest may wait
            service.emit(video_id, "preview", {"step": steps, "n": n, "image": "data:image/png;base64," + "B" * 10_000})
        service.emit(video_id, "completed", {"id": video_id, "status": "completed", "progress": 100})
        time.sleep(0.5)  # the loop has run every delivery
        released.set()

    pusher = threading.Thread(target=push)
    pusher.start()
    app = create_app(service, static_dir=web)
    path = f"/v1/videos/{video_id}/events"
    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"host", b"127.0.0.1:8000")], "asgi": {"version": "3.0"}, "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 60))
    pusher.join()
    events = parse_sse(b"".join(m.get("body", b"") for m in sent[1:]).decode())
    names = [e for e, _ in events]
    assert names[0] == "state" and names[-1] == "completed" and names.count("completed") == 1, names[-5:]
    assert len(events) <= api.MAX_BUFFERED + 2, len(events)  # state, the one sent when the window filled, the rest
    progress = [d["step"] for e, d in events if e == "progress"]
    assert progress == sorted(progress) and progress[-1] == steps, progress  # the newest kept, in order
    shown = [(d["step"], d.get("n")) for e, d in events if e == "preview"]
    assert shown == [(steps, 29)], shown  # one preview waits at a time: the latest
    assert service.unsubscribed == [video_id]


def test_end_streams_closes_every_open_stream(service, live):
    """What the deployment's shutdown_service does first: Serve's graceful shutdown would wait for watchers."""
    ids = [service.add(status="in_progress")["id"] for _ in range(2)]
    with httpx.Client(base_url=live, timeout=5) as http, contextlib.ExitStack() as stack:
        responses = [stack.enter_context(http.stream("GET", f"/v1/videos/{i}/events")) for i in ids]
        for i in ids:
            service.wait_subscribed(i)
        service.app.state.end_streams()
        for r in responses:
            text = "".join(r.iter_text())  # returns: the stream ended
            assert [e for e, _ in parse_sse(text)] == ["state"] and "shutting down" in text
    deadline = time.time() + 5
    while len(service.unsubscribed) < 2 and time.time() < deadline:
        time.sleep(0.02)
    assert sorted(service.unsubscribed) == sorted(ids)


# -- the command and the deployment, without Ray (tests/test_serve_e2e.py runs them) ----------------------------


@pytest.fixture
def no_ray(monkeypatch):
    """The checks below must all fail before Ray starts: starting it is a test failure."""
    import cluster.driver

    def refuse(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cluster.driver, "connect_ray", refuse)


def _serve_cli(*args):
    from click.testing import CliRunner

    from cluster.serve.cli import serve

    return CliRunner().invoke(serve, [str(a) for a in args])


def _token_file(tmp_path, text="tok-" + "x" * 20, mode=0o600):
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_serve_refuses_a_public_host_without_a_token(no_ray, tmp_path):
    for args in (["--host", "0.0.0.0"], ["--set", "serve.host=0.0.0.0"], ["--host", "example.com"]):
        result = _serve_cli(*args, "--output-dir", tmp_path / "out")
        assert result.exit_code == 2, result.output
        assert "without a token" in result.output and "--token-file" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_serve_refuses_bad_token_files_and_symlinked_output(no_ray, tmp_path):
    for text, mode, says in (("tok", 0o644, "chmod 600"), ("tok", 0o660, "chmod 600"), ("  \n", 0o600, "empty"),
                             ("a\nb", 0o600, "one line"), ("a b", 0o600, "one line")):
        result = _serve_cli("--token-file", _token_file(tmp_path, text, mode), "--output-dir", tmp_path / "out")
        assert result.exit_code == 2 and says in result.output, (text, mode, result.output)
    result = _serve_cli("--token-file", tmp_path / "missing", "--output-dir", tmp_path / "out")
    assert result.exit_code == 2 and "missing" in result.output
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    result = _serve_cli("--output-dir", tmp_path / "link")
    assert result.exit_code == 2 and "symbolic link" in result.output


def test_serve_refuses_a_port_in_use(no_ray, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        for args in (["--port", port], ["--set", f"serve.port={port}"]):
            result = _serve_cli(*args, "--output-dir", tmp_path / "out")
            assert result.exit_code == 2, result.output
            assert f"port {port}" in result.output and "in use" in result.output


def test_serve_refuses_a_folder_another_service_holds(no_ray, tmp_path):
    import os

    from cluster.serve.service import LOCK_NAME, _lock_folder

    out = tmp_path / "out"
    out.mkdir()
    held = _lock_folder(out / LOCK_NAME)  # what a running service holds
    try:
        result = _serve_cli("--output-dir", out)
        assert result.exit_code == 2 and "another odyssey serve" in result.output, result.output
    finally:
        os.close(held)
    with socket.socket() as busy:  # free again: the check goes on (and stops at the next one, a busy port)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        result = _serve_cli("--output-dir", out, "--port", busy.getsockname()[1])
        assert result.exit_code == 2 and "in use" in result.output, result.output


def test_is_loopback():
    from cluster.serve.cli import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.2", "example.com", "127.0.0.1.nip.io"))


def test_ingress_health_check_restarts_only_for_a_fatal_error_that_is_not_the_configs():
    """Serve replaces an ingress whose check_health raises: for a crashed service (a bug, a lost driver thread), but
    not for a config that can never work (a ValueError): a restart would fail the same way, in a loop."""
    import asyncio
    from types import SimpleNamespace

    from cluster.serve.app import OdysseyIngress
    from cluster.placement import PlacementError

    def check(error, fatal):  # the method on a stand-in for the replica: only its service is used
        service = SimpleNamespace(health=lambda: {"ready": False, "error": error}, fatal=fatal)
        asyncio.run(OdysseyIngress.func_or_class.check_health(SimpleNamespace(service=service)))

    check(None, None)  # healthy, loading or not
    check("no replica can start: model.path /w does not exist", ValueError("model.path /w does not exist"))
    check("no replica can start: 4 replicas need 8 CPUs", PlacementError("4 replicas need 8 CPUs"))
    with pytest.raises(RuntimeError, match="slot 0 crashed"):
        check("no replica can start: replica slot 0 crashed", RuntimeError("replica slot 0 crashed"))


def test_read_token_file(tmp_path):
    from cluster.serve.app import read_token_file

    assert read_token_file(_token_file(tmp_path, "  abc-DEF_123-456789\n")) == "abc-DEF_123-456789"
    for short in ("abc", "x" * 15):  # a guessable token: one line saying how to make a good one
        with pytest.raises(ValueError, match="at least 16") as e:
            read_token_file(_token_file(tmp_path, short))
        assert "\n" not in str(e.value) and "secrets.token_urlsafe" in str(e.value)
    assert read_token_file(_token_file(tmp_path, "x" * 16)) == "x" * 16
    (tmp_path / "folder").mkdir(mode=0o700)
    for path, message in ((_token_file(tmp_path, "abc", 0o604), "readable or writable by other users"),
                          (tmp_path / "folder", "is not a regular file"), (tmp_path / "nothing", "cannot read")):
        with pytest.raises(ValueError, match=message):
            read_token_file(path)
    with pytest.raises(ValueError, match="4096"):
        read_token_file(_token_file(tmp_path, "a" * 5000))


def test_the_deployment_and_build_app(tmp_path):
    from cluster.serve.app import OdysseyIngress, build_app

    # the ingress takes no CPU from the model workers, holds one slot per open stream, and is alone
    assert OdysseyIngress.num_replicas == 1 and OdysseyIngress.ray_actor_options["num_cpus"] == 0
    assert OdysseyIngress.max_ongoing_requests >= 1000
    # overload: 503 at once past a bounded queue; a stop or redeploy does not keep the folder's lock for long
    assert 0 < OdysseyIngress.max_queued_requests <= 1000
    assert OdysseyIngress._deployment_config.graceful_shutdown_timeout_s <= 5

    token = _token_file(tmp_path, "tok-1234567890abcdef")
    app = build_app({"config": "tiny", "set": ["sampling.steps=7"], "output_dir": str(tmp_path / "o"),
                     "token_file": str(token)})
    config, output_dir, model_name, given = app._bound_deployment.init_args
    assert config["sampling"]["steps"] == 7 and config["sampling"]["preview_every"] == 5
    assert output_dir == str(tmp_path / "o") and model_name == "tiny" and given == "tok-1234567890abcdef"
    # streams never take every slot: API calls keep room beside serve.max_streams of them
    for streams in (256, 5000):
        app = build_app({"config": "tiny", "set": [f"serve.max_streams={streams}"], "output_dir": str(tmp_path)})
        assert app._bound_deployment.max_ongoing_requests >= streams + 500, streams
        assert app._bound_deployment.max_queued_requests == OdysseyIngress.max_queued_requests

    yaml_config = tmp_path / "my-model.yaml"
    yaml_config.write_text("sampling:\n  preview_every: 3\n")
    app = build_app({"config": str(yaml_config), "output_dir": str(tmp_path / "o")})
    config, _, model_name, given = app._bound_deployment.init_args
    assert config["sampling"]["preview_every"] == 3 and model_name == "my-model" and given is None
    app = build_app({"config": "tiny", "output_dir": str(tmp_path / "o"), "model_name": "t2v"})
    assert app._bound_deployment.init_args[2] == "t2v"

    for args, says in (({"output_dir": "relative/dir"}, "absolute"), ({"output_dir": "/o", "sett": []}, "sett"),
                       ({"output_dir": "/o", "set": "sampling.steps=3"}, "list"),
                       ({"output_dir": "/o", "set": ["sampling.nope=1"]}, "nope"),
                       ({"output_dir": "/o", "token_file": str(_token_file(tmp_path, "t", 0o644))}, "chmod")):
        with pytest.raises(ValueError, match=says):
            build_app(args)
