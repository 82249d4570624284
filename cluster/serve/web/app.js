// The page of `odyssey serve`: submit prompts, follow every job live, watch the results, cancel.
// No framework and no build step. Every piece of text from the server goes through textContent (prompts are user
// text); the only markup is what this file builds with createElement.
"use strict";

(() => {
  const TOKEN_KEY = "odyssey.token";
  const FINAL = new Set(["completed", "failed", "cancelled"]);
  const PAGE = 20;
  const POLL_MS = 3000;
  const HEALTH_MS = 5000;
  // Browsers open at most 6 HTTP/1.1 connections per host and every followed job holds one: follow a few (running
  // ones first), the list poll keeps the others current, and requests like POST never wait behind the streams.
  const MAX_STREAMS = 3;
  const ID_RE = /^video_[0-9a-f]{24}$/;

  const $ = (id) => document.getElementById(id);
  const jobs = new Map(); // id -> Job
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let authPrompt = null; // the pending token request, shared by every call that got a 401
  let olderAfter = null; // id to page on from ("Show older jobs")

  // ---------- helpers ----------

  function h(tag, props = {}, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (v == null) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("data-") || k.startsWith("aria-")) el.setAttribute(k, v);
      else el[k] = v;
    }
    for (const c of children) if (c != null) el.append(c);
    return el;
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const url = (path) => new URL(path, document.baseURI).toString();

  // Seeds go up to 2^63: keep integers a double cannot hold as their exact text (JSON.parse source access).
  function parseJSON(text) {
    return JSON.parse(text, (key, value, ctx) =>
      typeof value === "number" && !Number.isSafeInteger(value) && Number.isInteger(value) && ctx && ctx.source
        ? ctx.source : value);
  }

  class HttpError extends Error {
    constructor(status, message, param) {
      super(message);
      this.status = status;
      this.param = param || null;
    }
  }

  async function errorOf(resp) {
    let message = `${resp.status} ${resp.statusText}`.trim();
    let param = null;
    try {
      const body = parseJSON(await resp.text());
      if (body && body.error) {
        if (body.error.message) message = String(body.error.message);
        param = body.error.param || null;
      }
    } catch (_) { /* not JSON: keep the status line */ }
    if (resp.status === 429) {
      const after = resp.headers.get("Retry-After");
      if (after) message += ` (retry in ${after} s)`;
    }
    return new HttpError(resp.status, message, param);
  }

  // Every /v1 call: the token as a Bearer header; a 401 asks for the token (once for all waiting calls), retries.
  async function api(path, { method = "GET", json, headers = {}, signal, raw = false } = {}) {
    for (;;) {
      const used = token;
      const hdrs = new Headers(headers);
      if (used) hdrs.set("Authorization", `Bearer ${used}`);
      let body;
      if (json !== undefined) {
        hdrs.set("Content-Type", "application/json");
        body = JSON.stringify(json);
      }
      const resp = await fetch(url(path), { method, headers: hdrs, body, signal, cache: "no-store" });
      if (resp.status === 401) {
        resp.body && resp.body.cancel().catch(() => {});
        if (token === used) await askToken(used ? "The server refused this token." : "");
        continue;
      }
      if (!resp.ok) throw await errorOf(resp);
      if (raw) return resp;
      const text = await resp.text();
      return text ? parseJSON(text) : null;
    }
  }

  function askToken(message) {
    const dlg = $("auth");
    $("auth-error").textContent = message;
    if (!authPrompt) {
      authPrompt = new Promise((resolve) => {
        $("token").value = "";
        $("auth-form").onsubmit = (ev) => {
          ev.preventDefault();
          const value = $("token").value.trim();
          if (!value) return;
          token = value;
          sessionStorage.setItem(TOKEN_KEY, value);
          $("signout").hidden = false;
          authPrompt = null;
          dlg.close();
          resolve();
        };
        dlg.showModal();
        $("token").focus();
      });
    }
    return authPrompt;
  }

  function contentPath(id) {
    return `v1/videos/${encodeURIComponent(id)}/content`;
  }

  function when(ts) {
    if (!ts) return "";
    const d = new Date(ts * 1000);
    const today = new Date().toDateString() === d.toDateString();
    return today ? d.toLocaleTimeString() : d.toLocaleString();
  }

  // ---------- one job ----------

  class Job {
    constructor(v) {
      this.v = {};
      this.stream = null; // AbortController of the followed event stream
      this.blobUrl = null; // the MP4 fetched with the token
      this.videoFor = null; // id whose video is loaded

      this.img = h("img", { class: "preview", alt: "preview", hidden: true, decoding: "async" });
      this.placeholder = h("span", { class: "muted" });
      this.video = null;
      this.media = h("div", { class: "media" }, this.img, this.placeholder);
      this.prompt = h("span", { class: "prompt" });
      this.badge = h("span", { class: "badge status" });
      this.meta = h("div", { class: "meta" });
      this.bar = h("progress", { max: 100, value: 0, "aria-label": "progress" });
      this.pct = h("span", { class: "pct" });
      this.error = h("p", { class: "error", hidden: true });
      this.cancelBtn = h("button", { type: "button", class: "cancel", text: "Cancel" });
      this.download = h("a", { text: "Download", hidden: true });
      this.reuse = h("button", { type: "button", class: "secondary", text: "Reuse settings" });
      this.el = h("li", { class: "job" },
        this.media,
        h("div", { class: "body" },
          h("div", { class: "top" }, this.prompt, this.badge),
          this.meta,
          h("div", { class: "row" }, this.bar, this.pct),
          this.error,
          h("div", { class: "buttons" }, this.cancelBtn, this.download, this.reuse)));
      this.cancelBtn.addEventListener("click", () => this.cancel());
      this.reuse.addEventListener("click", () => fillForm(this.v));
      this.update(v);
    }

    get id() { return this.v.id; }
    get final() { return FINAL.has(this.v.status); }

    update(v) {
      const before = this.v.progress || 0;
      this.v = { ...this.v, ...v };
      // progress only moves forward while a job runs (events and list polls may arrive out of order)
      if (!this.final && typeof this.v.progress === "number") this.v.progress = Math.max(before, this.v.progress);
      this.render();
    }

    render() {
      const v = this.v;
      this.el.dataset.id = v.id;
      this.el.dataset.status = v.status;
      this.el.dataset.deleted = v.deleted ? "true" : "false";
      this.prompt.textContent = v.prompt || "";
      this.prompt.title = v.prompt || "";
      this.badge.textContent = (v.status || "").replace("_", " ");
      this.badge.dataset.status = v.status;

      const parts = [v.model, v.size];
      if (v.frames) parts.push(`${v.frames} frames${v.fps ? ` @ ${v.fps} fps` : ""}`);
      if (v.steps) parts.push(`${v.steps} steps`);
      if (v.guidance_scale != null) parts.push(`guidance ${v.guidance_scale}`);
      if (v.sampler) parts.push(v.sampler);
      if (v.cache && v.cache !== "off") parts.push(`cache ${v.cache}`);
      if (v.seed != null) parts.push(`seed ${v.seed}`);
      if (v.negative_prompt) parts.push(`not: ${v.negative_prompt}`);
      if (v.attempts > 1) parts.push(`attempt ${v.attempts}`);
      parts.push(when(v.created_at));
      this.meta.textContent = parts.filter((p) => p != null && p !== "").join(" · ");

      const progress = v.status === "completed" ? 100 : Math.max(0, Math.min(100, v.progress || 0));
      if (this.bar.value !== progress) this.bar.value = progress;
      this.pct.textContent = this.progressText(progress);

      const err = v.error && (v.error.message || v.error.code);
      this.error.hidden = !err;
      this.error.textContent = err ? String(err) : "";

      const active = v.status === "queued" || v.status === "in_progress";
      const deletable = v.status === "completed" && !v.deleted;
      this.cancelBtn.hidden = !(active || deletable);
      this.cancelBtn.textContent = active ? "Cancel" : "Delete";
      this.cancelBtn.dataset.action = active ? "cancel" : "delete";

      if (deletable) this.showVideo();
      else this.dropVideo();
      this.img.hidden = !this.img.getAttribute("src") || !!this.video;
      const noImage = this.img.hidden && !this.video;
      this.placeholder.hidden = !noImage;
      if (noImage) {
        this.placeholder.textContent = v.deleted ? "deleted" : v.status === "queued" ? "queued" :
          v.status === "in_progress" ? "starting…" : (v.status || "").replace("_", " ");
      }
    }

    progressText(progress) {
      const v = this.v;
      if (v.status === "queued") return "waiting for a replica";
      if (v.status === "completed") {
        const took = v.completed_at && v.created_at ? ` in ${Math.max(0, v.completed_at - v.created_at)} s` : "";
        return `done${took}`;
      }
      if (v.status !== "in_progress") return `${progress}%`;
      let stage = v.stage || "";
      if (stage === "encode") stage = "encoding the prompt";
      else if (stage === "denoise" && v.total_steps) stage = `step ${v.step || 0}/${v.total_steps}`;
      else if (stage === "decode" && v.frames) stage = `frame ${Math.min(v.step || 0, v.frames)}/${v.frames}`;
      return stage ? `${stage} · ${progress}%` : `${progress}%`;
    }

    setPreview(image) {
      if (typeof image !== "string" || !image.startsWith("data:image/")) return;
      this.img.src = image;
      this.render();
    }

    onEvent(name, data) {
      if (!data || typeof data !== "object") return;
      switch (name) {
        case "state": case "completed": case "failed": case "cancelled":
          if (data.id === this.id) this.update(data);
          break;
        case "queued":
          this.update({ status: "queued" });
          break;
        case "started":
          this.update({ status: "in_progress", attempts: data.attempt ?? this.v.attempts });
          break;
        case "progress":
          this.update({
            status: "in_progress", stage: data.stage ?? this.v.stage, step: data.step ?? this.v.step,
            total_steps: data.total ?? this.v.total_steps, progress: data.progress ?? this.v.progress,
          });
          break;
        case "frame": // index counts from 0; the video object's step counts the frames decoded
          this.update({
            status: "in_progress", stage: "decode", step: (data.index ?? 0) + 1, frames: data.total ?? this.v.frames,
            progress: data.progress ?? this.v.progress,
          });
          break;
        case "preview":
          this.setPreview(data.image);
          break;
        default:
          break; // an event this page does not know: newer server
      }
    }

    showVideo() {
      if (this.videoFor === this.id) return;
      this.videoFor = this.id;
      const video = h("video", {
        controls: true, muted: true, loop: true, playsInline: true, preload: "auto",
        "aria-label": "generated video",
      });
      this.video = video;
      this.media.append(video);
      const name = `${(this.v.prompt || "video").slice(0, 60).replace(/[^\w-]+/g, "-")}.mp4`;
      this.download.download = name;
      if (!token) {
        // Straight from the server: the browser fetches with Range requests and can seek.
        video.src = url(contentPath(this.id));
        this.download.href = video.src;
        this.download.hidden = false;
        return;
      }
      // A <video> cannot send the Authorization header: fetch the file, play it from memory.
      api(contentPath(this.id), { raw: true })
        .then((resp) => resp.blob())
        .then((blob) => {
          if (this.video !== video) return;
          this.blobUrl = URL.createObjectURL(blob);
          video.src = this.blobUrl;
          this.download.href = this.blobUrl;
          this.download.hidden = false;
        })
        .catch((e) => {
          if (this.video === video) this.showError(`video: ${e.message}`);
        });
    }

    dropVideo() {
      if (!this.video) return;
      this.video.removeAttribute("src");
      this.video.load();
      this.video.remove();
      this.video = null;
      this.videoFor = null;
      this.download.hidden = true;
      this.download.removeAttribute("href");
      if (this.blobUrl) URL.revokeObjectURL(this.blobUrl);
      this.blobUrl = null;
    }

    showError(text) {
      this.error.hidden = false;
      this.error.textContent = text;
    }

    async cancel() {
      const deleting = this.v.status === "completed";
      if (deleting && !window.confirm("Delete this video?")) return;
      this.cancelBtn.disabled = true;
      try {
        const v = await api(`v1/videos/${encodeURIComponent(this.id)}`, { method: "DELETE" });
        if (v && v.id === this.id) this.update(v);
      } catch (e) {
        this.showError(`${deleting ? "delete" : "cancel"}: ${e.message}`);
      } finally {
        this.cancelBtn.disabled = false;
      }
      pump();
    }

    // Follow the job's Server-Sent Events until it ends (fetch, not EventSource: it must send the token).
    async follow() {
      const ctl = new AbortController();
      this.stream = ctl;
      let delay = 500;
      try {
        while (!ctl.signal.aborted && !this.final) {
          try {
            const resp = await api(`v1/videos/${encodeURIComponent(this.id)}/events`, {
              raw: true, signal: ctl.signal, headers: { Accept: "text/event-stream" },
            });
            await readEvents(resp.body, (name, data) => this.onEvent(name, data));
            delay = 500;
          } catch (e) {
            if (ctl.signal.aborted) return;
            if (e instanceof HttpError && e.status === 404) {
              const gone = { code: "not_found", message: "the server no longer has this job" };
              this.update({ status: this.v.status === "completed" ? "completed" : "failed", deleted: true,
                            error: this.v.error || gone });
              return;
            }
          }
          if (!this.final) {
            await sleep(delay);
            delay = Math.min(delay * 2, 8000);
          }
        }
      } finally {
        if (this.stream === ctl) this.stream = null;
        pump();
      }
    }

    stop() {
      if (this.stream) this.stream.abort();
      this.stream = null;
    }
  }

  // text/event-stream: `event:` and `data:` lines, a blank line ends an event (CR, LF or CRLF line ends).
  async function readEvents(body, onEvent) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    let event = "";
    let data = [];
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buf += value;
        for (;;) {
          const m = /\r\n|\r|\n/.exec(buf);
          if (!m || (m[0] === "\r" && m.index === buf.length - 1)) break; // a CR may be half of a CRLF
          const line = buf.slice(0, m.index);
          buf = buf.slice(m.index + m[0].length);
          if (line === "") {
            if (data.length) {
              let parsed = null;
              try { parsed = parseJSON(data.join("\n")); } catch (_) { /* skip a malformed event */ }
              if (parsed !== null) onEvent(event || "message", parsed);
            }
            event = "";
            data = [];
          } else if (!line.startsWith(":")) {
            const c = line.indexOf(":");
            const field = c < 0 ? line : line.slice(0, c);
            let val = c < 0 ? "" : line.slice(c + 1);
            if (val.startsWith(" ")) val = val.slice(1);
            if (field === "event") event = val;
            else if (field === "data") data.push(val);
          }
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  // Start following the jobs that need it most (running, then the next queued), up to MAX_STREAMS.
  function pump() {
    let open = 0;
    for (const j of jobs.values()) if (j.stream) open += 1;
    if (open >= MAX_STREAMS) return;
    const waiting = [...jobs.values()].filter((j) => !j.stream && !j.final);
    waiting.sort((a, b) => (a.v.status === "in_progress" ? 0 : 1) - (b.v.status === "in_progress" ? 0 : 1)
      || (a.v.created_at || 0) - (b.v.created_at || 0));
    for (const j of waiting.slice(0, MAX_STREAMS - open)) j.follow();
  }

  // ---------- the list ----------

  function place(job, { top = false } = {}) {
    const list = $("jobs");
    let before = null;
    if (top) before = list.firstElementChild;
    else {
      const t = job.v.created_at || 0;
      for (const el of list.children) {
        const other = jobs.get(el.dataset.id);
        if (other && (other.v.created_at || 0) < t) { before = el; break; }
      }
    }
    list.insertBefore(job.el, before); // existing cards never move: moving a <video> would pause it
    $("empty").hidden = true;
  }

  function merge(v, opts) {
    if (!v || typeof v.id !== "string" || !ID_RE.test(v.id)) return null;
    let job = jobs.get(v.id);
    if (job) {
      if (!job.stream) job.update(v); // a followed job hears it first from its own stream
    } else {
      job = new Job(v);
      jobs.set(v.id, job);
      place(job, opts);
    }
    return job;
  }

  async function refresh() {
    try {
      const page = await api(`v1/videos?limit=${PAGE}`);
      $("list-error").textContent = "";
      $("jobs").setAttribute("aria-busy", "false");
      for (const v of page.data || []) merge(v);
      if (olderAfter === null) {
        olderAfter = page.has_more ? page.last_id : "";
        $("more").hidden = !page.has_more;
      }
      // jobs further down that still run and nobody follows: ask for them one by one
      const seen = new Set((page.data || []).map((v) => v.id));
      for (const j of jobs.values()) {
        if (!j.final && !j.stream && !seen.has(j.id)) {
          api(`v1/videos/${encodeURIComponent(j.id)}`).then((v) => merge(v)).catch(() => {});
        }
      }
      $("empty").hidden = jobs.size > 0;
      pump();
    } catch (e) {
      $("list-error").textContent = `Cannot list jobs: ${e.message}`;
    }
  }

  async function loadOlder() {
    if (!olderAfter) return;
    const btn = $("more");
    btn.disabled = true;
    try {
      const page = await api(`v1/videos?limit=${PAGE}&after=${encodeURIComponent(olderAfter)}`);
      for (const v of page.data || []) merge(v);
      olderAfter = page.has_more ? page.last_id : "";
      btn.hidden = !page.has_more;
      pump();
    } catch (e) {
      $("list-error").textContent = `Cannot list jobs: ${e.message}`;
    } finally {
      btn.disabled = false;
    }
  }

  async function poll() {
    for (;;) {
      await sleep(document.hidden ? POLL_MS * 4 : POLL_MS);
      if (!authPrompt) await refresh();
    }
  }

  // ---------- server state ----------

  async function health() {
    const badge = $("health");
    for (;;) {
      try {
        const resp = await fetch(url("healthz"), { cache: "no-store" });
        let body = {};
        try { body = await resp.json(); } catch (_) { /* keep {} */ }
        const replicas = body.replicas != null ? `${body.replicas_up ?? 0}/${body.replicas} replicas` : "";
        const problem = body.error && typeof body.error === "object" ? body.error.message : body.error;
        if (resp.ok) {
          badge.dataset.state = "ready";
          badge.textContent = ["ready", replicas].filter(Boolean).join(" · ");
        } else if (body.status === "starting") {
          badge.dataset.state = "loading";
          badge.textContent = ["loading", replicas].filter(Boolean).join(" · ");
        } else {
          badge.dataset.state = "down";
          badge.textContent = "error";
        }
        badge.title = problem && !resp.ok ? String(problem)
          : `${body.queued ?? 0} queued, ${body.running ?? 0} running`;
      } catch (_) {
        badge.dataset.state = "down";
        badge.textContent = "unreachable";
        badge.title = "";
      }
      await sleep(HEALTH_MS);
    }
  }

  async function loadModels() {
    try {
      const body = await api("v1/models");
      const models = (body && body.data) || [];
      $("model").textContent = models.map((m) => m.id).join(", ");
      const sizes = new Set();
      for (const m of models) for (const s of m.sizes || []) sizes.add(String(s));
      for (const j of jobs.values()) if (j.v.size) sizes.add(j.v.size);
      const list = $("sizes");
      list.replaceChildren(...[...sizes].map((s) => h("option", { value: s })));
      const defaults = (models[0] && models[0].defaults) || {};
      const hint = (id, value) => { if (value != null) $(id).placeholder = `default ${value}`; };
      hint("size", defaults.size);
      hint("steps", defaults.steps);
      hint("guidance_scale", defaults.guidance_scale);
      if (defaults.seconds != null) hint("length", defaults.seconds);
    } catch (e) {
      $("model").textContent = "";
    }
  }

  // ---------- the form ----------

  const FIELD_INPUT = {
    prompt: "prompt", negative_prompt: "negative_prompt", size: "size", seconds: "length", frames: "length",
    steps: "steps", guidance_scale: "guidance_scale", seed: "seed", cache: "cache",
  };

  function formFields() {
    const text = (id) => $(id).value.trim();
    const fields = {};
    const prompt = $("prompt").value.trim();
    if (!prompt) throw new HttpError(0, "Write a prompt.", "prompt");
    fields.prompt = prompt;
    if (text("negative_prompt")) fields.negative_prompt = $("negative_prompt").value;
    const size = text("size").replace(/[×*X]/g, "x").replace(/\s+/g, "");
    if (size) {
      if (!/^\d+x\d+$/.test(size)) throw new HttpError(0, "Size is WIDTHxHEIGHT, e.g. 832x480.", "size");
      fields.size = size;
    }
    const length = text("length");
    if (length) {
      if ($("length_unit").value === "frames") {
        if (!/^\d+$/.test(length)) throw new HttpError(0, "Frames is a whole number.", "frames");
        fields.frames = Number(length);
      } else {
        if (!(Number(length) > 0)) throw new HttpError(0, "Seconds must be a number above 0.", "seconds");
        fields.seconds = length; // a string, as in OpenAI's API
      }
    }
    const steps = text("steps");
    if (steps) {
      if (!/^\d+$/.test(steps)) throw new HttpError(0, "Steps is a whole number.", "steps");
      fields.steps = Number(steps);
    }
    const guidance = text("guidance_scale");
    if (guidance) {
      if (!Number.isFinite(Number(guidance))) throw new HttpError(0, "Guidance is a number.", "guidance_scale");
      fields.guidance_scale = Number(guidance);
    }
    const seed = text("seed");
    if (seed) {
      if (!/^\d+$/.test(seed)) throw new HttpError(0, "Seed is a whole number.", "seed");
      // JSON.rawJSON keeps seeds beyond 2^53 exact
      fields.seed = Number.isSafeInteger(Number(seed)) || !JSON.rawJSON ? Number(seed) : JSON.rawJSON(seed);
    }
    const cache = $("cache").value;
    const threshold = text("cache_threshold");
    if (threshold && (!cache || cache === "off")) {
      throw new HttpError(0, "A cache threshold needs a cache policy.", "cache");
    }
    if (cache) fields.cache = threshold ? `${cache}:${threshold}` : cache;
    return fields;
  }

  function fillForm(v) {
    $("prompt").value = v.prompt || "";
    $("negative_prompt").value = v.negative_prompt || "";
    $("size").value = v.size || "";
    $("length").value = v.frames || "";
    $("length_unit").value = "frames";
    $("steps").value = v.steps || "";
    $("guidance_scale").value = v.guidance_scale ?? "";
    $("seed").value = v.seed ?? "";
    const [policy, threshold] = String(v.cache || "").split(":");
    $("cache").value = [...$("cache").options].some((o) => o.value === policy) ? policy : "";
    $("cache_threshold").value = threshold || "";
    $("prompt").focus();
    window.scrollTo({ top: 0, behavior: "smooth" });
  }

  function showFormError(message, param) {
    $("form-error").textContent = message;
    const input = param && FIELD_INPUT[param];
    if (input) $(input).focus();
  }

  async function submit(ev) {
    ev.preventDefault();
    const btn = $("submit");
    let fields;
    try {
      fields = formFields();
    } catch (e) {
      showFormError(e.message, e.param);
      return;
    }
    showFormError("");
    btn.disabled = true;
    try {
      const v = await api("v1/videos", { method: "POST", json: fields });
      const job = merge(v, { top: true });
      if (job) pump();
    } catch (e) {
      showFormError(e.param ? `${e.param}: ${e.message}` : e.message, e.param);
    } finally {
      btn.disabled = false;
    }
  }

  // ---------- start ----------

  function start() {
    $("create").addEventListener("submit", submit);
    $("prompt").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) $("create").requestSubmit();
    });
    $("more").addEventListener("click", loadOlder);
    $("auth").addEventListener("cancel", (ev) => ev.preventDefault()); // nothing works without the token
    $("signout").hidden = !token;
    $("signout").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      token = "";
      location.reload();
    });
    health();
    refresh().then(loadModels).then(poll);
  }

  start();
})();
