// A client for the chat.v1 protocol of the chat gateway, as a dependency-free ES module.
//
//   import { ChatClient } from "/chat-client.js";
//   const client = new ChatClient({ token });
//   client.addEventListener("event", (e) => console.log(e.detail.event));
//   client.connect();
//   const { runId } = await client.send("What is 12 * 7?");
//
// It speaks WebSocket `/ws` (token as the `bearer.<jwt>` subprotocol), reconnects with
// jittered exponential backoff, resumes every live run from its last `seq` and drops
// anything it has already seen, so listeners get each run's events exactly once and in
// order. When a WebSocket cannot be opened while the gateway answers HTTP, it falls back
// to the SSE routes, read with fetch and a stream reader. See docs/client.md.

export const PROTOCOL = "chat.v1";

export const RUN_EVENT_TYPES = Object.freeze([
  "user_message",
  "agent_started",
  "agent_thinking",
  "tool_executing",
  "tool_completed",
  "response_chunk",
  "run_status",
  "response_complete",
  "agent_completed",
]);

export const TERMINAL_STATUSES = Object.freeze(["completed", "cancelled", "failed"]);

/** Close codes after which reconnecting cannot help. */
const FATAL_CLOSE_CODES = new Map([
  [4401, "unauthorized"],
  [4403, "forbidden"],
]);

/** Close codes that say nothing about whether WebSockets work on this path. */
const BUSY_CLOSE_CODES = new Set([1012, 1013, 4408, 4429]);

/** The client closes a socket it gave up on with this code. */
const CLOSE_CLIENT_GAVE_UP = 4000;

/** Done runs kept in `client.runs` before the oldest are forgotten. */
const MAX_DONE_RUNS = 200;

export const DEFAULTS = Object.freeze({
  transport: "auto",
  reconnect: Object.freeze({ initialDelayMs: 250, maxDelayMs: 15000, factor: 2 }),
  openTimeoutMs: 10000,
  offlineAfterAttempts: 5,
  fallbackAfterFailures: 2,
  probeTimeoutMs: 5000,
});

/** An error of the protocol (`code` as in chat.v1) or of the transport. */
export class ChatError extends Error {
  constructor(code, message, details = {}) {
    super(message);
    this.name = "ChatError";
    this.code = code;
    Object.assign(this, details);
  }
}

/**
 * The wait before reconnect attempt `attempt` (0, 1, 2, …): exponential, capped, with
 * "equal jitter" (a random point in the upper half), so that many clients cut off at
 * the same moment do not come back at the same moment.
 */
export function backoffDelay(attempt, options = DEFAULTS.reconnect, random = Math.random) {
  const { initialDelayMs, maxDelayMs, factor } = { ...DEFAULTS.reconnect, ...options };
  const ceiling = Math.min(maxDelayMs, initialDelayMs * factor ** Math.max(0, attempt));
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

/**
 * An incremental parser of `text/event-stream`, as the HTML standard defines it:
 * `push()` text as it arrives; `onMessage({event, data, id})` is called per message.
 */
/** A token's `sub` claim, for display only (the gateway does the verifying); null when
 * the token is not a JWT with a string `sub`. */
export function tokenSubject(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(payload.padEnd(Math.ceil(payload.length / 4) * 4, "=")));
    return typeof claims.sub === "string" ? claims.sub : null;
  } catch {
    return null;
  }
}

export class SseParser {
  constructor(onMessage) {
    this.onMessage = onMessage;
    this.buffer = "";
    this.event = "";
    this.data = [];
    this.lastEventId = "";
  }

  push(text) {
    const buffer = this.buffer + text;
    let start = 0;
    for (let i = 0; i < buffer.length; i++) {
      const c = buffer[i];
      if (c !== "\n" && c !== "\r") continue;
      if (c === "\r" && i + 1 === buffer.length) break; // a "\n" may follow in the next push
      this.#line(buffer.slice(start, i));
      if (c === "\r" && buffer[i + 1] === "\n") i++;
      start = i + 1;
    }
    this.buffer = buffer.slice(start);
  }

  #line(line) {
    if (line === "") {
      if (this.data.length) {
        this.onMessage({
          event: this.event || "message",
          data: this.data.join("\n"),
          id: this.lastEventId,
        });
      }
      this.event = "";
      this.data = [];
      return;
    }
    if (line[0] === ":") return; // a comment, such as the server's ": ping"
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
  }
}

function ensureSlash(url) {
  const copy = new URL(url);
  if (!copy.pathname.endsWith("/")) copy.pathname += "/";
  copy.search = "";
  copy.hash = "";
  return copy;
}

function randomId() {
  const bytes = new Uint8Array(6);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        resolve();
      },
      { once: true },
    );
  });
}

async function httpError(response) {
  let code = `http_${response.status}`;
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // not the gateway's JSON error: keep the status line
  }
  return new ChatError(code, message, { status: response.status });
}

/**
 * A chat.v1 client.
 *
 * Events (all `CustomEvent`s, read `event.detail`):
 * - `state`: `{state, transport, attempt, delayMs, reason}`; `state` is `idle`, `connecting`,
 *   `connected`, `reconnecting`, `offline` or `closed`.
 * - `ready`: the `connection_ready` data of each new WebSocket session.
 * - `event`: `{event, run}`: one run event (the envelope as sent) and the client's record
 *   of its run; each seq of each run exactly once, in order.
 * - `run`: `{run}` when a run's record changes (`status`, `done`, `lost`).
 * - `error`: `{error, run?, threadId?}`: a protocol error not answered through a promise.
 * - `auth`: `{reason}`: the token was refused (4401 or HTTP 401); the client stops.
 */
export class ChatClient extends EventTarget {
  constructor(options = {}) {
    super();
    const origin = options.url ?? globalThis.location?.origin;
    if (!origin) throw new TypeError("ChatClient needs options.url outside a browser page");
    this.baseUrl = ensureSlash(new URL(origin, globalThis.location?.href));
    if (options.wsUrl) {
      this.wsUrl = new URL(options.wsUrl, this.baseUrl).href;
    } else {
      const ws = new URL("ws", this.baseUrl);
      ws.protocol = ws.protocol === "https:" ? "wss:" : "ws:";
      this.wsUrl = ws.href;
    }
    this.token = options.token ?? null;
    this.preferredTransport = options.transport ?? DEFAULTS.transport;
    if (!["auto", "websocket", "sse"].includes(this.preferredTransport)) {
      throw new TypeError(`unknown transport ${this.preferredTransport}`);
    }
    this.reconnectOptions = { ...DEFAULTS.reconnect, ...options.reconnect };
    this.openTimeoutMs = options.openTimeoutMs ?? DEFAULTS.openTimeoutMs;
    this.offlineAfterAttempts = options.offlineAfterAttempts ?? DEFAULTS.offlineAfterAttempts;
    this.fallbackAfterFailures = options.fallbackAfterFailures ?? DEFAULTS.fallbackAfterFailures;
    this.probeTimeoutMs = options.probeTimeoutMs ?? DEFAULTS.probeTimeoutMs;
    this.WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
    this.fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);

    /** `idle`, `connecting`, `connected`, `reconnecting`, `offline` or `closed`. */
    this.state = "idle";
    /** The transport in use: `websocket`, `sse`, or null before the first connection. */
    this.transport = null;
    /** The `connection_ready` data of the current WebSocket session. */
    this.session = null;
    /** runId → `{runId, threadId, ref, agent, lastSeq, status, done, lost, error}`. */
    this.runs = new Map();
    this.stats = {
      connects: 0,
      reconnects: 0,
      duplicates: 0,
      gaps: 0,
      duplicateSends: 0,
      resumes: [],
      threadStreams: 0,
    };

    this._idPrefix = `c${randomId()}-`;
    this._nextId = 1;
    this._pending = new Map(); // id → {kind, frame, resolve, reject, sent}
    this._watchedThread = null; // the thread followed with watch_thread (or its SSE stream)
    this._threadWatch = null; // {threadId, stop, ended} of the SSE thread stream
    this._ws = null;
    this._wsReady = false;
    this._timer = null;
    this._heartbeat = null;
    this._lastReceived = 0;
    this._attempt = 0;
    this._openFailures = 0;
    this._opening = false;
    this._authRetried = false;
    this._everConnected = false;
    this._started = false;
    this._stopped = false;
    this._abort = new AbortController(); // aborts every HTTP request on close()
    this._streams = new Map(); // runId → AbortController of its SSE stream
    this._retrying = new Set(); // runIds, and the thread's watch, whose SSE stream is re-opened
    this._onOnline = () => this.#online();
    this._onOffline = () => this.#offline();
  }

  // Public API -------------------------------------------------------------------------

  /** Open the connection (idempotent). Returns the client. */
  connect() {
    if (this._started) return this;
    this._started = true;
    globalThis.addEventListener?.("online", this._onOnline);
    globalThis.addEventListener?.("offline", this._onOffline);
    if (this.preferredTransport === "sse") this.#useSse("sse requested");
    else this.#openSocket();
    return this;
  }

  /** Close for good: the socket, every stream, every timer. Pending promises reject. */
  close() {
    if (this._stopped) return;
    this._stopped = true;
    globalThis.removeEventListener?.("online", this._onOnline);
    globalThis.removeEventListener?.("offline", this._onOffline);
    clearTimeout(this._timer);
    this.#stopHeartbeat();
    this._abort.abort();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try {
        ws.close(1000, "client closed");
      } catch {
        // already closing
      }
    }
    this.#rejectPending(() => true, new ChatError("closed", "the client was closed"));
    this.#setState("closed");
  }

  /** A fresh id for a command (echoed back by the server as `ref`). */
  newId() {
    return `${this._idPrefix}${this._nextId++}`;
  }

  /**
   * Send a user message; a new run starts. Resolves with `{runId, threadId, ref}` once the
   * gateway has started it. Options: `agent`, `threadId`, `id` (the ref; made when absent).
   * While the WebSocket is reconnecting the message waits and is sent once it is back; if
   * the connection drops after it was sent but before its run was announced, it is sent
   * again with the same `id` once the socket is back: the gateway starts at most one run
   * per id (an `ack` with `duplicate: true` names the run it started), so the message is
   * neither lost nor doubled. `onActive` (`reject`, `enqueue`, `interrupt`, `rollback`):
   * what the message does to a run of the thread still going (default: the gateway's).
   */
  send(content, options = {}) {
    if (typeof content !== "string" || !content.trim()) {
      return Promise.reject(new ChatError("bad_message", "content must be a non-empty string"));
    }
    if (this._stopped) return Promise.reject(new ChatError("closed", "the client was closed"));
    const id = options.id ?? this.newId();
    const frame = { type: "user_message", id, content };
    if (options.agent) frame.agent = options.agent;
    if (options.threadId) frame.thread_id = options.threadId;
    if (options.onActive) frame.on_active = options.onActive;
    if (this.transport === "sse") return this.#sseSend(frame);
    return new Promise((resolve, reject) => {
      this._pending.set(id, { kind: "user_message", frame, resolve, reject, sent: false });
      this.#flush();
    });
  }

  /** Pause a run (`stop`). Resolves with the run's status. */
  stop(runId) {
    return this.#control("stop", runId);
  }

  /** Continue a paused run (`start`). Resolves with the run's status. */
  start(runId) {
    return this.#control("start", runId);
  }

  /** Cancel a run (`cancel`). Resolves with the run's status. */
  cancel(runId) {
    return this.#control("cancel", runId);
  }

  /**
   * Answer a run's `input_requested` (`respond`): `{approved, args?, reason?}` for a tool
   * approval, `{answer}` for a question. Resolves with the status the answer leads to;
   * rejects with `not_found` or `conflict` (already resolved).
   */
  respond(runId, requestId, answer = {}) {
    return this.#control("respond", runId, { ...answer, request_id: requestId });
  }

  /**
   * Follow a run this client has not seen (started elsewhere, or before a page reload) from
   * `afterSeq` on (0: from its first event). Its events arrive as `event`s.
   */
  resume(runId, afterSeq = 0) {
    const run = this.#runRecord(runId);
    if (run.done) return;
    run.lastSeq = Math.max(run.lastSeq, afterSeq);
    if (this.transport === "sse") this.#followRun(run);
    else if (this._wsReady) this.#sendResume(run);
    // else: resumed with every live run once the socket is ready
  }

  /** Send a `ping`; resolves with the round-trip time in ms (WebSocket only). */
  ping() {
    if (!this._wsReady) return Promise.reject(new ChatError("not_connected", "no WebSocket"));
    const id = this.newId();
    const began = performance.now();
    return new Promise((resolve, reject) => {
      this._pending.set(id, {
        kind: "ping",
        frame: { type: "ping", id },
        resolve: () => resolve(performance.now() - began),
        reject,
        sent: false,
      });
      this.#flush();
    });
  }

  /**
   * Follow a thread: every run of it not ended and every later one, started by any tab or
   * device of the user, arrives as `event`s. One thread at a time: watching another stops
   * the first; `null` stops. Over the WebSocket it is `watch_thread`, sent again after each
   * reconnect; over SSE, `GET /api/threads/{thread_id}/events`, re-opened when it breaks.
   */
  watchThread(threadId) {
    const before = this._watchedThread ?? null;
    if (before === (threadId ?? null)) return;
    this._watchedThread = threadId ?? null;
    if (this.transport === "sse") {
      this.#watchOverSse();
      return;
    }
    if (!this._wsReady) return; // sent once the socket is ready
    if (before) this.#sendWatch("unwatch_thread", before);
    if (threadId) this.#sendWatch("watch_thread", threadId);
  }

  #sendWatch(type, threadId) {
    const id = this.newId();
    const noop = () => {};
    const frame = { type, thread_id: threadId, id };
    this._pending.set(id, { kind: "watch", frame, resolve: noop, reject: noop, sent: false });
    this.#flush();
  }

  /** Runs not yet ended. */
  liveRuns() {
    return [...this.runs.values()].filter((run) => !run.done);
  }

  /**
   * An authenticated request to one of the gateway's JSON routes (`path` relative to the
   * gateway, e.g. `api/threads`; `query` an object of parameters; `method` default GET).
   * Resolves with the parsed body; rejects with a `ChatError` (HTTP 401 also emits `auth`).
   */
  async request(path, { method = "GET", query = null } = {}) {
    if (this._stopped) throw new ChatError("closed", "the client was closed");
    const url = new URL(path, this.baseUrl);
    for (const [key, value] of Object.entries(query ?? {})) {
      if (value !== undefined && value !== null) url.searchParams.set(key, String(value));
    }
    const response = await this.fetchImpl(url, {
      method,
      headers: { Authorization: `Bearer ${await this.#token()}` },
      cache: "no-store",
      signal: this._abort.signal,
    });
    if (!response.ok) throw await this.#httpFailure(response);
    return response.json();
  }

  // State ------------------------------------------------------------------------------

  #setState(state, extra = {}) {
    const changed = state !== this.state || extra.transportChanged;
    this.state = state;
    if (changed || extra.delayMs !== undefined) {
      this.#emit("state", { state, transport: this.transport, ...extra });
    }
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  #online() {
    if (this._stopped) return;
    if (this.transport === "sse") {
      this.#probeHttp();
    } else if (this._wsReady) {
      this.#setState("connected");
    } else if (!this._ws) {
      clearTimeout(this._timer);
      this._attempt = 0;
      this.#openSocket();
    }
  }

  #offline() {
    // A gateway on loopback or the LAN may still answer: only a connection that is
    // already down is shown as offline; the next failure tells the rest.
    if (this._stopped || this.state === "connected") return;
    this.#setState("offline", { reason: "the browser is offline" });
  }

  #isBrowserOffline() {
    return globalThis.navigator?.onLine === false;
  }

  #fatal(reason, detail) {
    this.#rejectPending(() => true, new ChatError(reason, detail || reason));
    this.close();
    this.#setState("offline", { reason });
    this.#emit("auth", { reason, detail });
  }

  async #token() {
    const token = typeof this.token === "function" ? await this.token() : this.token;
    if (!token) throw new ChatError("unauthorized", "no token");
    return token;
  }

  // Runs -------------------------------------------------------------------------------

  #runRecord(runId, threadId = null) {
    let run = this.runs.get(runId);
    if (!run) {
      run = {
        runId,
        threadId,
        ref: null,
        agent: null,
        lastSeq: 0,
        status: "queued",
        done: false,
        lost: false,
        error: null,
      };
      this.runs.set(runId, run);
      this.#pruneRuns();
    } else if (threadId && !run.threadId) {
      run.threadId = threadId;
    }
    return run;
  }

  #pruneRuns() {
    const done = [...this.runs.values()].filter((run) => run.done);
    for (const run of done.slice(0, Math.max(0, done.length - MAX_DONE_RUNS))) {
      this.runs.delete(run.runId);
    }
  }

  #markLost(run, error) {
    if (run.done) return;
    run.done = true;
    run.lost = true;
    run.error = error;
    this._streams.get(run.runId)?.abort();
    this.#emit("run", { run });
    this.#emit("error", { error, run });
  }

  /** One run event from either transport: de-duplicated by seq, checked for gaps. */
  #runEvent(event) {
    const run = this.#runRecord(event.run_id, event.thread_id);
    if (run.done && run.lost) return;
    if (event.type === "user_message" && run.ref === null) {
      const ref = event.data?.ref;
      if (ref !== undefined && ref !== null) run.ref = ref;
    }
    const seq = event.seq;
    if (!Number.isInteger(seq) || seq <= run.lastSeq) {
      this.stats.duplicates++;
      return;
    }
    if (seq !== run.lastSeq + 1) {
      // Never deliver past a hole: ask for everything after the last seq delivered.
      this.stats.gaps++;
      this.#resync(run);
      return;
    }
    run.lastSeq = seq;
    run.resyncing = false;
    let changed = false;
    if (event.type === "agent_started") {
      run.agent = event.data?.agent ?? null;
      run.status = "running";
      changed = true;
    } else if (event.type === "run_status") {
      run.status = event.data?.status ?? run.status;
      changed = true;
    } else if (event.type === "agent_completed") {
      run.status = event.data?.status ?? "completed";
      run.done = true;
      run.error = event.data?.error ?? null;
      changed = true;
    }
    this.#emit("event", { event, run });
    if (changed) this.#emit("run", { run });
    if (event.type === "user_message") this.#announced(run);
  }

  /** The run of a pending `user_message` is known: resolve its promise. */
  #announced(run) {
    const pending = run.ref !== null ? this._pending.get(run.ref) : undefined;
    if (pending && pending.kind === "user_message") {
      this._pending.delete(run.ref);
      pending.resolve({ runId: run.runId, threadId: run.threadId, ref: run.ref });
    }
  }

  #resync(run) {
    if (run.resyncing) return;
    run.resyncing = true;
    if (this.transport !== "sse") {
      if (this._wsReady) this.#sendResume(run);
      return;
    }
    const stream = this._streams.get(run.runId);
    if (stream) stream.abort(); // re-opened after the last seq delivered
    else this.#followRun(run); // a run seen through the thread's stream only
  }

  // Controls ---------------------------------------------------------------------------

  async #control(action, runId, fields = null) {
    if (this._stopped) throw new ChatError("closed", "the client was closed");
    if (this.transport !== "sse" && this._wsReady) {
      const id = this.newId();
      return new Promise((resolve, reject) => {
        const frame = { ...fields, type: action, run_id: runId, id };
        this._pending.set(id, { kind: "control", frame, fields, resolve, reject, sent: false });
        this.#flush();
      });
    }
    // SSE, or the socket is down: the REST route does the same, at once.
    const url = new URL(`api/chat/agents/${encodeURIComponent(runId)}/${action}`, this.baseUrl);
    const headers = { Authorization: `Bearer ${await this.#token()}` };
    if (fields) headers["Content-Type"] = "application/json";
    const response = await this.fetchImpl(url, {
      method: "POST",
      headers,
      body: fields ? JSON.stringify(fields) : undefined,
      signal: this._abort.signal,
    });
    if (!response.ok) throw await this.#httpFailure(response);
    const body = await response.json();
    return body.status;
  }

  // WebSocket --------------------------------------------------------------------------

  async #openSocket() {
    clearTimeout(this._timer);
    if (this._stopped || this._ws || this._opening) return;
    if (!this._everConnected && this._attempt === 0) this.#setState("connecting");
    let token;
    this._opening = true;
    try {
      token = await this.#token();
    } catch (error) {
      this.#fatal("unauthorized", error.message);
      return;
    } finally {
      this._opening = false;
    }
    if (this._stopped || this._ws || this.transport === "sse") return;
    let ws;
    try {
      ws = new this.WebSocketImpl(this.wsUrl, [PROTOCOL, `bearer.${token}`]);
    } catch (error) {
      // A token that is not a valid subprotocol token, or a URL the browser refuses.
      this.#socketClosed({ code: 1006, reason: String(error) }, false);
      return;
    }
    this._ws = ws;
    const openTimer = setTimeout(() => {
      if (this._ws === ws && !this._wsReady) {
        this.#dropSocket("the connection did not open in time");
      }
    }, this.openTimeoutMs);
    ws.onmessage = (message) => {
      if (this._ws !== ws) return;
      this._lastReceived = performance.now();
      this.#onFrame(message.data);
    };
    ws.onerror = () => {}; // a close event follows
    ws.onclose = (close) => {
      clearTimeout(openTimer);
      if (this._ws !== ws) return;
      this.#socketClosed(close, this._wsReady);
    };
  }

  /** Give up on the current socket now (no waiting for a closing handshake). */
  #dropSocket(reason) {
    const ws = this._ws;
    if (!ws) return;
    const wasReady = this._wsReady;
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    try {
      ws.close(CLOSE_CLIENT_GAVE_UP, reason.slice(0, 100));
    } catch {
      // already closing
    }
    this.#socketClosed({ code: CLOSE_CLIENT_GAVE_UP, reason }, wasReady);
  }

  #socketClosed(close, wasReady) {
    this._ws = null;
    this._wsReady = false;
    this.session = null;
    this.#stopHeartbeat();
    // A message sent on the lost socket whose run was never announced is sent again, with
    // its id, on the next connection: the gateway starts one run per id. Controls not yet
    // answered are retried, pings dropped; resumes and the thread's watch are redone.
    this.#rejectPending(
      (p) => p.kind === "ping" || p.kind === "resume" || p.kind === "watch",
      new ChatError("connection_lost", "the connection was lost"),
    );
    for (const pending of this._pending.values()) pending.sent = false;
    if (this._stopped) return;
    const fatal = FATAL_CLOSE_CODES.get(close.code);
    if (fatal === "unauthorized" && typeof this.token === "function" && !this._authRetried) {
      // The token may have expired: ask for a fresh one, once, before giving up.
      this._authRetried = true;
      this.#scheduleReconnect(close.reason || "token refused");
      return;
    }
    if (fatal) {
      this.#fatal(fatal, close.reason);
      return;
    }
    if (!wasReady && !BUSY_CLOSE_CODES.has(close.code) && this.preferredTransport === "auto") {
      this.#maybeFallBack();
      return;
    }
    this.#scheduleReconnect(close.reason || `closed with ${close.code}`);
  }

  /** The socket did not open: if HTTP works, WebSockets are blocked on the way: use SSE. */
  async #maybeFallBack() {
    const httpWorks = await this.#probeHttp(false);
    if (this._stopped) return;
    if (httpWorks) this._openFailures++;
    if (httpWorks && this._openFailures >= this.fallbackAfterFailures) {
      this.#useSse("a WebSocket could not be opened, HTTP works");
      return;
    }
    this.#scheduleReconnect("the WebSocket did not open");
  }

  #scheduleReconnect(reason) {
    clearTimeout(this._timer);
    if (this._stopped) return;
    const delayMs = backoffDelay(this._attempt, this.reconnectOptions);
    this._attempt++;
    const state =
      this.#isBrowserOffline() || this._attempt > this.offlineAfterAttempts
        ? "offline"
        : "reconnecting";
    this.#setState(state, { reason, attempt: this._attempt, delayMs });
    this._timer = setTimeout(() => this.#openSocket(), delayMs);
  }

  #onFrame(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      this.#emit("error", { error: new ChatError("bad_json", "the gateway sent invalid JSON") });
      return;
    }
    if (!message || typeof message !== "object") return;
    if (message.seq !== null && message.seq !== undefined && message.run_id) {
      this.#runEvent(message);
      return;
    }
    const data = message.data ?? {};
    switch (message.type) {
      case "connection_ready":
        this.#ready(data);
        break;
      case "pong":
      case "ack": {
        const pending = this._pending.get(data.ref);
        if (message.type === "ack" && data.duplicate) this.stats.duplicateSends++;
        if (pending && pending.kind === "user_message" && data.duplicate) {
          // Sent before a drop and started then: follow that run from its first event. The
          // send resolves when its user_message arrives, as for a first send.
          const run = this.#runRecord(data.run_id, data.thread_id ?? null);
          if (run.ref === null) run.ref = data.ref;
          if (run.lastSeq > 0 || run.done) this.#announced(run);
          if (!run.done) this.#sendResume(run);
          break;
        }
        if (pending) {
          this._pending.delete(data.ref);
          pending.resolve(message.type === "ack" ? data.status : data);
        }
        break;
      }
      case "error": {
        const error = new ChatError(data.code ?? "internal", data.message ?? "error", {
          ref: data.ref ?? null,
        });
        const pending = data.ref !== null ? this._pending.get(data.ref) : undefined;
        if (pending) {
          this._pending.delete(data.ref);
          if (pending.kind === "resume") {
            const run = this.runs.get(pending.frame.run_id);
            if (run) this.#markLost(run, error);
          }
          const threadId = pending.frame.thread_id;
          if (pending.kind === "watch" && pending.frame.type === "watch_thread") {
            // Refused (not the user's thread, or gone): said as the SSE watch says it.
            if (this._watchedThread === threadId) this.#emit("error", { error, threadId });
          }
          pending.reject(error);
        } else {
          this.#emit("error", { error });
        }
        break;
      }
      default:
        break; // extra connection-level types are allowed
    }
  }

  #ready(data) {
    this.session = data;
    this._wsReady = true;
    this._authRetried = false;
    this._attempt = 0;
    this._openFailures = 0;
    this.stats.connects++;
    if (this._everConnected) this.stats.reconnects++;
    this._everConnected = true;
    const transportChanged = this.transport !== "websocket";
    this.transport = "websocket";
    this.#startHeartbeat(Number(data.heartbeat_s) || 15);
    this.#setState("connected", { transportChanged });
    this.#emit("ready", data);
    for (const run of this.liveRuns()) this.#sendResume(run);
    if (this._watchedThread) this.#sendWatch("watch_thread", this._watchedThread);
    this.#flush();
  }

  #sendResume(run) {
    const id = this.newId();
    const frame = { type: "resume", run_id: run.runId, after_seq: run.lastSeq, id };
    this.#noteResume(run, "websocket");
    const noop = () => {};
    this._pending.set(id, { kind: "resume", frame, resolve: noop, reject: noop, sent: false });
    this.#flush();
  }

  #noteResume(run, transport) {
    const resumes = this.stats.resumes;
    resumes.push({ runId: run.runId, afterSeq: run.lastSeq, transport });
    if (resumes.length > 100) resumes.splice(0, resumes.length - 100);
  }

  /** Send every pending frame not yet sent on this socket. */
  #flush() {
    if (!this._wsReady || !this._ws) return;
    for (const pending of this._pending.values()) {
      if (pending.sent) continue;
      try {
        this._ws.send(JSON.stringify(pending.frame));
        pending.sent = true;
      } catch {
        return; // the socket is closing: its close event reschedules everything
      }
    }
  }

  #rejectPending(which, error) {
    for (const [id, pending] of [...this._pending]) {
      if (which(pending)) {
        this._pending.delete(id);
        pending.reject(error);
      }
    }
  }

  #startHeartbeat(heartbeatS) {
    this.#stopHeartbeat();
    const intervalMs = heartbeatS * 1000;
    this._lastReceived = performance.now();
    this._heartbeat = setInterval(() => {
      const quiet = performance.now() - this._lastReceived;
      if (quiet > 2 * intervalMs + 5000) {
        this.#dropSocket("no traffic from the gateway");
      } else if (quiet > intervalMs) {
        this.ping().catch(() => {});
      }
    }, intervalMs / 2);
  }

  #stopHeartbeat() {
    clearInterval(this._heartbeat);
    this._heartbeat = null;
  }

  // SSE --------------------------------------------------------------------------------

  #useSse(reason) {
    clearTimeout(this._timer);
    const transportChanged = this.transport !== "sse";
    this.transport = "sse";
    this.#setState(this.state === "idle" ? "connecting" : this.state, {
      reason,
      transportChanged,
    });
    // Messages that waited for the socket go over HTTP now.
    for (const [id, pending] of [...this._pending]) {
      this._pending.delete(id);
      if (pending.kind === "user_message") {
        this.#sseSend(pending.frame).then(pending.resolve, pending.reject);
      } else if (pending.kind === "control") {
        this.#control(pending.frame.type, pending.frame.run_id, pending.fields).then(
          pending.resolve,
          pending.reject,
        );
      } else {
        pending.reject(new ChatError("connection_lost", "switched to SSE"));
      }
    }
    this.#probeHttp();
    for (const run of this.liveRuns()) this.#followRun(run);
    this.#watchOverSse(); // a thread watched over the socket is watched over SSE now
  }

  /** GET /health; on the SSE transport it drives the connection state. */
  async #probeHttp(driveState = true) {
    const timeout = new AbortController();
    const timer = setTimeout(() => timeout.abort(), this.probeTimeoutMs);
    const stop = () => timeout.abort();
    this._abort.signal.addEventListener("abort", stop, { once: true });
    let ok = false;
    try {
      const response = await this.fetchImpl(new URL("health", this.baseUrl), {
        cache: "no-store",
        signal: timeout.signal,
      });
      ok = response.ok;
    } catch {
      ok = false;
    } finally {
      clearTimeout(timer);
      this._abort.signal.removeEventListener("abort", stop);
    }
    if (driveState && !this._stopped && this.transport === "sse") {
      if (ok) {
        this._attempt = 0;
        if (!this._retrying.size) this.#sseConnected();
      } else {
        const delayMs = backoffDelay(this._attempt++, this.reconnectOptions);
        const state = this._attempt > this.offlineAfterAttempts ? "offline" : "reconnecting";
        this.#setState(state, { reason: "the gateway does not answer", delayMs });
        clearTimeout(this._timer);
        this._timer = setTimeout(() => this.#probeHttp(), delayMs);
      }
    }
    return ok;
  }

  #sseConnected() {
    if (this.state !== "connected") {
      this.stats.connects++;
      if (this._everConnected) this.stats.reconnects++;
      this._everConnected = true;
    }
    this.#setState("connected");
  }

  #sseRetrying(runId, retrying, extra = {}) {
    if (retrying) this._retrying.add(runId);
    else this._retrying.delete(runId);
    if (this._stopped) return;
    if (this._retrying.size) {
      this.#setState(extra.offline ? "offline" : "reconnecting", extra);
    } else if (!retrying) {
      this.#sseConnected();
    }
  }

  async #httpFailure(response) {
    const error = await httpError(response);
    if (response.status === 401) this.#fatal("unauthorized", error.message);
    return error;
  }

  async #sseSend(frame) {
    const body = { message: frame.content, id: frame.id };
    if (frame.agent) body.agent = frame.agent;
    if (frame.on_active) body.on_active = frame.on_active;
    if (frame.thread_id) body.thread_id = frame.thread_id;
    const controller = new AbortController();
    const abort = () => controller.abort();
    this._abort.signal.addEventListener("abort", abort, { once: true });
    let response;
    try {
      response = await this.fetchImpl(new URL("api/chat/stream", this.baseUrl), {
        method: "POST",
        headers: {
          Authorization: `Bearer ${await this.#token()}`,
          "Content-Type": "application/json",
          Accept: "text/event-stream",
        },
        body: JSON.stringify(body),
        cache: "no-store",
        signal: controller.signal,
      });
    } catch (error) {
      this._abort.signal.removeEventListener("abort", abort);
      throw new ChatError("connection_lost", `the message could not be sent: ${error.message}`);
    }
    if (!response.ok) {
      this._abort.signal.removeEventListener("abort", abort);
      throw await this.#httpFailure(response);
    }
    this.#sseConnected();
    return new Promise((resolve, reject) => {
      let run = null;
      const onStart = (data) => {
        run = this.#runRecord(data.run_id, data.thread_id);
        run.ref = frame.id;
        this._streams.set(run.runId, controller);
        resolve({ runId: run.runId, threadId: run.threadId, ref: frame.id });
      };
      this.#readStream(response, controller, onStart)
        .catch(() => {}) // a broken stream is followed up below
        .finally(() => {
          this._abort.signal.removeEventListener("abort", abort);
          if (run === null) {
            reject(new ChatError("connection_lost", "the stream ended before the run started"));
            return;
          }
          if (this._streams.get(run.runId) === controller) this._streams.delete(run.runId);
          if (!run.done) this.#followRun(run);
        });
    });
  }

  /** Read one SSE response to its end; run events go through the de-duplication. */
  async #readStream(response, controller, onStart = null) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const parser = new SseParser((message) => {
      let data;
      try {
        data = JSON.parse(message.data);
      } catch {
        return;
      }
      if (message.event === "stream_start") onStart?.(data);
      else if (message.event === "stream_end") return;
      else if (message.event === "error") {
        const runId = data.run_id ?? [...this._streams].find(([, c]) => c === controller)?.[0];
        const run = runId ? this.runs.get(runId) : undefined;
        const error = new ChatError(data.code ?? "internal", data.message ?? "error");
        if (run) this.#markLost(run, error);
        else this.#emit("error", { error });
      } else if (data && data.run_id && data.seq !== null && data.seq !== undefined) {
        this.#runEvent(data);
      }
    });
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.push(decoder.decode(value, { stream: true }));
      }
      parser.push(decoder.decode());
    } finally {
      reader.releaseLock?.();
      if (!controller.signal.aborted) controller.abort(); // free the connection
    }
  }

  /** GET one of the gateway's SSE routes, with the bearer token. */
  async #getEvents(url, signal) {
    return this.fetchImpl(url, {
      headers: { Authorization: `Bearer ${await this.#token()}`, Accept: "text/event-stream" },
      cache: "no-store",
      signal,
    });
  }

  /** Say that the SSE stream `key` (a run's id, or a thread's watch) is being re-opened. */
  #retryNotice(key, reason, attempt, delayMs) {
    this.#sseRetrying(key, true, {
      reason,
      attempt,
      delayMs,
      offline: this.#isBrowserOffline() || attempt > this.offlineAfterAttempts,
    });
  }

  /** Keep a run's SSE stream open (after its last seq) until `agent_completed`. */
  async #followRun(run) {
    if (run.following) return;
    run.following = true;
    let attempt = 0;
    try {
      while (!run.done && !this._stopped && this.transport === "sse") {
        const controller = new AbortController();
        const abort = () => controller.abort();
        this._abort.signal.addEventListener("abort", abort, { once: true });
        this._streams.set(run.runId, controller);
        const url = new URL(`api/chat/runs/${encodeURIComponent(run.runId)}/events`, this.baseUrl);
        url.searchParams.set("after_seq", String(run.lastSeq));
        this.#noteResume(run, "sse");
        let broken = false;
        try {
          const response = await this.#getEvents(url, controller.signal);
          if (!response.ok) {
            const error = await this.#httpFailure(response);
            if (response.status < 500 && response.status !== 429) {
              this.#markLost(run, error); // 404 not_found, 410 resume_unavailable, 401
              break;
            }
            broken = true;
          } else {
            attempt = 0;
            this.#sseRetrying(run.runId, false);
            await this.#readStream(response, controller);
            broken = !run.done;
          }
        } catch {
          broken = true;
        } finally {
          this._abort.signal.removeEventListener("abort", abort);
          if (this._streams.get(run.runId) === controller) this._streams.delete(run.runId);
        }
        if (broken && !run.done && !this._stopped) {
          const delayMs = run.resyncing ? 0 : backoffDelay(attempt++, this.reconnectOptions);
          this.#retryNotice(run.runId, "the event stream was interrupted", attempt, delayMs);
          await sleep(delayMs, this._abort.signal);
        }
      }
    } finally {
      run.following = false;
      this.#sseRetrying(run.runId, false);
    }
  }

  /** Open, switch or stop the SSE stream of the watched thread to match `_watchedThread`. */
  #watchOverSse() {
    const threadId = this._watchedThread;
    const watch = this._threadWatch;
    if (watch && watch.threadId === threadId) return; // open, or ended by a 404
    if (watch) {
      this._threadWatch = null;
      watch.stop.abort();
    }
    if (threadId && this.transport === "sse" && !this._stopped) this.#followThread(threadId);
  }

  /**
   * Keep the thread's SSE stream open while it is watched: every event of its runs goes
   * through the de-duplication, so runs this client also follows itself are shown once,
   * and a stream re-opened (which repeats each live run from seq 1) adds nothing twice.
   */
  async #followThread(threadId) {
    const watch = { threadId, stop: new AbortController(), ended: false };
    this._threadWatch = watch;
    const key = watch; // its place among the streams being re-opened (with the runs' ids)
    const stop = () => watch.stop.abort();
    this._abort.signal.addEventListener("abort", stop, { once: true });
    const active = () =>
      this._threadWatch === watch && !watch.stop.signal.aborted && this.transport === "sse";
    let attempt = 0;
    try {
      while (active()) {
        const controller = new AbortController();
        const abort = () => controller.abort();
        watch.stop.signal.addEventListener("abort", abort, { once: true });
        const url = new URL(`api/threads/${encodeURIComponent(threadId)}/events`, this.baseUrl);
        try {
          const response = await this.#getEvents(url, controller.signal);
          if (!response.ok) {
            const error = await this.#httpFailure(response);
            if (response.status < 500 && response.status !== 429) {
              // 404: not this user's thread, or deleted; 401 has stopped the client.
              watch.ended = true;
              if (active()) this.#emit("error", { error, threadId });
              break;
            }
          } else {
            attempt = 0;
            this.stats.threadStreams++;
            this.#sseRetrying(key, false);
            this.#followUnlisted(threadId, response.headers.get("x-chat-active-run-ids"));
            await this.#readStream(response, controller);
          }
        } catch {
          // a broken stream, or one this client aborted: the loop's test tells which
        } finally {
          watch.stop.signal.removeEventListener("abort", abort);
          controller.abort();
        }
        if (!active() || this._stopped) break;
        // The stream only ends when it breaks (or the gateway went away): open it again.
        const delayMs = backoffDelay(attempt++, this.reconnectOptions);
        this.#retryNotice(key, "the thread's event stream was interrupted", attempt, delayMs);
        await sleep(delayMs, watch.stop.signal);
      }
    } finally {
      this._abort.signal.removeEventListener("abort", stop);
      if (this._threadWatch === watch && !watch.ended) this._threadWatch = null;
      if (this._retrying.has(key)) this.#sseRetrying(key, false);
    }
  }

  /**
   * Runs of the thread this client shows as live that the re-opened stream does not list
   * (they ended while it was down) are followed on their own, from their last seq, to
   * their end.
   */
  #followUnlisted(threadId, header) {
    const listed = new Set((header ?? "").split(",").filter(Boolean));
    for (const run of this.liveRuns()) {
      if (run.threadId !== threadId || listed.has(run.runId)) continue;
      if (!run.following && !this._streams.has(run.runId)) this.#followRun(run);
    }
  }
}
