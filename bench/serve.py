"""`odyssey serve` measured the way a user runs it, side by side with the commands it replaces, in one run:

1. warm request latency (POST /v1/videos -> `completed` over Server-Sent Events; median of --requests after one
   warm-up request) vs the cold `odyssey generate` command (same prompt, steps and seed), with the ratio;
2. time to the first `progress` and the first `preview` event (previews on, as `odyssey serve` sets them);
3. throughput (videos/minute) with 1 and 2 replicas under --clients concurrent clients, each submitting --jobs
   videos one after another and waiting for each;
4. overhead vs the batch driver: --prompts videos submitted at once to 1 replica vs `odyssey batch` on the same
   prompts, seeds and settings (previews computed on both), each measured from its replica being free with the
   jobs waiting to the last video written (the batch from its manifest.jsonl timings, the service from its job
   records' created_at/completed_at); the service with every video followed over SSE and with a client that only
   lists them, plus the watching client's own view (first POST sent -> last `completed` received). --rounds
   alternate batch and service (the service idle, and measured, while the batch runs) so both see the same
   minutes of a shared machine; the best round of each is kept. Beside the times: the CPU each role's processes
   used per video (model worker, driver or ingress, Serve proxy, the rest) and the worker's computing thread's
   time running / waiting for a core / idle, which tells contention for the cores from waiting on the service.

Every command runs as a subprocess with the venv's bin first on PATH, a fresh HOME and, for the service, a free
port on 127.0.0.1 and an output folder in a temporary directory; each in its own session (the kernel's autogroup
scheduling then shares the cores between it and the machine's other sessions). Timings are wall clock on a
shared machine: the load average before each phase is printed beside it.

    python bench/serve.py [--quick] [--requests 5] [--clients 8] [--jobs 3] [--prompts 8] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx  # the httpx API (what the openai SDK installs)

PROMPTS = ["a red circle moving right", "a blue square moving up", "a green circle moving left",
           "a yellow square moving down", "a white circle moving up", "a red square moving left",
           "a blue circle moving down", "a green square moving right"]
PREVIEW_EVERY = 5  # what `odyssey serve` turns on (cluster.serve.app.DEFAULT_PREVIEW_EVERY); the batch gets it too
FINAL = ("completed", "failed", "cancelled")
DB_NAME = "odyssey-serve.sqlite3"  # cluster.serve.service.DB_NAME


class BenchError(RuntimeError):
    pass


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_env(home: Path, odyssey: Path) -> dict:
    """What a user's shell gives the command: the venv's bin first on PATH, their own HOME (fresh here), no Ray
    cluster to join."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{odyssey.parent}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    return env


def run_command(argv: list[str], env: dict, log: Path, timeout: float = 600) -> float:
    """Wall time of a whole command (start-up included); BenchError with its log's tail on failure."""
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd=log.parent)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[:2])} exited {proc.returncode}:\n{tail(log)}")
    return wall


def tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


TICK = os.sysconf("SC_CLK_TCK")
ROLES = ("model worker", "driver / ingress", "Serve proxy", "Ray daemons, Serve controller")


def cpu_by_role(session: int, leader_is_driver: bool) -> dict:
    """A snapshot of the live processes of a command's session: CPU seconds (user + system, every thread) used so
    far by role: the model worker (ray::SPWorker), what runs the job queue and writes the videos (the batch command
    itself, or the service's ingress replica), the Serve proxy (HTTP), and the rest (GCS, raylet, agents, Serve
    controller, the serve command's idle main process); short-lived children (the ffmpeg encoders) are not counted.
    Also the worker's threads' scheduler times (/proc/PID/task/TID/schedstat: running, waiting for a core)."""
    used = dict.fromkeys(ROLES, 0.0)
    threads: dict[int, tuple[float, float]] = {}
    t = time.perf_counter()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != session:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")[0].decode(errors="replace")
            if cmd.startswith("ray::SPWorker"):
                role = ROLES[0]
                for tid in os.listdir(f"/proc/{entry}/task"):
                    with open(f"/proc/{entry}/task/{tid}/schedstat") as f:
                        run_ns, wait_ns = f.read().split()[:2]
                    threads[int(tid)] = (int(run_ns) / 1e9, int(wait_ns) / 1e9)
            elif cmd.startswith("ray::ServeReplica") or (leader_is_driver and int(entry) == session):
                role = ROLES[1]
            elif cmd.startswith("ray::ProxyActor"):
                role = ROLES[2]
            else:
                role = ROLES[3]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        used[role] += (int(fields[11]) + int(fields[12])) / TICK
    return {"roles": used, "threads": threads, "t": t}


def cpu_delta(before: dict, after: dict) -> dict:
    """CPU by role between two snapshots, and the model worker's computing thread (the one that ran most): seconds
    it ran and waited for a core (the machine's other work). The rest of a measured span it was idle: waiting for
    its next job, i.e. for the driver."""
    roles = {role: after["roles"][role] - before["roles"][role] for role in ROLES}
    deltas = [(after["threads"][tid][0] - run, after["threads"][tid][1] - wait)
              for tid, (run, wait) in before["threads"].items() if tid in after["threads"]]
    run, queued = max(deltas, default=(0.0, 0.0))
    return {"roles": roles, "run": run, "queued": queued}


def run_batch(argv: list[str], env: dict, log: Path, manifest: Path, lines: int, warmup: int,
              timeout: float = 600) -> tuple[float, dict[str, float]]:
    """`odyssey batch` in its own session, watched: the CPU its processes use from the warm-up prompts' manifest
    lines to the last line (polled every 10 ms). Returns the whole command's wall time and that CPU by role."""
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                                start_new_session=True)
        try:
            before = after = None
            while proc.poll() is None and after is None:
                if time.perf_counter() - t0 > timeout:
                    raise BenchError(f"odyssey batch did not finish in {timeout:.0f} s")
                n = manifest.read_bytes().count(b"\n") if manifest.exists() else 0
                if before is None and n >= warmup:
                    before = cpu_by_role(proc.pid, leader_is_driver=True)
                if before is not None and n >= lines:
                    after = cpu_by_role(proc.pid, leader_is_driver=True)
                time.sleep(0.01)
            proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or after is None:
        raise BenchError(f"odyssey batch exited {proc.returncode}:\n{tail(log)}")
    return wall, cpu_delta(before, after)


class Server:
    """`odyssey serve` in its own session (its local Ray's processes with it); stopped with SIGTERM, which the command
    handles as Ctrl-C (SIGINT itself is ignored by a command started in the background of a non-interactive shell)."""

    def __init__(self, odyssey: Path, env: dict, work: Path, replicas: int, steps: int):
        self.port = free_port()
        self.output_dir = work / f"serve-{replicas}"
        self.log = work / f"serve-{replicas}.log"
        self.argv = [str(odyssey), "serve", "--replicas", str(replicas), "--port", str(self.port),
                     "--output-dir", str(self.output_dir), "--set", f"sampling.steps={steps}"]
        self.url = f"http://127.0.0.1:{self.port}"
        self._out = open(self.log, "wb")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, env=env, stdout=self._out, stderr=subprocess.STDOUT, cwd=work,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> float:
        """Seconds from the command's start to /healthz 200 (every replica loaded)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise BenchError(f"odyssey serve exited {self.proc.returncode}:\n{tail(self.log)}")
                try:
                    if client.get("/healthz").status_code == 200:
                        return time.perf_counter() - self.t0
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise BenchError(f"odyssey serve was not ready in {timeout:.0f} s:\n{tail(self.log)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                print("odyssey serve did not stop in 120 s after SIGTERM; killing its session", file=sys.stderr)
        try:  # whatever of this session outlived the command (its Ray processes stop with it normally)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._out.close()

    def cpu(self) -> dict[str, float]:
        return cpu_by_role(self.proc.pid, leader_is_driver=False)

    def records(self) -> dict[str, dict]:
        """The service's own job records (float created_at / completed_at; the API rounds them to seconds). Read
        after stop(): the database is the service's while it runs."""
        db = sqlite3.connect(f"file:{self.output_dir / DB_NAME}?mode=ro", uri=True)
        try:
            return {vid: json.loads(text) for vid, text in db.execute("SELECT id, record FROM videos")}
        finally:
            db.close()


def sse(response):
    """(event, data) pairs of a text/event-stream response."""
    event, data = None, []
    for line in response.iter_lines():
        if not line:
            if event is not None:
                yield event, json.loads("\n".join(data)) if data else None
            event, data = None, []
        elif line.startswith(":"):
            continue  # keep-alive comment
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def run_job(client: httpx.Client, body: dict) -> dict:
    """POST one video and follow its events to the end. Times in seconds from the POST being sent: post (the
    response), state (the stream's first event; late when the job had already started: then `started` and the
    first steps' `progress` went before the stream opened, and `state` shows where it was), the first started,
    progress, preview and frame events, end (the final event)."""
    t0 = time.perf_counter()
    r = client.post("/v1/videos", json=body)
    if r.status_code != 200:
        raise BenchError(f"POST /v1/videos: {r.status_code} {r.text[:300]}")
    video = r.json()
    marks = {"id": video["id"], "sent": t0, "post": time.perf_counter() - t0, "late": False}
    with client.stream("GET", f"/v1/videos/{video['id']}/events") as resp:
        if resp.status_code != 200:
            raise BenchError(f"GET events: {resp.status_code}")
        for event, data in sse(resp):
            now = time.perf_counter() - t0
            if event == "state":
                marks["state"], marks["state_step"] = now, (data["stage"], data["step"])
                marks["late"] = data["status"] != "queued"
            elif event in ("started", "progress", "preview", "frame") and event not in marks:
                marks[event] = now
                if event in ("progress", "preview"):
                    marks[f"{event}_step"] = data["step"]
            if event in FINAL:
                marks["end"], marks["status"] = now, event
                if event != "completed":
                    marks["error"] = (data or {}).get("error")
                break
    if marks.get("status") != "completed":
        raise BenchError(f"{video['id']} ended {marks.get('status', 'without a final event')}: {marks.get('error')}")
    return marks


def body_for(i: int, steps: int, seed: int) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": seed + i, "steps": steps}


def concurrent(url: str, clients: int, jobs: int, steps: int, seed: int) -> tuple[float, list[dict]]:
    """clients threads, each its own connection, each POSTing jobs videos one after another and waiting for each.
    Returns the wall time from the first POST to the last completion, and every job's marks."""
    results: list[dict] = []
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)

    def client_loop(c: int) -> None:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=600)) as client:
            start.wait()
            try:
                for j in range(jobs):
                    results.append(run_job(client, body_for(c * jobs + j, steps, seed)))
            except BaseException as e:  # noqa: BLE001 - reported by the caller
                errors.append(e)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise BenchError(f"{len(errors)} client(s) failed; first: {errors[0]}")
    return wall, results


def at_once(url: str, count: int, steps: int, seed: int) -> tuple[float, list[dict]]:
    """count videos POSTed back to back from one client, each followed by its own stream; the client's time from the
    first POST sent to the last `completed` received."""
    results: list[dict] = []
    errors: list[BaseException] = []

    def follow(client: httpx.Client, body: dict) -> None:
        try:
            results.append(run_job(client, body))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    clients = [httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=600)) for _ in range(count)]
    try:
        threads = []
        t0 = time.perf_counter()
        for i, client in enumerate(clients):  # each thread POSTs at once and then follows its stream
            t = threading.Thread(target=follow, args=(client, body_for(i, steps, seed)))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        for client in clients:
            client.close()
    if errors:
        raise BenchError(f"{len(errors)} job(s) failed; first: {errors[0]}")
    return wall, results


def unwatched(url: str, count: int, steps: int, seed: int) -> list[str]:
    """count videos POSTed back to back by a client that does not watch them: it lists the newest count videos every
    0.25 s until all are completed. Returns their ids."""
    with httpx.Client(base_url=url, timeout=30) as client:
        ids = []
        for i in range(count):
            r = client.post("/v1/videos", json=body_for(i, steps, seed))
            if r.status_code != 200:
                raise BenchError(f"POST /v1/videos: {r.status_code} {r.text[:300]}")
            ids.append(r.json()["id"])
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            time.sleep(0.25)
            videos = {v["id"]: v for v in client.get("/v1/videos", params={"limit": count}).json()["data"]}
            status = [videos[i]["status"] if i in videos else "missing" for i in ids]
            if any(st not in ("queued", "in_progress", "completed") for st in status):
                raise BenchError(f"unwatched videos ended {sorted(set(status))}")
            if all(st == "completed" for st in status):
                return ids
    raise BenchError("unwatched videos did not complete in 600 s")


def warm_up(url: str, replicas: int, steps: int, seed: int) -> list[dict]:
    """One video per replica at once (excluded from every measurement): the first run of a replica is slower."""
    return concurrent(url, replicas, 1, steps, seed + 1000)[1]


def service_done(records: dict, ids: list[str]) -> list[float]:
    """Each video's completion, in seconds from the first of them being created (the replica idle, the others
    arriving within milliseconds), sorted, from the service's records."""
    recs = [records[i] for i in ids]
    t0 = min(r["created_at"] for r in recs)
    return sorted(r["completed_at"] - t0 for r in recs)


def batch_done(manifest: Path, warmup: int) -> list[float]:
    """Each measured video's completion, in seconds from the warm-up prompts' last video written (the replica free,
    the other prompts queued), sorted, from the driver's own timings: queued_s (batch start -> the replica took it)
    + driver_total_s (-> its MP4 committed)."""
    lines = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    done = {line["index"]: line["timings"]["queued_s"] + line["timings"]["driver_total_s"] for line in lines}
    t0 = max(done[i] for i in range(warmup))
    return sorted(t - t0 for i, t in done.items() if i >= warmup)


def per_video(done: list[float]) -> float:
    """The median time between one video and the next (the first counted from the start): robust to one slow video
    on a shared machine, unlike the total."""
    return statistics.median(b - a for a, b in zip([0.0] + done[:-1], done))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def median_of(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 6 steps (a preview at step 5), 2 requests, 2 clients x 1 job, 2 prompts, "
                             "1 replica only, 1 cold run, 1 round")
    parser.add_argument("--requests", type=int, help="warm requests measured one after another (default 5)")
    parser.add_argument("--clients", type=int, help="concurrent clients for throughput (default 8)")
    parser.add_argument("--jobs", type=int, help="videos each client submits, one after another (default 3)")
    parser.add_argument("--prompts", type=int, help="videos submitted at once vs `odyssey batch` (default 8)")
    parser.add_argument("--steps", type=int, help="denoising steps of every video (default 20, the tiny preset's)")
    parser.add_argument("--cold", type=int, help="cold `odyssey generate` runs (default 2)")
    parser.add_argument("--rounds", type=int,
                        help="alternating batch / service rounds for the overhead, the best of each kept (default 3)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--odyssey", type=Path, default=Path(sys.executable).parent / "odyssey",
                        help="the odyssey command (default: the one beside this Python, the venv's)")
    args = parser.parse_args(argv)
    q = args.quick
    requests = args.requests or (2 if q else 5)
    clients = args.clients or (2 if q else 8)
    jobs = args.jobs or (1 if q else 3)
    count = args.prompts or (2 if q else 8)
    steps = args.steps or (6 if q else 20)
    cold_runs = args.cold or (1 if q else 2)
    rounds = args.rounds or (1 if q else 3)
    replica_counts = [1] if q else [1, 2]
    odyssey = args.odyssey.absolute()
    if not odyssey.is_file():
        print(f"serve bench: no odyssey command at {odyssey}", file=sys.stderr)
        return 2
    if min(requests, clients, jobs, count, steps, cold_runs, rounds) < 1:
        print("serve bench: every count must be >= 1", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="odyssey-bench-serve-") as tmp:
            report = measure(Path(tmp), odyssey, requests, clients, jobs, count, steps, cold_runs, rounds,
                             replica_counts, args.seed)
    except BenchError as e:
        print(f"serve bench: {e}", file=sys.stderr)
        return 1
    print(report)
    return 0


def measure(work: Path, odyssey: Path, requests: int, clients: int, jobs: int, count: int, steps: int,
            cold_runs: int, rounds: int, replica_counts: list[int], seed: int) -> str:
    home = work / "home"
    home.mkdir()
    env = user_env(home, odyssey)
    prompt = PROMPTS[0]
    sets = ["--set", f"sampling.steps={steps}"]
    out: list[str] = []
    t_bench = time.perf_counter()
    loads = {}

    # 1. the cold command (nothing else of ours running)
    loads["cold"] = load()
    cold, cold_video = [], []
    for i in range(cold_runs):
        manifest = work / f"cold-{i}.jsonl"
        cold.append(run_command([str(odyssey), "generate", prompt, "-o", str(work / f"cold-{i}.mp4"), "--seed",
                                 str(seed), "--manifest", str(manifest), "--progress", "none", *sets], env,
                                work / f"cold-{i}.log"))
        cold_video.append(json.loads(manifest.read_text())["timings"]["driver_total_s"])
    prompts_file = work / "prompts.txt"
    # line 0: a warm-up prompt (its replica's first video), then the `count` measured ones, seeded as the service's
    prompts_file.write_text("\n".join([PROMPTS[0]] + [body_for(i, steps, seed)["prompt"] for i in range(count)]) + "\n")

    def batch_round(r: int) -> tuple[float, list[float], dict]:
        """(the whole command's wall time, completions, CPU by role) of one `odyssey batch` run."""
        manifest = work / f"batch-{r}" / "manifest.jsonl"
        wall, cpu = run_batch([str(odyssey), "batch", str(prompts_file), "-o", str(work / f"batch-{r}"), "--seed",
                               str(seed - 1), "--progress", "none", *sets, "--set",
                               f"sampling.preview_every={PREVIEW_EVERY}"], env, work / f"batch-{r}.log", manifest,
                              lines=count + 1, warmup=1)
        done = batch_done(manifest, warmup=1)
        assert len(done) == count, done
        return wall, done, cpu

    # 2. the service, 1 replica then 2
    through: dict[int, tuple] = {}
    for replicas in replica_counts:
        loads[f"start{replicas}"] = load()
        server = Server(odyssey, env, work, replicas, steps)
        try:
            startup = server.wait_ready()
            warm_up(server.url, replicas, steps, seed)
            if replicas == 1:
                loads["warm"] = load()
                with httpx.Client(base_url=server.url, timeout=httpx.Timeout(30, read=600)) as client:
                    warm = [run_job(client, {"prompt": prompt, "seed": seed, "steps": steps})
                            for _ in range(requests)]
                    mp4 = client.get(f"/v1/videos/{warm[0]['id']}/content")
                    if mp4.status_code != 200 or mp4.headers.get("content-type") != "video/mp4":
                        raise BenchError(f"GET content: {mp4.status_code} {mp4.headers.get('content-type')}")
                same_video = mp4.content == (work / "cold-0.mp4").read_bytes()
                # the batch and the service alternate, so that both see the machine's load of the same minutes;
                # the service stays up (idle) while the batch runs: what it uses meanwhile is measured
                batches, onces, quiets, idle = [], [], [], []  # per round
                for r in range(rounds):
                    loads.setdefault("batch", []).append(load())
                    before = server.cpu()
                    batches.append(batch_round(r))
                    idle.append((cpu_delta(before, server.cpu()), batches[-1][0]))
                    loads.setdefault("once", []).append(load())
                    before = server.cpu()
                    wall, results = at_once(server.url, count, steps, seed)
                    onces.append((wall, results, cpu_delta(before, server.cpu())))
                    loads.setdefault("quiet", []).append(load())
                    before = server.cpu()
                    ids = unwatched(server.url, count, steps, seed)
                    quiets.append((ids, cpu_delta(before, server.cpu())))
                startup1 = startup
            loads[f"thr{replicas}"] = load()
            wall, results = concurrent(server.url, clients, jobs, steps, seed + 100)
            through[replicas] = (wall, results, startup)
        finally:
            server.stop()
        if replicas == 1:
            records = server.records()

    # -- report
    cold_wall = statistics.median(cold)
    warm_lat = median_of(warm, "end")
    warm_srv = [records[r["id"]]["completed_at"] - records[r["id"]]["created_at"] for r in warm]
    late = sum(r["late"] for r in warm)
    goal = "met" if warm_lat <= 1.0 else "NOT met"

    def row(what: str, values: list[float], note: str = "", load_: str = "") -> None:
        if values:
            out.append(f"| {what} | {ms(statistics.median(values))} | {ms(min(values))} | {ms(max(values))} | "
                       f"{len(values)} | {note} | {load_} |")
        else:
            out.append(f"| {what} | none seen | | | 0 | {note} | {load_} |")

    def steps_of(key: str) -> str:
        seen = sorted({r[key] for r in warm if key in r})
        return f"step {seen[0]}" + (f"-{seen[-1]}" if len(seen) > 1 else "") if seen else ""

    out.append(f"`odyssey serve` vs the commands, tiny preset, {steps} steps, 17 frames 32x32, seed {seed}, "
               f"previews every {PREVIEW_EVERY} steps in the service; 1 replica = 1 worker with 1 CPU (1 torch thread)")
    out.append("")
    out.append("| what | median | min | max | n | note | load before |")
    out.append("|---|---|---|---|---|---|---|")
    row("cold `odyssey generate` (whole command: Ray, actor, model load, video)", cold, "", loads["cold"])
    row("... of which its video (manifest driver_total_s)", cold_video)
    row("warm request: POST -> `completed` event (client)", [r["end"] for r in warm], "after 1 warm-up request",
        loads["warm"])
    row("... service's record: created_at -> completed_at", warm_srv)
    row("... POST response", [r["post"] for r in warm])
    states = sorted({f"{stage} {step}" for r in warm for stage, step in [r["state_step"]]})
    row("events stream open (`state`)", [r["state"] for r in warm],
        f"{late} of {len(warm)} already started: at {', '.join(states)}")
    row("first `progress` event", [r["progress"] for r in warm if "progress" in r], steps_of("progress_step"))
    row("first `preview` event", [r["preview"] for r in warm if "preview" in r], steps_of("preview_step"))
    row("first `frame` event (decode started)", [r["frame"] for r in warm if "frame" in r])
    out.append("")
    out.append(f"cold / warm: **{cold_wall / warm_lat:.1f}x** ({ms(cold_wall)} vs {ms(warm_lat)}; goal warm <= 1 s: "
               f"{goal}). Service start-up (command -> /healthz 200): {ms(startup1)}, once. The service's MP4 is "
               f"{'byte-identical to' if same_video else 'NOT byte-identical to'} the cold command's.")
    out.append("")
    out.append(f"Throughput: {clients} concurrent clients, each POSTing {jobs} video(s) one after another and waiting "
               f"for each (after one warm-up video per replica)")
    out.append("")
    out.append("| replicas | videos | wall | videos/min | latency median | latency max | vs 1 replica | load before |")
    out.append("|---|---|---|---|---|---|---|---|")
    base = None
    for replicas, (wall, results, _) in through.items():
        rate = len(results) / wall * 60
        base = base or rate
        lat = [r["end"] for r in results]
        out.append(f"| {replicas} | {len(results)} | {ms(wall)} | {rate:.1f} | {ms(statistics.median(lat))} | "
                   f"{ms(max(lat))} | {rate / base:.2f}x | {loads[f'thr{replicas}']} |")
    if len(replica_counts) == 1:
        out.append("| 2 | skipped (--quick) | | | | | | |")
    out.append("")
    # best of the rounds on each side (the least disturbed by the machine's other work)
    b_best = min(range(rounds), key=lambda r: batches[r][1][-1])
    batch_wall, batch, batch_cpu = batches[b_best]
    watched_all = [(service_done(records, [r["id"] for r in results]), wall, cpu) for wall, results, cpu in onces]
    w_best = min(range(rounds), key=lambda r: watched_all[r][0][-1])
    watched = watched_all[w_best]
    quiet_all = [(service_done(records, ids), cpu) for ids, cpu in quiets]
    q_best = min(range(rounds), key=lambda r: quiet_all[r][0][-1])
    quiet = quiet_all[q_best]
    idle_cpu = sum(sum(cpu["roles"].values()) for cpu, _ in idle) / sum(wall for _, wall in idle)
    out.append(f"Overhead vs the batch driver: {count} videos, 1 replica, previews every {PREVIEW_EVERY} steps on "
               f"both; from the replica free with every video waiting to the last video written (batch: manifest "
               f"timings from the warm-up prompt's MP4 written; service: records' first created_at -> last "
               f"completed_at); {rounds} alternating round(s) (batch, watched, unwatched), the best of each kept. "
               f"CPU: seconds used over that span by each role's processes, per video.")
    out.append("")
    out.append("| path | total | per video (median gap) | total vs batch | CPU/video: " + " | ".join(ROLES) +
               " | CPU/video total | worker thread per video: computing / waiting for a core / idle (the rest of the "
               "total) | load before |")
    out.append("|---|---|---|---|" + "---|" * len(ROLES) + "---|---|---|")

    def overhead_row(name: str, done: list[float], cpu: dict, load_: str) -> None:
        roles = cpu["roles"]
        out.append(f"| {name} | {ms(done[-1])} | {ms(per_video(done))} | {done[-1] / batch[-1]:.3f} | " +
                   " | ".join(f"{roles[role] / count:.3f} s" for role in ROLES) +
                   f" | {sum(roles.values()) / count:.3f} s | {ms(cpu['run'] / count)} / "
                   f"{ms(cpu['queued'] / count)} / {ms(max(0.0, done[-1] - cpu['run'] - cpu['queued']) / count)} | "
                   f"{load_} |")

    overhead_row("`odyssey batch`", batch, batch_cpu, loads["batch"][b_best])
    overhead_row("`odyssey serve`, each client following its video's events (SSE)", watched[0], watched[2],
                 loads["once"][w_best])
    overhead_row("`odyssey serve`, the client listing the videos every 0.25 s", quiet[0], quiet[1],
                 loads["quiet"][q_best])
    out.append("")
    over_w, over_q = watched[0][-1] / batch[-1] - 1, quiet[0][-1] / batch[-1] - 1
    out.append(f"Service overhead: **{over_w * 100:+.1f}%** with every video watched over SSE, "
               f"**{over_q * 100:+.1f}%** unwatched (goal <= 5%: "
               f"{'met' if max(over_w, over_q) <= 0.05 else 'NOT met'}); "
               f"{(watched[1] / batch[-1] - 1) * 100:+.1f}% as the watching client sees it (first POST sent -> last "
               f"`completed` received: {ms(watched[1])}). The batch command's whole wall time (start-up, warm-up "
               f"prompt, {count} videos): {ms(batch_wall)}. The idle service used {idle_cpu * 100:.0f}% of a core "
               f"while the batch ran. Totals of every round (batch, watched, unwatched): " +
               "; ".join(f"{ms(batches[r][1][-1])}, {ms(watched_all[r][0][-1])}, {ms(quiet_all[r][0][-1])}"
                         for r in range(rounds)) + ".")
    out.append(f"\nBench wall time: {time.perf_counter() - t_bench:.0f} s")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
