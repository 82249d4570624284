"""VideoService: the jobs of `odyssey serve` over the batch driver's replicas.

Requests become jobs on the Driver's one queue (every replica takes the next when idle; a lost worker costs a
retry, the service keeps serving). One pump thread reads the replicas' events: it writes each video as its frames
arrive (renamed into place only when whole), turns steps and frames into a monotonic progress, keeps the latest
preview, and tells subscribers (the SSE streams). Records live in SQLite in the output folder, so a restart resumes
queued jobs, re-queues interrupted ones (attempts bounded by serve.max_attempts) and keeps serving finished videos.
Every method the HTTP side calls returns at once: none waits for a generation.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import logging
import math
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from configs import OdysseyConfig
from pipeline.request import Frame, GenerateRequest, Preview, Progress, Result

from ..driver import Driver, Job
from ..video import StreamingMP4, clean_stale_partials, png_bytes
from .store import JobStore

__all__ = ["VideoService", "InvalidField", "QueueFull", "ServiceUnavailable", "ID_RE", "FINAL"]

log = logging.getLogger(__name__)

ID_RE = re.compile(r"video_[0-9a-f]{24}")
FINAL = ("completed", "failed", "cancelled")
DB_NAME = "odyssey-serve.sqlite3"
LOCK_NAME = ".odyssey-serve.lock"
LOCK_WAIT_S = 90.0  # a redeploy starts the new service while the old one still drains its requests
_REQUEST_FIELDS = ("negative_prompt", "seed", "frames", "fps", "steps", "guidance_scale", "low_noise_guidance_scale",
                   "sampler")


class InvalidField(ValueError):
    """A request field that cannot be served: HTTP 422 naming `param`."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """serve.max_queued jobs are waiting: HTTP 429, try again after retry_after_s."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(RuntimeError):
    """No replica can ever start (the config cannot work here): HTTP 503 with the reason."""


@dataclass
class _Record:
    id: str
    request: GenerateRequest  # resolved
    created_at: float
    status: str = "queued"
    stage: str = "queued"
    step: int = 0
    progress: int = 0
    attempts: int = 0
    completed_at: float | None = None
    error: dict | None = None
    deleted: bool = False
    cache: str | None = None  # as asked ("fbcache" or "fbcache:0.1"), for the video object
    job: Job | None = None
    writer: StreamingMP4 | None = None
    preview: tuple[int, int, bytes] | None = None  # (step, total, PNG)
    subscribers: list = field(default_factory=list)

    def persisted(self) -> dict:
        return {"id": self.id, "request": dataclasses.asdict(self.request), "created_at": self.created_at,
                "status": self.status, "attempts": self.attempts, "completed_at": self.completed_at,
                "error": self.error, "deleted": self.deleted, "cache": self.cache}


class VideoService:
    def __init__(self, config: OdysseyConfig, *, output_dir: Path, model_name: str, address: str | None = None):
        self.config, self.model_name, self.address = config, model_name, address
        self.output_dir = Path(output_dir)
        self.videos_dir = self.output_dir / "videos"
        self.driver: Driver | None = None
        self.error: str | None = None  # why no replica can ever start (a config that cannot work)
        self._lock = threading.RLock()
        self._records: dict[str, _Record] = {}
        self._jobs = 0
        self._run_id = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._store: JobStore | None = None
        self._dir_lock: int | None = None
        self._start_error: BaseException | None = None
        self.created = int(time.time())

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the output folder (one service per folder) and its records, re-queue what a restart left, and start
        the replicas in the background. Returns at once; health() says when they are up."""
        for folder in (self.output_dir, self.videos_dir):  # videos would be written and deleted where it points
            if folder.is_symlink():
                raise ValueError(f"{folder} is a symbolic link; pass a real folder as the output folder")
        self.videos_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # the videos are the users' data
        self._dir_lock = _lock_folder(self.output_dir / LOCK_NAME, LOCK_WAIT_S)
        clean_stale_partials(self.videos_dir)
        self._store = JobStore(self.output_dir / DB_NAME)
        self.driver = Driver(self.config, address=self.address, progress=None, persistent=True)
        self.driver.validate()
        self._run_id = self.driver.open_queue()
        self._restore()
        for target, name in ((self._start_driver, "odyssey-serve-start"), (self._pump, "odyssey-serve-pump")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def fatal(self) -> BaseException | None:
        """What stopped every replica for good: the driver's fatal error, or what its start raised."""
        return (self.driver.fatal if self.driver is not None else None) or self._start_error

    def _start_driver(self) -> None:
        try:
            self.driver.start()
        except BaseException as e:  # noqa: BLE001 - reported by health() and to every job
            self._start_error = e
            if not self._stop.is_set():
                log.error("no replica can start: %s", e)
                self._fail_all(f"no replica can start: {e}")

    def close(self) -> None:
        """Stop serving. Running jobs go back to queued for the next start, and this stop does not count against
        their serve.max_attempts (a crash, which leaves them in_progress, does)."""
        with self._lock:
            self._stop.set()  # under the lock: the pump handles no event after this
            for rec in self._records.values():
                if rec.status == "in_progress" and self._store is not None:
                    rec.status, rec.stage, rec.attempts = "queued", "queued", max(0, rec.attempts - 1)
                    self._save(rec)
        if self.driver is not None:
            self.driver.close()
        for t in self._threads:
            t.join(timeout=30)
        with self._lock:
            for rec in self._records.values():
                if rec.writer is not None:
                    rec.writer.abort()
                    rec.writer = None
        if self._store is not None:
            self._store.close()
        if self._dir_lock is not None:
            os.close(self._dir_lock)
            self._dir_lock = None

    def _restore(self) -> None:
        limit = self.config.serve.max_attempts
        for data in self._store.load():
            rec = self._restored(data)
            if rec is None:
                continue
            if rec.status == "completed":
                rec.stage, rec.progress = "done", 100
                if not rec.deleted and not self._video_path(rec.id).is_file():
                    rec.status, rec.error = "failed", {"code": "video_missing",
                                                       "message": "the finished video is no longer on disk"}
            elif rec.status in ("queued", "in_progress"):
                if rec.status == "in_progress" and rec.attempts >= limit:
                    rec.status, rec.stage = "failed", "done"
                    rec.error = {"code": "interrupted", "message": f"interrupted {rec.attempts} time(s) "
                                 f"(serve.max_attempts {limit})"}
                else:
                    rec.status = "queued"
            self._records[rec.id] = rec
            if rec.status == "queued":
                self._enqueue(rec)
            self._save(rec)
        queued = sum(r.status == "queued" for r in self._records.values())
        if self._records:
            log.info("restored %d job record(s), %d queued again", len(self._records), queued)

    def _restored(self, data: dict) -> _Record | None:
        """A record read back, checked like a new request (the database is a file anyone with the folder could
        edit, and the limits may have been lowered since); None, with a log line, for one that cannot be served."""
        try:
            video_id = data["id"]
            if not isinstance(video_id, str) or not ID_RE.fullmatch(video_id):
                raise ValueError(f"a malformed id {str(video_id)[:40]!r}")
            made = dict(data["request"])
            if "low_noise_guidance_scale" not in made and "guidance_scale" in made:
                # a record from before two-expert models: every step's guidance was guidance_scale
                made["low_noise_guidance_scale"] = made["guidance_scale"]
            request = GenerateRequest(**made)
            if request.request_id != video_id:
                raise ValueError("its request belongs to another id")
            status = data["status"]
            if status not in ("queued", "in_progress", *FINAL):
                raise ValueError(f"an unknown status {str(status)[:20]!r}")
            if status in ("queued", "in_progress"):
                request.validate(self.config)  # over today's limits: it fails now rather than on a worker
            attempts = data["attempts"]
            if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 0:
                raise ValueError(f"attempts {str(attempts)[:20]}")
            return _Record(id=video_id, request=request, created_at=float(data["created_at"]), status=status,
                           attempts=attempts, completed_at=data["completed_at"], error=data["error"],
                           deleted=bool(data["deleted"]), cache=data.get("cache"))
        except (KeyError, TypeError, ValueError) as e:
            log.warning("skipping job record %s: %s", str(data.get("id") if isinstance(data, dict) else "?")[:40],
                        str(e)[:200])
            return None

    # -- what the HTTP side calls -------------------------------------------------------------------------------

    def health(self) -> dict:
        with self._lock:
            queued = sum(r.status == "queued" for r in self._records.values())
            running = sum(r.status == "in_progress" for r in self._records.values())
        up = self.driver.replicas_up() if self.driver else 0
        total = self.config.parallel.replicas
        return {"ready": self.error is None and up == total, "replicas_up": up, "replicas": total, "queued": queued,
                "running": running, "error": self.error}

    def models(self) -> list[dict]:
        """The served model, with the defaults a request that sets nothing gets (the web page's form shows them)."""
        v, smp = self.config.video, self.config.sampling
        defaults = {"size": f"{v.width}x{v.height}", "frames": v.frames, "fps": v.fps,
                    "seconds": f"{v.frames / v.fps:.3g}", "steps": smp.steps, "guidance_scale": smp.guidance_scale,
                    "low_noise_guidance_scale": (smp.guidance_scale if smp.low_noise_guidance_scale is None
                                                 else smp.low_noise_guidance_scale),
                    "sampler": smp.sampler, "cache": smp.cache}
        return [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "odyssey",
                 "sizes": [defaults["size"]], "defaults": defaults}]

    def submit(self, fields: dict) -> dict:
        """A new job from typed fields (see the contract in docs/serve.md); InvalidField / QueueFull."""
        request, cache = self._request(fields)
        serve = self.config.serve
        with self._lock:
            if self.error is not None:
                raise ServiceUnavailable(self.error)
            if sum(r.status == "queued" for r in self._records.values()) >= serve.max_queued:
                raise QueueFull(f"{serve.max_queued} jobs are queued (serve.max_queued); try again later",
                                serve.retry_after_s)
            rec = _Record(id=request.request_id, request=request, created_at=time.time(), cache=cache)
            self._records[rec.id] = rec
            self._save(rec)
            self._prune()
            self._enqueue(rec)
            obj = self._object(rec)
        self._emit(rec, "queued", obj)
        return obj

    def get(self, video_id: str) -> dict | None:
        with self._lock:
            rec = self._records.get(video_id)
            return None if rec is None else self._object(rec)

    def list(self, limit: int = 20, after: str | None = None) -> list[dict]:
        with self._lock:
            recs = sorted(self._records.values(), key=lambda r: (r.created_at, r.id), reverse=True)
            if after is not None:
                ids = [r.id for r in recs]
                recs = recs[ids.index(after) + 1:] if after in ids else []
            return [self._object(r) for r in recs[:limit]]

    def cancel(self, video_id: str) -> dict | None:
        """Cancel a queued or running job (a running one stops within one denoising step and frees its replica)
        and delete its video; returns the video object (deleted: true)."""
        with self._lock:
            rec = self._records.get(video_id)
            if rec is None:
                return None
            was_running = rec.status in ("queued", "in_progress")
            if was_running:
                rec.status, rec.stage, rec.error = "cancelled", "done", None
                rec.completed_at = time.time()
                if rec.writer is not None:
                    rec.writer.abort()
                    rec.writer = None
            rec.deleted = True
            self._video_path(rec.id).unlink(missing_ok=True)
            self._save(rec)
            obj = self._object(rec)
            job = rec.job
        if was_running and job is not None:
            self.driver.cancel(job)  # outside the lock: it messages the replica's ranks
        if was_running:
            self._emit(rec, "cancelled", obj, final=True)
        return obj

    def content_path(self, video_id: str) -> Path | None:
        with self._lock:
            rec = self._records.get(video_id)
            if rec is None or rec.status != "completed" or rec.deleted:
                return None
        path = self._video_path(video_id)
        return path if path.is_file() else None

    def preview_png(self, video_id: str) -> bytes | None:
        with self._lock:
            rec = self._records.get(video_id)
            return None if rec is None or rec.preview is None else rec.preview[2]

    def subscribe(self, video_id: str, callback: Callable[[str, dict], None]) -> Callable[[], None] | None:
        """callback(event, data) for every event of the job, from the pump thread; first, synchronously, the
        current state (and the latest preview; for a finished job its final event). None for an unknown id."""
        with self._lock:
            rec = self._records.get(video_id)
            if rec is None:
                return None
            obj = self._object(rec)
            callback("state", obj)
            if rec.status in FINAL:
                callback(rec.status, obj)
                return lambda: None
            if rec.preview is not None:
                callback("preview", _preview_data(rec.preview))
            rec.subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in rec.subscribers:
                    rec.subscribers.remove(callback)

        return unsubscribe

    # -- requests -----------------------------------------------------------------------------------------------

    def _request(self, fields: dict) -> tuple[GenerateRequest, str | None]:
        from ..cli import parse_cache  # the CLI's --cache grammar: POLICY or POLICY:THRESHOLD
        from ..validate import check_request_cache, check_request_model, check_request_size

        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidField("prompt", "prompt is required and must not be empty")
        model = fields.get("model")
        if model is not None and model != self.model_name:
            raise InvalidField("model", f"unknown model {str(model)[:80]!r}; this server serves {self.model_name!r}")
        unknown = set(fields) - {"prompt", "model", "seconds", "size", "cache", *_REQUEST_FIELDS}
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidField(name, f"unknown field {name[:80]!r}")
        kwargs = {name: fields.get(name) for name in _REQUEST_FIELDS}
        size = fields.get("size")
        if size is not None:
            m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", str(size).strip())
            if not m:
                raise InvalidField("size", f"size must be WIDTHxHEIGHT like \"832x480\", got {str(size)[:40]!r}")
            kwargs["width"], kwargs["height"] = int(m.group(1)), int(m.group(2))
        seconds = fields.get("seconds")
        if seconds is not None:
            kwargs["frames"] = self._frames_for(seconds, kwargs)
        cache = fields.get("cache")
        if cache is not None:
            try:
                kwargs["cache"], kwargs["cache_threshold"] = parse_cache(str(cache))
            except ValueError as e:
                raise InvalidField("cache", f"cache: {e}") from None
        video_id = f"video_{secrets.token_hex(12)}"
        try:
            request = GenerateRequest(prompt, request_id=video_id, **kwargs).resolve(self.config)
            check_request_cache(request, self.config)
        except ValueError as e:
            raise InvalidField(_param_of(str(e)), str(e)) from None
        try:
            check_request_size(request, self.config)  # the embedded model's: a grid of copies at 64x64
        except ValueError as e:
            raise InvalidField("size", str(e)) from None
        if request.low_noise_guidance_scale != request.guidance_scale and self.experts == 1:
            raise InvalidField("low_noise_guidance_scale", "low_noise_guidance_scale applies to two-expert models "
                               "(Wan2.2 T2V-A14B); this server's model has one DiT: use guidance_scale")
        try:
            check_request_model(request, self.config)  # a size the model's VAE and patch do not divide
        except ValueError as e:
            raise InvalidField("size", str(e)) from None
        return request, (None if cache is None else str(cache))

    @functools.cached_property
    def experts(self) -> int | None:
        """DiTs of the served model (2: Wan2.2 T2V-A14B's two experts); None when its folder is not on this machine
        or cannot be read (the replicas' ranks check it where the weights are)."""
        from ..validate import model_experts

        try:
            return model_experts(self.config)
        except ValueError:  # a broken folder: the service's start says why
            return None

    def _frames_for(self, seconds, kwargs) -> int:
        """frames for a duration: the 4n+1 nearest seconds * fps (the VAE's frame count rule)."""
        try:
            value = float(seconds)
        except (TypeError, ValueError):
            raise InvalidField("seconds", f"seconds must be a number, got {str(seconds)[:40]!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise InvalidField("seconds", f"seconds must be a positive number, got {str(seconds)[:40]!r}")
        fps = kwargs["fps"] if isinstance(kwargs.get("fps"), int) and kwargs["fps"] > 0 else self.config.video.fps
        n = max(0, round((min(value, 1e6) * fps - 1) / 4))
        frames = 4 * n + 1
        if kwargs.get("frames") is not None and kwargs["frames"] != frames:
            raise InvalidField("seconds", f"seconds {value:g} at {fps} fps is {frames} frames, but frames is "
                               f"{kwargs['frames']}: give one of the two")
        return frames

    # -- the pump: replica events -> records, videos, subscribers --------------------------------------------------

    def _pump(self) -> None:
        while not self._stop.is_set():
            item = self.driver.next_event(self._run_id, 0.5)
            if item is None:
                continue
            kind, job, payload = item
            try:
                if kind == "fatal":
                    self._fail_all(f"no replica can start: {payload}")
                    continue
                self._handle(kind, job, payload)
            except Exception:  # noqa: BLE001 - one job's bad event must not stop the service
                log.exception("handling %s of %s", kind, getattr(job, "name", None))

    def _handle(self, kind: str, job: Job, payload) -> None:
        with self._lock:
            if self._stop.is_set():
                return  # closing: the replicas' last events (killed ranks) must not touch the records
            rec = self._records.get(job.name)
            if rec is None or rec.job is not job or rec.status in FINAL:
                return  # cancelled (or forgotten) while its events were on their way
            if kind == "start":
                rec.status, rec.stage, rec.step, rec.attempts = "in_progress", "encode", 0, job.attempts + 1
                self._save(rec)
                event = ("started", {"attempt": rec.attempts, "replica": payload[0]})  # payload: (slot, nodes)
            elif kind == "event":
                event = self._on_event(rec, payload)
            elif kind == "failed":
                event = self._on_failed(rec, job, *payload)
            else:  # "cancelled": DELETE has set the record already; a stray one (cancelled elsewhere) ends it
                rec.status, rec.stage = "cancelled", "done"
                self._save(rec)
                event = ("cancelled", self._object(rec))
        if event is not None:
            self._emit(rec, *event, final=event[0] in FINAL)

    def _on_event(self, rec: _Record, event) -> tuple[str, dict] | None:
        if isinstance(event, Progress):
            rec.stage, rec.step = event.stage, event.step
            share = 2 if event.stage == "encode" else 2 + 88 * event.step // max(event.total, 1)
            rec.progress = max(rec.progress, min(share, 90))
            return "progress", {"stage": event.stage, "step": event.step, "total": event.total,
                                "progress": rec.progress}
        if isinstance(event, Frame):
            if rec.writer is None:
                rec.writer = StreamingMP4(self._video_path(rec.id), rec.request.fps)
                rec.stage = "decode"
            try:
                rec.writer.append(event.image)
            except Exception as e:  # noqa: BLE001 - ffmpeg, disk: this video fails, the service goes on
                return self._finish_failed(rec, "write_failed", f"writing the video: {type(e).__name__}: {e}")
            rec.step = event.index + 1
            rec.progress = max(rec.progress, min(90 + 9 * (event.index + 1) // max(event.total, 1), 99))
            return "frame", {"index": event.index, "total": event.total, "progress": rec.progress}
        if isinstance(event, Result):
            if rec.writer is None:
                return self._finish_failed(rec, "no_frames", "the replica returned no frames")
            try:
                rec.writer.commit()
            except Exception as e:  # noqa: BLE001
                return self._finish_failed(rec, "write_failed", f"writing the video: {type(e).__name__}: {e}")
            rec.writer = None
            rec.status, rec.stage, rec.progress, rec.completed_at = "completed", "done", 100, time.time()
            self._save(rec)
            return "completed", self._object(rec)
        if isinstance(event, Preview):
            png = png_bytes(event.image)
            rec.preview = (event.step, event.total, png)
            return "preview", _preview_data(rec.preview)
        return None

    def _on_failed(self, rec: _Record, job: Job, message: str, retries: int) -> tuple[str, dict]:
        if rec.writer is not None:
            rec.writer.abort()
            rec.writer = None
        if job.attempts < min(retries, self.config.serve.max_attempts - 1):
            log.warning("%s failed (%s); retrying on another replica", rec.id, message)
            job.attempts += 1
            rec.status, rec.stage, rec.step = "queued", "queued", 0
            self._save(rec)
            self.driver.submit(self._run_id, job)
            return "queued", self._object(rec)
        return self._finish_failed(rec, "generation_failed", message)

    def _finish_failed(self, rec: _Record, code: str, message: str) -> tuple[str, dict]:
        if rec.writer is not None:
            rec.writer.abort()
            rec.writer = None
        rec.status, rec.stage, rec.completed_at = "failed", "done", time.time()
        rec.error = {"code": code, "message": message[:2000]}
        self._save(rec)
        return "failed", self._object(rec)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            self.error = message
            ended = [(rec, self._finish_failed(rec, "no_replica", message)) for rec in self._records.values()
                     if rec.status not in FINAL]
        for rec, event in ended:
            self._emit(rec, *event, final=True)

    # -- helpers ------------------------------------------------------------------------------------------------

    def _enqueue(self, rec: _Record) -> None:
        self._jobs += 1
        rec.job = Job(self._jobs, rec.request, self._video_path(rec.id), name=rec.id, attempts=rec.attempts)
        self.driver.submit(self._run_id, rec.job)

    def _video_path(self, video_id: str) -> Path:
        if not ID_RE.fullmatch(video_id):  # ids are ours (records are checked as they are read): never a path
            raise ValueError(f"not a video id: {video_id[:40]!r}")
        return self.videos_dir / f"{video_id}.mp4"

    def _save(self, rec: _Record) -> None:
        self._store.put(rec.id, rec.created_at, rec.persisted())

    def _prune(self) -> None:
        """Forget the oldest finished jobs (and delete their videos) beyond serve.keep_jobs."""
        excess = len(self._records) - self.config.serve.keep_jobs
        if excess <= 0:
            return
        finished = sorted((r for r in self._records.values() if r.status in FINAL), key=lambda r: r.created_at)
        for rec in finished[:excess]:
            self._video_path(rec.id).unlink(missing_ok=True)
            self._store.delete(rec.id)
            del self._records[rec.id]

    def _emit(self, rec: _Record, event: str, data: dict, final: bool = False) -> None:
        with self._lock:
            subscribers = list(rec.subscribers)
            if final:
                rec.subscribers.clear()
                rec.preview = None  # the video is what a finished job shows: 10,000 kept PNGs would be gigabytes
        for callback in subscribers:
            try:
                callback(event, data)
            except Exception:  # noqa: BLE001 - a broken subscriber must not stop the pump
                log.exception("an event subscriber of %s failed", rec.id)

    def _object(self, rec: _Record) -> dict:
        r = rec.request
        return {
            "id": rec.id, "object": "video", "status": rec.status, "progress": rec.progress,
            "created_at": int(rec.created_at),
            "completed_at": None if rec.completed_at is None else int(rec.completed_at), "expires_at": None,
            "model": self.model_name, "size": f"{r.width}x{r.height}", "seconds": f"{r.frames / r.fps:.3g}",
            "prompt": r.prompt, "negative_prompt": r.negative_prompt, "seed": r.seed, "frames": r.frames,
            "fps": r.fps, "steps": r.steps, "guidance_scale": r.guidance_scale,
            "low_noise_guidance_scale": r.low_noise_guidance_scale, "sampler": r.sampler,
            "cache": rec.cache, "attempts": rec.attempts, "stage": rec.stage, "step": rec.step,
            "total_steps": r.steps, "error": rec.error, "deleted": rec.deleted,
        }


_PARAMS = ("negative_prompt", "guidance_scale", "low_noise_guidance_scale", "request_id", "prompt", "seed", "height", "width", "frames", "fps",
           "steps", "shift", "sampler", "cache_threshold", "cache")


def _param_of(message: str) -> str | None:
    """The request field a GenerateRequest.resolve message is about (it starts with the field's name)."""
    if message.startswith(("height x width", "height", "width")):
        return "size"
    if message.startswith("a prompt of"):
        return "prompt"
    for name in _PARAMS:
        if re.match(rf"{name}\b", message):
            return "cache" if name == "cache_threshold" else name
    if "low-noise" in message or "low_noise" in message:  # cfg_degree=2 with the low-noise expert's guidance off
        return "low_noise_guidance_scale"
    if "guidance" in message:
        return "guidance_scale"
    return None


def _preview_data(preview: tuple[int, int, bytes]) -> dict:
    import base64

    step, total, png = preview
    return {"step": step, "total": total, "image": "data:image/png;base64," + base64.b64encode(png).decode()}


def _lock_folder(path: Path, wait_s: float = 0.0) -> int:
    """Hold an exclusive lock on the output folder for this service's life: two services writing one job database
    and one videos folder would resume each other's jobs. Waits up to wait_s for a service that is stopping (a
    redeploy starts the new one before the old one has let go)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise ValueError(f"another odyssey serve is using the output folder {path.parent} (waited "
                                 f"{wait_s:g} s for it to stop)") from None
            time.sleep(0.2)
