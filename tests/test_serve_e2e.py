"""`odyssey serve` for real: the command in a fresh HOME (PATH to the venv, nothing activated), a local Ray, Ray
Serve, the VideoService and the embedded model; the OpenAI SDK as the client. One server for the module: created,
polled and downloaded through the SDK (the MP4 decodes to the preset's frames), events in order with real progress
and a preview, a running job cancelled within a few steps while the next one completes on the same replica, Range
through Serve's proxy, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from cluster.video import read_mp4

VENV_BIN = Path(sys.executable).parent
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROMPT = "a red circle moving right"
# the embedded model (README): 17 frames of 32x32 at 8 fps
FRAMES, SIZE, FPS = 17, 32, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_processes(sid: int) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "sid=,pid=,stat=,args="], capture_output=True, text=True).stdout
    return [line.strip() for line in ps.splitlines()
            if line.split()[0] == str(sid) and not line.split()[2].startswith("Z")]


class Server:
    def __init__(self, tmp: Path):
        self.home, self.out, self.port = tmp / "home", tmp / "videos", _free_port()
        self.home.mkdir()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = tmp / "stderr.txt"
        env = {"HOME": str(self.home), "PATH": f"{VENV_BIN}:{SYSTEM_PATH}", "LANG": "C.UTF-8",
               "USER": os.environ.get("USER", "root")}
        self.stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(["odyssey", "serve", "--port", str(self.port), "--output-dir", str(self.out)],
                                     cwd=self.home, env=env, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     start_new_session=True)

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout=150) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"odyssey serve exited {self.proc.returncode}:\n{self.log()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"not ready after {timeout} s:\n{self.log()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.stderr.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("serve"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


class Events:
    """A Server-Sent Events subscription read on a thread: .events fills as they arrive, .done when it ended."""

    def __init__(self, url: str):
        self.events: list[tuple[str, dict]] = []
        self.done = threading.Event()
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self.thread.start()
        assert self.opened.wait(30), "the event stream did not open"

    def _read(self, url):
        try:
            with httpx.Client(timeout=120) as http, http.stream("GET", url) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                self.opened.set()
                event = None
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        self.events.append((event, json.loads(line[6:])))
        finally:
            self.opened.set()
            self.done.set()

    def names(self) -> list[str]:
        return [e for e, _ in self.events]

    def wait_for(self, name: str, timeout=60) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for e, data in list(self.events):
                if e == name:
                    return data
            time.sleep(0.02)
        raise AssertionError(f"no {name!r} event within {timeout} s: {self.names()}")


def _wait_status(client, video_id, statuses, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        video = client.videos.retrieve(video_id)
        if video.status in statuses:
            return video
        time.sleep(0.1)
    raise AssertionError(f"{video_id} still {video.status} after {timeout} s")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK warns that OpenAI's own service shut down
def test_openai_sdk_creates_polls_and_downloads(server, client, tmp_path):
    video = client.videos.create(model="tiny", prompt=PROMPT, extra_body={"seed": 3, "steps": 4})
    assert video.status == "queued" and video.progress == 0 and video.id.startswith("video_")
    assert video.model == "tiny" and video.size == f"{SIZE}x{SIZE}"
    done = _wait_status(client, video.id, {"completed", "failed", "cancelled"})
    assert done.status == "completed" and done.progress == 100, done
    assert done.completed_at is not None and done.completed_at >= done.created_at
    assert done.model_extra["seed"] == 3 and done.model_extra["steps"] == 4

    data = client.videos.download_content(video.id).read()
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    frames, fps = read_mp4(path)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3) and fps == pytest.approx(FPS)
    assert frames.std() > 5, "a blank video"

    # browsers seek with Range: through Serve's proxy too
    r = httpx.get(f"{server.url}/v1/videos/{video.id}/content", headers={"range": "bytes=10-99"})
    assert r.status_code == 206 and r.content == data[10:100]
    assert r.headers["content-range"] == f"bytes 10-99/{len(data)}"

    listed = client.videos.list(limit=5)
    assert video.id in [v.id for v in listed.data]


def test_events_in_order_with_real_progress_and_a_preview(server):
    # the one replica busy first, so the job is still queued when the stream opens: every event is seen
    blocker = httpx.post(f"{server.url}/v1/videos", json={"prompt": PROMPT, "steps": 1000}).json()["id"]
    deadline = time.time() + 60
    while httpx.get(f"{server.url}/v1/videos/{blocker}").json()["status"] != "in_progress":
        assert time.time() < deadline
        time.sleep(0.05)
    steps = 12  # odyssey serve turns previews on: one after step 5 and one after step 10
    r = httpx.post(f"{server.url}/v1/videos", json={"prompt": "a blue square moving up", "seed": 4,
                                                    "steps": steps})
    assert r.status_code == 200 and r.json()["status"] == "queued", r.text
    video_id = r.json()["id"]
    stream = Events(f"{server.url}/v1/videos/{video_id}/events")
    assert httpx.delete(f"{server.url}/v1/videos/{blocker}").status_code == 200
    assert stream.done.wait(90), f"the stream did not end: {stream.names()}"
    names = stream.names()
    assert names[0] == "state" and stream.events[0][1]["status"] == "queued", names
    assert names[-1] == "completed" and names.count("completed") == 1, names
    assert names.index("started") < names.index("progress"), names
    progress = [d["progress"] for e, d in stream.events if "progress" in d]
    assert progress == sorted(progress) and progress[-1] == 100, progress
    assert any(0 < p < 100 for p in progress), progress
    denoise = [d["step"] for e, d in stream.events if e == "progress" and d.get("stage") == "denoise"]
    assert denoise == sorted(set(denoise)) and denoise[-1] == steps, denoise
    previews = [d for e, d in stream.events if e == "preview"]
    assert previews and all(d["step"] % 5 == 0 and d["total"] == steps for d in previews), previews
    png = base64.b64decode(previews[-1]["image"].split(",", 1)[1])
    assert png.startswith(b"\x89PNG")
    frames = [d["index"] for e, d in stream.events if e == "frame"]
    assert frames == list(range(FRAMES)), frames

    late = Events(f"{server.url}/v1/videos/{video_id}/events")  # a late client: the state, then the end
    assert late.done.wait(30)
    assert late.names() == ["state", "completed"] and late.events[0][1]["status"] == "completed"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cancel_a_running_job_then_the_next_completes_on_the_same_replica(server, client):
    workers = _workers(server)
    assert len(workers) == 1, workers  # one replica of one rank
    r = httpx.post(f"{server.url}/v1/videos", json={"prompt": "a green circle moving left", "steps": 1000})
    long_id = r.json()["id"]
    stream = Events(f"{server.url}/v1/videos/{long_id}/events")
    deadline = time.time() + 60
    while not any(d.get("stage") == "denoise" for e, d in stream.events if e == "progress"):
        assert time.time() < deadline and not stream.done.is_set(), stream.names()
        time.sleep(0.02)
    t0 = time.time()
    r = httpx.delete(f"{server.url}/v1/videos/{long_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["deleted"] is True
    assert stream.done.wait(30) and stream.names()[-1] == "cancelled", stream.names()[-5:]
    took = time.time() - t0
    steps_done = max(d["step"] for e, d in stream.events if e == "progress" and d.get("stage") == "denoise")
    assert steps_done < 1000 and took < 20, (steps_done, took)  # stopped, not run out
    assert client.videos.retrieve(long_id).status == "cancelled"
    assert httpx.get(f"{server.url}/v1/videos/{long_id}/content").status_code == 404

    nxt = client.videos.create(prompt=PROMPT, extra_body={"steps": 4})
    assert _wait_status(client, nxt.id, {"completed", "failed", "cancelled"}).status == "completed"
    assert _workers(server) == workers, "the cancel cost the replica its worker"
    health = httpx.get(f"{server.url}/healthz").json()
    assert health["status"] == "ok" and health["replicas_up"] == 1 and health["running"] == 0


def _workers(server) -> list[str]:
    """The model worker processes of the server's session (pid and name)."""
    return [" ".join(line.split()[1:2] + line.split()[3:]) for line in _session_processes(server.proc.pid)
            if "ray::SPWorker" in line]


def test_host_origin_and_content_type_checks_through_serves_proxy(server):
    """The same-origin checks see what the browser sent: Serve's proxy passes Host and Origin through."""
    assert httpx.get(f"{server.url}/livez").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/v1/videos", headers={"host": f"localhost:{server.port}"}).status_code == 200
    r = httpx.get(f"{server.url}/", headers={"host": f"attacker.example:{server.port}"})  # a rebound name
    assert r.status_code == 421 and r.json()["error"]["type"] == "invalid_request_error"
    before = httpx.get(f"{server.url}/v1/videos", params={"limit": 100}).json()["data"]
    body = json.dumps({"prompt": PROMPT, "steps": 1})
    for headers in ({"origin": "http://attacker.example", "content-type": "application/json"},
                    {"sec-fetch-site": "cross-site", "content-type": "application/x-www-form-urlencoded"},
                    {}):  # no Content-Type: a no-cors fetch of a Blob
        r = httpx.post(f"{server.url}/v1/videos", content=body, headers=headers)
        assert r.status_code in (403, 415), (headers, r.text)
    assert httpx.get(f"{server.url}/v1/videos", params={"limit": 100}).json()["data"] == before
    r = httpx.post(f"{server.url}/v1/videos", content=body, headers={"origin": server.url,  # the page
                                                                    "content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert httpx.delete(f"{server.url}/v1/videos/{r.json()['id']}", headers={"origin": server.url}).status_code == 200


ATTACKER_PAGE = """<!doctype html><title>some site</title>
<form id="f" method="POST" action="{api}"><input name="prompt" value="csrf form"></form>
<script>
const api = "{api}";
const tries = [
  {{body: new URLSearchParams({{prompt: "csrf urlencoded"}})}},                         // a simple request
  {{body: new Blob([JSON.stringify({{prompt: "csrf blob"}})])}},                      // no Content-Type
  {{body: JSON.stringify({{prompt: "csrf text"}}), headers: {{"Content-Type": "text/plain"}}}},
];
Promise.allSettled(tries.map((t) => fetch(api, {{method: "POST", mode: "no-cors", ...t}})))
  .then(() => {{ document.title = "sent"; document.getElementById("f").submit(); }});
</script>"""


def test_a_page_on_another_site_cannot_queue_jobs(server, tmp_path):
    """What a web page the user visits can send to a loopback server without any token: no-cors fetches and a
    plain form POST, from headless Chromium on another origin (localhost:<other port>, another site too)."""
    import http.server

    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    chromium = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and Path(p).is_file()), None)
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    (tmp_path / "index.html").write_text(ATTACKER_PAGE.format(api=f"{server.url}/v1/videos"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    before = httpx.get(f"{server.url}/v1/videos", params={"limit": 100}).json()["data"]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page()
            with page.expect_navigation(url=f"{server.url}/v1/videos", timeout=30_000):
                page.goto(f"http://localhost:{site.server_address[1]}/index.html")
            answer = json.loads(page.inner_text("body"))  # what the form's navigation got
            browser.close()
    finally:
        site.shutdown()
    assert (answer.get("error") or {}).get("type") == "permission_error", answer  # not a video object
    after = httpx.get(f"{server.url}/v1/videos", params={"limit": 100}).json()["data"]
    assert [v["prompt"] for v in after if v["prompt"].startswith("csrf")] == []
    assert after == before


def test_ctrl_c_stops_everything(server):
    """Last in the module: Ctrl-C ends the command cleanly and no process of its session is left."""
    assert f"odyssey: serving tiny on {server.url} (1 replica); Ctrl-C stops" in server.log()
    # a browser still watching a running job: its stream ends and the stop does not wait for it
    r = httpx.post(f"{server.url}/v1/videos", json={"prompt": "a white square moving down", "steps": 1000})
    watcher = Events(f"{server.url}/v1/videos/{r.json()['id']}/events")
    watcher.wait_for("progress")
    t0 = time.time()
    code = server.stop()
    took = time.time() - t0
    assert code == 0, server.log()[-3000:]
    assert watcher.done.wait(5) and "cancelled" not in watcher.names()
    assert took < 25, f"stopping took {took:.0f} s: it waited for the open stream (Serve's drain allows 30 s)"
    deadline = time.time() + 30
    while _session_processes(server.proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert _session_processes(server.proc.pid) == []
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=2)


# -- `odyssey serve --address` where Ray Serve already runs ------------------------------------------------------

SERVE_ELSEWHERE = """
import sys

import ray
from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Says:
    def __init__(self, text):
        self.text = text

    async def __call__(self, request):
        return self.text


ray.init(address=sys.argv[1], logging_level="ERROR")
if sys.argv[2] == "start":
    serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[3])})
    serve.run(Says.bind("someone else's odyssey"), name="odyssey", route_prefix="/")
    serve.run(Says.bind("another application"), name="other", route_prefix="/other")
else:
    serve.delete("odyssey")
"""


def test_joining_a_cluster_where_serve_runs(tmp_path):
    """A cluster where another user runs Serve: an application named odyssey there is refused, never replaced (nor
    deleted on exit); Serve's address cannot change while it runs, so another --port is refused instead of printing
    an address nobody listens on; on Serve's own address the service runs, and its stop removes only its own
    application (Serve and the other application stay)."""
    import tempfile

    from tests.test_launch import _sweep

    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": f"{VENV_BIN}:{SYSTEM_PATH}", "LANG": "C.UTF-8", "RAY_USAGE_STATS_ENABLED": "0",
           "USER": os.environ.get("USER", "root")}
    gcs, http, other_port = _free_port(), _free_port(), _free_port()
    address, url = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{http}"
    temp = tempfile.mkdtemp(prefix="odyj", dir="/tmp")  # short: Ray's socket paths live under it
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--include-dashboard=false", f"--dashboard-agent-listen-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--ray-client-server-port={_free_port()}", "--num-cpus=2",
         f"--temp-dir={temp}"], env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    script = tmp_path / "elsewhere.py"
    script.write_text(SERVE_ELSEWHERE)

    def driver(*args):
        done = subprocess.run([sys.executable, str(script), address, *map(str, args)], env=env, cwd=home,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]

    def odyssey_serve(port, *extra, timeout=60):  # a refusal takes seconds
        return subprocess.run(["odyssey", "serve", "--address", address, "--port", str(port), "--output-dir",
                               str(tmp_path / "out"), *extra], env=env, cwd=home, capture_output=True, text=True,
                              timeout=timeout)

    serving = None
    try:
        deadline = time.time() + 120
        while True:  # the head takes a few seconds to accept drivers
            done = subprocess.run([sys.executable, str(script), address, "start", str(http)], env=env, cwd=home,
                                  capture_output=True, text=True, timeout=180)
            if done.returncode == 0:
                break
            assert head.poll() is None and time.time() < deadline, done.stderr[-3000:]
            time.sleep(2)
        assert httpx.get(f"{url}/").text == "someone else's odyssey"

        refused = odyssey_serve(http)
        assert refused.returncode == 2, refused.stderr[-3000:]
        message = [line for line in refused.stderr.splitlines() if line.startswith("odyssey: error")]
        assert len(message) == 1 and "serve status" in message[0] and "serve shutdown" in message[0], message
        assert httpx.get(f"{url}/").text == "someone else's odyssey", "the application found was touched"

        driver("delete")
        # a layout this cluster can never place (4 ranks of 1 CPU on 2 CPUs) is refused before anything is deployed
        refused = odyssey_serve(http, "--ulysses", "4", "--set", "runtime.num_cpus_per_worker=1")
        assert refused.returncode == 2, refused.stderr[-3000:]
        message = [line for line in refused.stderr.splitlines() if line.startswith("odyssey: error")]
        assert len(message) == 1 and "needs 4 workers x 1 CPUs" in message[0], message
        assert "serving" not in refused.stderr and httpx.get(f"{url}/healthz").status_code == 404

        refused = odyssey_serve(other_port)
        assert refused.returncode == 2, refused.stderr[-3000:]
        message = [line for line in refused.stderr.splitlines() if line.startswith("odyssey: error")]
        assert len(message) == 1 and f"already listens on {url}" in message[0], message
        assert f"--port {http}" in message[0]
        assert httpx.get(f"{url}/other").text == "another application"

        stderr = open(tmp_path / "serve.txt", "w")
        serving = subprocess.Popen(["odyssey", "serve", "--address", address, "--port", str(http), "--output-dir",
                                    str(tmp_path / "out")], env=env, cwd=home, stdout=subprocess.DEVNULL,
                                   stderr=stderr, start_new_session=True)
        deadline = time.time() + 180
        while httpx.get(f"{url}/healthz", timeout=10).status_code != 200:
            assert serving.poll() is None and time.time() < deadline, (tmp_path / "serve.txt").read_text()[-3000:]
            time.sleep(0.5)
        assert f"odyssey: serving tiny on {url} (1 replica)" in (tmp_path / "serve.txt").read_text()
        serving.send_signal(signal.SIGINT)
        assert serving.wait(timeout=90) == 0, (tmp_path / "serve.txt").read_text()[-3000:]
        stderr.close()
        assert httpx.get(f"{url}/other").text == "another application", "Serve or its other application went"
        assert httpx.get(f"{url}/healthz").status_code == 404  # the proxy's own 404: odyssey is gone
    finally:
        if serving is not None and serving.poll() is None:
            os.killpg(serving.pid, signal.SIGKILL)
        _sweep(temp, [home], head)
        log.close()
