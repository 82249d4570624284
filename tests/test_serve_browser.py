"""The web page of `odyssey serve` in a real browser: headless Chromium (Debian's `chromium`, installed by .ci/run)
driven by playwright against a real `odyssey serve` subprocess with the embedded model.

Submitting from the form, the progress bar moving, the preview image, the finished video playing inline, cancelling
a running job with its button, and the token flow (the page asks for the token, then everything works through
`Authorization: Bearer`, the video from a blob: URL). Skipped, with the reason, only where Chromium or playwright
cannot be found."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.dist_pool import free_port

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None

BIN = Path(sys.executable).parent  # the venv's bin: `odyssey` lives there
CHROMIUM = next((p for p in (os.environ.get("ODYSSEY_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), "/usr/bin/chromium") if p and Path(p).is_file()), None)
PROMPT = "a red circle moving right"
TOKEN = "page-test-token-3f9a"

pytestmark = pytest.mark.timeout(240)

# Installed before the page's own script: every value the progress bars and preview images take, as the DOM saw it
# (a MutationObserver with old values keeps the ones that changed again before it ran), with the job's status.
RECORDER = """
window.__seen = [];
new MutationObserver((records) => {
  for (const r of records) {
    const card = r.target.closest && r.target.closest("li.job");
    if (!card) continue;
    if (r.oldValue !== null) window.__seen.push({id: card.dataset.id, status: card.dataset.status,
                                                  tag: r.target.tagName, value: r.oldValue});
  }
  for (const t of new Set(records.map((r) => r.target))) {
    const card = t.closest && t.closest("li.job");
    const value = t.getAttribute(t.tagName === "IMG" ? "src" : "value");
    if (card && value !== null) window.__seen.push({id: card.dataset.id, status: card.dataset.status,
                                                    tag: t.tagName, value});
  }
}).observe(document, {subtree: true, attributes: true, attributeOldValue: true, attributeFilter: ["value", "src"]});
"""


def _get(base: str, path: str, token: str | None = None) -> tuple[int, dict | None]:
    """(status, JSON body or None): Serve's proxy answers in plain text until the application is up."""
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def _call(base: str, method: str, path: str, fields: dict | None = None) -> dict:
    data = json.dumps(fields).encode() if fields is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


class Server:
    """`odyssey serve` as a user starts it: the venv's `odyssey` on PATH (no activated venv), a fresh HOME."""

    def __init__(self, root: Path, token: str | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        home = root / "home"
        home.mkdir(parents=True)
        args = [str(BIN / "odyssey"), "serve", "--port", str(self.port), "--output-dir", str(root / "out")]
        if token is not None:
            token_file = root / "token"
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
            args += ["--token-file", str(token_file)]
        env = {"HOME": str(home), "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
               "USER": os.environ.get("USER", "root"), "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
        self.log_path = root / "serve.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(args, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 150) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"odyssey serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if _get(self.base, "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"odyssey serve was not ready after {timeout} s:\n{self.tail()}")

    def interrupt(self) -> None:
        """Ctrl-C in its terminal: SIGINT to its process group; the server stops the application and its Ray."""
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 30) -> None:
        """After interrupt(): wait for the server, then kill what is left of its session (Ray's actors run in
        process groups of their own, inside the session start_new_session gave it)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        for pid in _session(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.log.close()


def _session(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.skip("playwright is not installed (the dev extra: pip install -e '.[dev]')")
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    with sync_playwright() as p:
        # no sandbox: CI runs as root; autoplay: the test calls play() without a user gesture
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def servers(browser, tmp_path_factory):
    """Both servers at once (their Ray and model start overlap): one open, one with --token-file."""
    root = tmp_path_factory.mktemp("serve")
    started = {"open": Server(root / "open"), "token": Server(root / "token", token=TOKEN)}
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.interrupt()
        for server in started.values():
            server.stop()


def _page(browser, base: str):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.add_init_script(RECORDER)
    page.goto(base + "/")
    return context, page, errors


def _submit(page, prompt: str, steps: int):
    """Submit from the form; returns the new job's card (on top: newest first) and id."""
    page.wait_for_selector("#jobs[aria-busy='false']", state="attached")  # the list has loaded: what follows is ours
    before = page.evaluate("[...document.querySelectorAll('li.job')].map((c) => c.dataset.id)")
    page.fill("#prompt", prompt)
    page.fill("#steps", str(steps))
    page.click("#submit")
    page.wait_for_function("before => { const c = document.querySelector('li.job'); "
                           "return c && !before.includes(c.dataset.id); }", arg=before)
    video_id = page.locator("li.job").first.get_attribute("data-id")
    card = page.locator(f"li.job[data-id='{video_id}']")
    assert card.locator(".prompt").text_content() == prompt
    return card, video_id


def _wait_status(page, video_id: str, statuses: tuple[str, ...], timeout_s: float) -> str:
    page.wait_for_function(
        "([id, ss]) => { const c = document.querySelector(`li.job[data-id='${id}']`); "
        "return c && ss.includes(c.dataset.status); }", arg=[video_id, list(statuses)], timeout=timeout_s * 1000)
    return page.locator(f"li.job[data-id='{video_id}']").get_attribute("data-status")


def _seen(page, video_id: str, tag: str) -> list[dict]:
    return [r for r in page.evaluate("window.__seen") if r["id"] == video_id and r["tag"] == tag]


def _check_video_plays(page, video_id: str) -> str:
    """The card's <video> loads (readyState >= 2, a duration) and plays (currentTime advances); returns its src."""
    sel = f"li.job[data-id='{video_id}'] video"
    page.wait_for_function(f"() => {{ const v = document.querySelector(\"{sel}\"); "
                           "return v && v.readyState >= 2 && v.duration > 0; }", timeout=20_000)
    played = page.evaluate(f"""async () => {{
        const v = document.querySelector("{sel}");
        v.pause(); v.currentTime = 0;
        await v.play();
        const t0 = performance.now();
        while (v.currentTime < 0.2 && performance.now() - t0 < 10000) await new Promise(r => setTimeout(r, 50));
        const currentTime = v.currentTime;
        v.pause();
        const seeked = new Promise(r => {{ v.addEventListener("seeked", r, {{once: true}}); setTimeout(r, 5000); }});
        v.currentTime = 1.5;  // the user drags the slider
        await seeked;
        return {{duration: v.duration, currentTime, seekedTo: v.currentTime, error: v.error && v.error.code,
                 width: v.videoWidth, height: v.videoHeight, src: v.currentSrc}};
    }}""")
    assert played["error"] is None and played["duration"] > 0 and played["currentTime"] >= 0.2, played
    assert abs(played["seekedTo"] - 1.5) < 0.2, played
    assert (played["width"], played["height"]) == (32, 32), played  # the embedded model's frames
    return played["src"]


def test_submit_follow_and_play(browser, servers):
    server = servers["open"]
    context, page, errors = _page(browser, server.base)
    try:
        # markup in a prompt is text: the card shows it as written and the browser never parses it
        prompt = PROMPT + ' <img src=x onerror="window.__pwned=1">'
        # a field the server refuses (422): its message under the form, naming the field; nothing is queued
        page.wait_for_selector("#jobs[aria-busy='false']", state="attached")
        page.fill("#prompt", prompt)
        page.fill("#steps", "100000")
        page.click("#submit")
        page.wait_for_function("() => document.querySelector('#form-error').textContent.startsWith('steps')")
        assert "limit" in page.locator("#form-error").text_content()
        assert page.locator("li.job").count() == 0 and _get(server.base, "/v1/videos")[1]["data"] == []

        card, video_id = _submit(page, prompt, steps=30)
        assert _get(server.base, f"/v1/videos/{video_id}")[1]["prompt"] == prompt
        assert _wait_status(page, video_id, ("completed", "failed", "cancelled"), 90) == "completed"

        bars = _seen(page, video_id, "PROGRESS")
        running = sorted({float(r["value"]) for r in bars if r["status"] == "in_progress" and
                          0 < float(r["value"]) < 100})
        assert len(running) >= 2, f"the bar did not move while the job ran: {bars}"
        values = [float(r["value"]) for r in bars]
        assert values == sorted(values), f"progress went backwards: {values}"
        assert float(card.locator("progress").get_attribute("value")) == 100

        previews = [r for r in _seen(page, video_id, "IMG") if r["value"].startswith("data:image/png;base64,")]
        assert previews, "no preview image was shown"
        assert any(r["status"] == "in_progress" for r in previews), "the preview only came after the job ended"

        src = _check_video_plays(page, video_id)
        # no token: the browser streams the file itself (Range requests, seeking)
        assert src == f"{server.base}/v1/videos/{video_id}/content", src

        assert page.evaluate("window.__pwned") is None
        assert card.locator(".prompt img").count() == 0
        status, listed = _get(server.base, "/v1/videos")
        assert listed["data"][0]["id"] == video_id and listed["data"][0]["status"] == "completed"

        # Delete (after a confirm) removes the file: the card drops its video, the server its content
        page.once("dialog", lambda dialog: dialog.accept())
        card.locator("button.cancel", has_text="Delete").click()
        page.wait_for_selector(f"li.job[data-id='{video_id}'][data-deleted='true']")
        assert card.locator("video").count() == 0
        assert _get(server.base, f"/v1/videos/{video_id}/content")[0] == 404
        assert errors == []
    finally:
        context.close()


def test_cancel_running_job_from_its_button(browser, servers):
    server = servers["open"]
    context, page, errors = _page(browser, server.base)
    try:
        # the job of the previous test is listed (GET /v1/videos on load), ours goes on top
        card, video_id = _submit(page, "a blue square moving up", steps=1000)
        page.wait_for_function(
            "id => { const c = document.querySelector(`li.job[data-id='${id}']`); "
            "return c && c.dataset.status === 'in_progress' && c.querySelector('progress').value > 2; }",
            arg=video_id, timeout=60_000)
        cancel = card.locator("button.cancel")
        assert cancel.text_content() == "Cancel" and cancel.is_visible()
        cancel.click()
        assert _wait_status(page, video_id, ("completed", "failed", "cancelled"), 30) == "cancelled"
        assert _get(server.base, f"/v1/videos/{video_id}")[1]["status"] == "cancelled"
        assert card.locator("button.cancel").is_hidden() and card.locator("video").count() == 0
        assert errors == []
    finally:
        context.close()


def test_many_jobs_page_on_and_the_form_stays_responsive(browser, servers):
    """More jobs than a page: "Show older jobs" lists the rest. With 20 unfinished jobs on screen the page follows
    only a few event streams at once (browsers open 6 connections per host), so a submit still goes through."""
    server = servers["open"]
    queued = [_call(server.base, "POST", "/v1/videos", {"prompt": f"a white square moving down {i}", "steps": 1000})
              for i in range(21)]
    total = len(_get(server.base, "/v1/videos?limit=100")[1]["data"])
    context, page, errors = _page(browser, server.base)
    video_id = None
    try:
        card, video_id = _submit(page, "a green circle moving left", steps=1000)
        assert page.locator("li.job").count() == 21  # the first page (20) and ours on top
        more = page.locator("#more")
        assert more.is_visible()
        more.click()
        page.wait_for_function("n => document.querySelectorAll('li.job').length === n", arg=total + 1)
        assert more.is_hidden()
        ids = page.evaluate("[...document.querySelectorAll('li.job')].map((c) => c.dataset.id)")
        listed = [video_id, *(v["id"] for v in _get(server.base, "/v1/videos?limit=100")[1]["data"][1:])]
        assert ids == listed  # newest first, nothing twice
        assert errors == []
    finally:
        context.close()
        for vid in [*(v["id"] for v in queued), *([video_id] if video_id else [])]:
            _call(server.base, "DELETE", f"/v1/videos/{vid}")


def test_token_flow(browser, servers):
    server = servers["token"]
    assert _get(server.base, "/v1/videos")[0] == 401  # the server really wants it
    context, page, errors = _page(browser, server.base)
    try:
        page.wait_for_selector("#auth[open]", timeout=15_000)
        page.fill("#token", "not-the-token")
        page.click("#auth-submit")
        page.wait_for_function("() => document.querySelector('#auth-error').textContent.includes('refused')")
        assert page.locator("#auth[open]").count() == 1
        page.fill("#token", TOKEN)
        page.click("#auth-submit")
        page.wait_for_selector("#auth", state="hidden")
        assert page.evaluate("sessionStorage.getItem('odyssey.token')") == TOKEN

        card, video_id = _submit(page, PROMPT, steps=4)
        assert _get(server.base, f"/v1/videos/{video_id}", TOKEN)[1]["prompt"] == PROMPT
        assert _wait_status(page, video_id, ("completed", "failed", "cancelled"), 90) == "completed"
        # a <video> cannot send the header: the page fetched the file with it and plays it from memory
        assert _check_video_plays(page, video_id).startswith("blob:")

        # the token lives in the tab: a reload goes straight to the list
        page.reload()
        page.wait_for_selector(f"li.job[data-id='{video_id}']")
        assert page.locator("#auth[open]").count() == 0
        assert errors == []
    finally:
        context.close()
