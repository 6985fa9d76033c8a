// The browser chat page: sign-in, transcript, streaming answers, tool cards, run controls.
//
// Query parameters: `?agent=<name>` preselects an agent; `?transport=auto|websocket|sse`
// picks the transport (default auto: WebSocket, SSE when a WebSocket cannot be opened).
// Whatever a user typed or a model produced goes into the page as text nodes, or through
// the Markdown renderer, which builds elements and never parses HTML.

import { ChatClient, tokenSubject } from "./chat-client.js";
import { renderInto } from "./markdown.js";

const TOKEN_KEY = "chat.token";
const LIVE_RUNS_KEY = "chat.liveRuns";
const LIVE_STATUSES = new Set(["queued", "running", "paused", "waiting"]);

const $ = (id) => document.getElementById(id);
const ui = {
  transcript: $("transcript"),
  empty: $("empty"),
  agent: $("agent"),
  newChat: $("new-chat"),
  connection: $("connection"),
  who: $("who"),
  signOut: $("sign-out"),
  runbar: $("runbar"),
  runLabel: $("run-label"),
  stop: $("stop"),
  resume: $("resume"),
  cancel: $("cancel"),
  notice: $("notice"),
  composer: $("composer"),
  message: $("message"),
  send: $("send"),
  signin: $("signin"),
  signinForm: $("signin-form"),
  token: $("token"),
  signinError: $("signin-error"),
  threadsToggle: $("threads-toggle"),
  threads: $("threads"),
  threadsStatus: $("threads-status"),
  threadList: $("thread-list"),
  threadsEmpty: $("threads-empty"),
  threadsMore: $("threads-more"),
};

const params = new URLSearchParams(location.search);

// Storage: sessionStorage when the browser allows it, memory otherwise. -----------------

const memory = new Map();
const store = {
  get(key) {
    try {
      return sessionStorage.getItem(key);
    } catch {
      return memory.get(key) ?? null;
    }
  },
  set(key, value) {
    try {
      sessionStorage.setItem(key, value);
    } catch {
      memory.set(key, value);
    }
  },
  remove(key) {
    try {
      sessionStorage.removeItem(key);
    } catch {
      memory.delete(key);
    }
  },
};

/** Take `#token=` out of the address bar (into sessionStorage); return the token to use. */
function takeTokenFromUrl() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const token = hash.get("token");
  if (token) {
    store.set(TOKEN_KEY, token);
    hash.delete("token");
    const rest = hash.toString();
    const url = location.pathname + location.search + (rest ? `#${rest}` : "");
    history.replaceState(history.state, "", url);
  }
  return store.get(TOKEN_KEY);
}

// Small DOM helpers ----------------------------------------------------------------------

function el(tag, className, parent, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function formatDuration(ms) {
  if (typeof ms !== "number" || !Number.isFinite(ms)) return "";
  if (ms < 1) return "<1 ms";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

function formatValue(value) {
  if (typeof value === "string") return value;
  try {
    const pretty = JSON.stringify(value, null, 2);
    if (pretty === undefined) return String(value);
    // Short values on one line: {"expression": "12 * 7"}.
    // (JSON text has newlines only between tokens, never inside strings.)
    const flat = JSON.stringify(value, null, 1)
      .replace(/([[{])\n\s*/g, "$1")
      .replace(/\n\s*([\]}])/g, "$1")
      .replace(/\n\s*/g, " ");
    return flat.length <= 72 ? flat : pretty;
  } catch {
    return String(value);
  }
}

function stickToBottom(action) {
  const box = ui.transcript;
  const near = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  action();
  if (near) box.scrollTop = box.scrollHeight;
}

/** Run `fn` once per frame at most (with a timer as a fallback for hidden tabs). */
function frameBatcher(fn) {
  let scheduled = false;
  const run = () => {
    if (!scheduled) return;
    scheduled = false;
    fn();
  };
  return {
    schedule() {
      if (scheduled) return;
      scheduled = true;
      requestAnimationFrame(run);
      setTimeout(run, 100);
    },
    flush() {
      scheduled = true;
      run();
    },
  };
}

const STATUS_LABELS = {
  sending: "Sending",
  queued: "Queued",
  running: "Answering",
  paused: "Paused",
  waiting: "Waiting for you",
  completed: "Done",
  cancelled: "Cancelled",
  failed: "Failed",
  lost: "Lost",
  error: "Not sent",
};

// One exchange: the user's message and the assistant's answer. ---------------------------

class Turn {
  constructor({ userText = null, ref = null } = {}) {
    this.ref = ref;
    this.runId = null;
    this.text = "";
    this.nextIndex = 0;
    this.tools = new Map();
    this.requests = new Map(); // open input requests: request id → their box
    this.thinkingToggled = false;

    this.root = el("article", "turn");
    this.user = el("div", "msg user", this.root);
    this.userBubble = el("div", "bubble", this.user);
    if (userText !== null) this.userBubble.textContent = userText;
    else this.user.hidden = true;

    this.assistant = el("section", "msg assistant", this.root);
    this.assistant.setAttribute("aria-label", "Answer");
    const head = el("div", "meta", this.assistant);
    this.agentLabel = el("span", "agent-name", head, "assistant");
    this.badge = el("span", "badge", head);
    this.time = el("span", "elapsed", head);

    this.thinking = el("details", "thinking", this.assistant);
    this.thinking.hidden = true;
    this.thinking.open = true;
    const summary = el("summary", "", this.thinking);
    el("span", "thinking-title", summary, "Thinking");
    this.thinkingCount = el("span", "thinking-count", summary);
    this.thinkingSteps = el("div", "thinking-steps", this.thinking);
    // A click on the summary (or Enter/Space on it) is the user's choice: keep it.
    summary.addEventListener("click", () => {
      this.thinkingToggled = true;
    });

    this.toolList = el("div", "tools", this.assistant);
    this.answer = el("div", "answer markdown", this.assistant);
    this.answer.setAttribute("aria-live", "polite");
    this.answer.setAttribute("aria-busy", "true");
    this.typing = el("div", "typing", this.assistant);
    this.typing.setAttribute("aria-hidden", "true");
    for (let i = 0; i < 3; i++) el("span", "", this.typing);
    this.note = el("p", "note", this.assistant);
    this.note.hidden = true;

    this.renderer = frameBatcher(() => stickToBottom(() => renderInto(this.answer, this.text)));
    this.setStatus(userText !== null ? "sending" : "queued");
    stickToBottom(() => ui.transcript.appendChild(this.root));
  }

  setStatus(status) {
    this.status = status;
    this.assistant.dataset.status = status;
    this.badge.textContent = STATUS_LABELS[status] ?? status;
    this.badge.dataset.status = status;
    this.typing.hidden = !(status === "sending" || status === "queued" || status === "running");
  }

  bind(run) {
    this.runId = run.runId;
    this.assistant.dataset.runId = run.runId;
    if (run.ref && !this.ref) this.ref = run.ref;
  }

  showNote(text, kind = "error") {
    this.note.hidden = false;
    this.note.className = `note ${kind}`;
    this.note.textContent = text;
  }

  notSent(error) {
    this.setStatus("error");
    this.answer.setAttribute("aria-busy", "false");
    this.showNote(`Not sent: ${error.message}`);
  }

  lost(error) {
    if (this.user.hidden && !this.text) {
      // A run remembered from before a reload that is gone: nothing to show.
      this.root.remove();
      ui.empty.hidden = ui.transcript.querySelector(".turn") !== null;
      return;
    }
    this.setStatus("lost");
    this.renderer.flush();
    this.answer.setAttribute("aria-busy", "false");
    this.showNote(
      `The rest of this answer could not be recovered (${error.code}: ${error.message}).`,
    );
  }

  onEvent(event) {
    const data = event.data ?? {};
    this.assistant.dataset.seq = String(event.seq);
    switch (event.type) {
      case "user_message":
        if (this.user.hidden) {
          this.userBubble.textContent = data.content ?? "";
          this.user.hidden = false;
        }
        if (this.status === "sending") this.setStatus("queued");
        break;
      case "agent_started":
        this.agentLabel.textContent = data.agent ?? "assistant";
        this.setStatus("running");
        break;
      case "agent_thinking":
        stickToBottom(() => {
          this.thinking.hidden = false;
          el("p", "step", this.thinkingSteps, data.text ?? "");
          const n = this.thinkingSteps.childElementCount;
          this.thinkingCount.textContent = n === 1 ? "1 step" : `${n} steps`;
        });
        break;
      case "tool_executing":
        stickToBottom(() => this.toolStarted(data));
        break;
      case "tool_completed":
        stickToBottom(() => this.toolCompleted(data));
        break;
      case "response_chunk":
        if (data.index !== this.nextIndex) this.answer.dataset.outOfOrder = "true";
        this.nextIndex = (data.index ?? this.nextIndex) + 1;
        this.text += data.text ?? "";
        this.collapseThinking();
        this.renderer.schedule();
        break;
      case "input_requested":
        stickToBottom(() => this.inputRequested(data));
        break;
      case "input_resolved":
        stickToBottom(() => this.inputResolved(data));
        break;
      case "run_status":
        this.setStatus(data.status);
        this.renderer.flush(); // a paused answer shows all it has
        break;
      case "response_complete":
        if (typeof data.content === "string" && data.content !== this.text) {
          // The streamed chunks and the final text disagree: show the final text, say so.
          this.answer.dataset.repaired = "true";
          this.text = data.content;
        }
        this.collapseThinking();
        this.renderer.flush();
        if (data.fallback) this.showNote("The agent failed; this is a fallback reply.", "warn");
        break;
      case "agent_completed":
        this.finish(data);
        break;
      default:
        break;
    }
  }

  /** Show a saved answer (or that none was saved): a past exchange, no live run behind it. */
  showSaved(message) {
    this.root.dataset.history = "true";
    if (message) {
      this.assistant.dataset.messageId = message.message_id ?? "";
      this.text = message.content;
      this.setStatus("completed");
      if (message.fallback) this.showNote("The agent failed; this is a fallback reply.", "warn");
    } else {
      this.setStatus("lost");
      this.showNote("No answer was saved for this message.", "info");
    }
    this.renderer.flush();
    this.answer.setAttribute("aria-busy", "false");
  }

  collapseThinking() {
    if (this.thinking.open && !this.thinkingToggled) this.thinking.open = false;
  }

  finish(data) {
    this.setStatus(data.status ?? "completed");
    this.renderer.flush();
    this.answer.setAttribute("aria-busy", "false");
    this.time.textContent = formatDuration(data.duration_ms);
    for (const card of this.tools.values()) {
      if (card.root.dataset.state === "running" || card.root.dataset.state === "waiting") {
        this.toolCompleted({ call_id: card.callId, ok: false, error: "ended" });
      }
    }
    if (data.status !== "completed" && data.error) {
      const { code, message } = data.error;
      const label = STATUS_LABELS[data.status] ?? data.status;
      const text = code === data.status ? `${label}.` : `${label}: ${message || code} [${code}]`;
      this.showNote(text, data.status === "cancelled" ? "info" : "error");
    }
  }

  /** An approval (on its tool's card) or a question (above the answer), with its controls. */
  inputRequested(data) {
    const requestId = data.request_id;
    if (!requestId || this.requests.has(requestId)) return;
    const card = data.call_id ? this.tools.get(data.call_id) : null;
    const parent = card ? card.body : this.assistant;
    const box = el("div", `input-request ${data.kind === "question" ? "question" : "approval"}`);
    box.dataset.requestId = requestId;
    box.dataset.state = "open";
    if (card) parent.appendChild(box);
    else this.assistant.insertBefore(box, this.answer);
    const send = async (answer, buttons) => {
      if (!client || !this.runId) return;
      for (const button of buttons) button.disabled = true;
      error.hidden = true;
      try {
        await client.respond(this.runId, requestId, answer);
        box.dataset.state = "sent";
      } catch (e) {
        error.hidden = false;
        error.textContent = `Not sent: ${e.code}: ${e.message}`;
        for (const button of buttons) button.disabled = false;
      }
    };
    let error;
    if (data.kind === "question") {
      el("p", "input-question", box, data.question ?? "");
      const form = el("form", "input-form", box);
      const buttons = [];
      for (const choice of Array.isArray(data.choices) ? data.choices : []) {
        const button = el("button", "choice", form, String(choice));
        button.type = "button";
        button.addEventListener("click", () => send({ answer: String(choice) }, buttons));
        buttons.push(button);
      }
      const input = el("input", "input-answer", form);
      input.type = "text";
      input.placeholder = "Your answer";
      input.setAttribute("aria-label", "Your answer");
      const submit = el("button", "primary", form, "Answer");
      submit.type = "submit";
      buttons.push(submit);
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        send({ answer: input.value }, buttons);
      });
      error = el("p", "input-error", box);
    } else {
      el("p", "input-question", box, `Run ${data.tool ?? "this tool"} with these arguments?`);
      const args = el("textarea", "input-args", box);
      args.value = JSON.stringify(data.args ?? {}, null, 2);
      args.rows = Math.min(8, args.value.split("\n").length);
      args.setAttribute("aria-label", "Arguments (you may edit them)");
      const reason = el("input", "input-reason", box);
      reason.type = "text";
      reason.placeholder = "Reason (optional)";
      reason.setAttribute("aria-label", "Reason");
      const row = el("div", "input-buttons", box);
      const approve = el("button", "primary approve", row, "Approve");
      const deny = el("button", "deny", row, "Deny");
      approve.type = deny.type = "button";
      const buttons = [approve, deny];
      const why = () => (reason.value.trim() ? { reason: reason.value.trim() } : {});
      approve.addEventListener("click", () => {
        let edited;
        try {
          edited = JSON.parse(args.value);
        } catch {
          error.hidden = false;
          error.textContent = "The arguments are not valid JSON.";
          return;
        }
        const changed = JSON.stringify(edited) !== JSON.stringify(data.args ?? {});
        send({ approved: true, ...(changed ? { args: edited } : {}), ...why() }, buttons);
      });
      deny.addEventListener("click", () => send({ approved: false, ...why() }, buttons));
      error = el("p", "input-error", box);
    }
    error.hidden = true;
    if (card) {
      card.root.open = true;
      card.root.dataset.state = "waiting";
      card.status.textContent = "waiting for approval";
    }
    this.requests.set(requestId, box);
  }

  inputResolved(data) {
    const box = this.requests.get(data.request_id);
    if (!box) return;
    this.requests.delete(data.request_id);
    box.dataset.state = "resolved";
    let text;
    if (data.by === "timeout") text = "No answer came in time.";
    else if (data.by === "cancel") text = "Not answered: the run ended.";
    else if (typeof data.answer === "string") text = `Answered: ${data.answer}`;
    else text = data.approved ? "Approved." : "Denied.";
    if (data.approved && data.args) text = "Approved, with edited arguments.";
    if (data.reason && data.by === "user") text += ` Reason: ${data.reason}`;
    box.replaceChildren();
    el("p", "input-outcome", box, text);
    const card = [...this.tools.values()].find((c) => c.body.contains(box));
    if (card && card.root.dataset.state === "waiting") {
      card.root.dataset.state = "running";
      card.status.textContent = "running…";
    }
  }

  toolStarted(data) {
    const root = el("details", "tool", this.toolList);
    root.open = true;
    root.dataset.state = "running";
    root.dataset.callId = data.call_id ?? "";
    const summary = el("summary", "tool-head", root);
    const icon = el("span", "tool-icon", summary);
    icon.setAttribute("aria-hidden", "true");
    el("span", "tool-name", summary, data.tool ?? "tool");
    const status = el("span", "tool-status", summary, "running…");
    const time = el("span", "tool-time", summary);
    const body = el("div", "tool-body", root);
    el("div", "tool-label", body, "Arguments");
    el("pre", "tool-args", body, formatValue(data.args ?? {}));
    const outLabel = el("div", "tool-label", body, "Result");
    const out = el("pre", "tool-result", body, "…");
    const began = performance.now();
    const callId = data.call_id;
    this.tools.set(callId, { root, status, time, out, outLabel, callId, began, body });
  }

  toolCompleted(data) {
    let card = this.tools.get(data.call_id);
    if (!card) {
      this.toolStarted({ call_id: data.call_id, tool: data.tool, args: {} });
      card = this.tools.get(data.call_id);
    }
    const ok = data.ok !== false;
    card.root.dataset.state = ok ? "ok" : "error";
    card.status.textContent = ok ? "done" : "failed";
    const ms =
      typeof data.duration_ms === "number" ? data.duration_ms : performance.now() - card.began;
    card.time.textContent = formatDuration(ms);
    if (ok) {
      card.out.textContent = formatValue(data.result);
    } else {
      card.outLabel.textContent = "Error";
      const error = data.error;
      card.out.textContent =
        typeof error === "object" && error !== null
          ? (error.message ?? formatValue(error))
          : String(error ?? "failed");
      card.out.classList.add("tool-error");
    }
  }
}

// The page ------------------------------------------------------------------------------

let client = null;
let threadId = null;
let current = null; // the client's record of the live run the controls act on
let sending = false;
const turnsByRef = new Map();
const turnsByRun = new Map();

function turnFor(run) {
  let turn = turnsByRun.get(run.runId);
  if (!turn && run.ref !== null) turn = turnsByRef.get(run.ref);
  if (!turn) {
    ui.empty.hidden = true;
    turn = new Turn();
  }
  if (!turn.runId) {
    turn.bind(run);
    turnsByRun.set(run.runId, turn);
  }
  return turn;
}

function rememberLiveRuns() {
  if (!client) return;
  const live = client.liveRuns().map((run) => run.runId);
  if (live.length) store.set(LIVE_RUNS_KEY, JSON.stringify(live));
  else store.remove(LIVE_RUNS_KEY);
}

function storedLiveRuns() {
  try {
    const ids = JSON.parse(store.get(LIVE_RUNS_KEY) ?? "[]");
    return Array.isArray(ids) ? ids.filter((id) => typeof id === "string") : [];
  } catch {
    return [];
  }
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
}

function isBusy() {
  return sending || Boolean(current && !current.done);
}

function updateRunbar() {
  if (current && current.done) current = client?.liveRuns().at(-1) ?? null;
  const live = current && !current.done ? current : null;
  ui.runbar.hidden = !live;
  const busy = sending || Boolean(live);
  // A message may be sent while an answer streams: the gateway queues it behind it.
  ui.send.disabled = sending;
  ui.newChat.disabled = busy;
  markThreads();
  ui.composer.dataset.busy = String(busy);
  if (!live) return;
  const status = live.status;
  ui.runbar.dataset.status = status;
  ui.runLabel.textContent =
    status === "paused"
      ? "Paused"
      : status === "queued"
        ? "Starting…"
        : status === "waiting"
          ? "Waiting for your answer"
          : "Answering…";
  ui.stop.disabled = !(status === "running" || status === "queued" || status === "waiting");
  ui.resume.disabled = status !== "paused";
  ui.cancel.disabled = !LIVE_STATUSES.has(status);
}

const CONNECTION_LABELS = {
  idle: "Not connected",
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  offline: "Offline",
  closed: "Disconnected",
};

function showConnection(state, transport) {
  ui.connection.dataset.state = state;
  ui.connection.dataset.transport = transport ?? "";
  ui.connection.querySelector(".label").textContent = CONNECTION_LABELS[state] ?? state;
  ui.connection.querySelector(".transport").textContent = transport === "sse" ? "SSE" : "";
  const name = transport === "sse" ? "Server-Sent Events" : "WebSocket";
  ui.connection.title = transport ? `Transport: ${name}` : "";
}

// The threads sidebar ---------------------------------------------------------------------

const THREAD_PAGE = 20;
const MAX_PAGE = 100;
const threads = { cursor: null, generation: 0, refreshTimer: 0 };
let historyLoad = 0; // bumped by every history load and New chat: a stale load is dropped
const narrow = matchMedia("(max-width: 640px)");

function relativeTime(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "";
  const diff = Date.now() / 1000 - seconds;
  if (diff < 45) return "just now";
  if (diff < 3600) return `${Math.max(1, Math.round(diff / 60))} min ago`;
  if (diff < 86400) return `${Math.round(diff / 3600)} h ago`;
  if (diff < 7 * 86400) return `${Math.round(diff / 86400)} d ago`;
  const date = new Date(seconds * 1000);
  const sameYear = date.getFullYear() === new Date().getFullYear();
  return date.toLocaleDateString(undefined, {
    day: "numeric",
    month: "short",
    year: sameYear ? undefined : "numeric",
  });
}

function setThreadsOpen(open) {
  ui.threads.hidden = !open;
  ui.threadsToggle.setAttribute("aria-expanded", String(open));
}

/** Mark the thread the conversation view shows; disable what a live run forbids. */
function markThreads() {
  // The open thread is watched: runs other tabs or devices start in it show here too.
  client?.watchThread(threadId ?? null);
  const busy = isBusy();
  for (const item of ui.threadList.children) {
    const isCurrent = item.dataset.threadId === threadId;
    item.dataset.current = String(isCurrent);
    const open = item.querySelector(".thread-open");
    if (isCurrent) open.setAttribute("aria-current", "true");
    else open.removeAttribute("aria-current");
    open.disabled = busy;
    item.querySelector(".thread-delete").disabled = busy && isCurrent;
  }
}

function disarm(button) {
  if (button.dataset.confirm !== "true") return;
  clearTimeout(Number(button.dataset.timer));
  button.dataset.confirm = "false";
  button.textContent = "×";
  button.setAttribute("aria-label", `Delete conversation: ${button.dataset.title}`);
  if (ui.threadsStatus.textContent === "Press again to delete") ui.threadsStatus.textContent = "";
}

function threadItem(thread) {
  const title = typeof thread.title === "string" && thread.title ? thread.title : "Untitled";
  const item = el("li", "thread-item");
  item.dataset.threadId = thread.thread_id;
  const open = el("button", "thread-open", item);
  open.type = "button";
  open.title = title;
  el("span", "thread-title", open, title);
  const time = el("time", "thread-time", open, relativeTime(thread.updated_at));
  if (typeof thread.updated_at === "number" && Number.isFinite(thread.updated_at)) {
    const date = new Date(thread.updated_at * 1000);
    time.dateTime = date.toISOString();
    time.title = date.toLocaleString();
  }
  open.addEventListener("click", () => openThread(thread.thread_id));

  const remove = el("button", "thread-delete", item, "×");
  remove.type = "button";
  remove.dataset.title = title;
  remove.dataset.confirm = "false";
  remove.setAttribute("aria-label", `Delete conversation: ${title}`);
  remove.addEventListener("click", () => {
    if (remove.dataset.confirm === "true") {
      disarm(remove);
      deleteThread(thread.thread_id, item);
      return;
    }
    // The first click arms the button; a second one (within a few seconds) deletes.
    remove.dataset.confirm = "true";
    remove.textContent = "Delete?";
    remove.setAttribute("aria-label", `Confirm: delete conversation ${title}`);
    remove.dataset.timer = String(setTimeout(() => disarm(remove), 4000));
    ui.threadsStatus.textContent = "Press again to delete";
  });
  remove.addEventListener("blur", () => disarm(remove));
  remove.addEventListener("keydown", (e) => {
    if (e.key === "Escape") disarm(remove);
  });
  return item;
}

/** Load the first page of threads (or, with `more`, the next one) into the sidebar. */
async function loadThreads(more = false) {
  const c = client;
  if (!c || (more && !threads.cursor)) return;
  if (!more) clearTimeout(threads.refreshTimer);
  const generation = more ? threads.generation : ++threads.generation;
  // A refresh keeps as many threads as were shown (up to a page of the server's maximum).
  const shown = ui.threadList.childElementCount;
  const limit = more ? THREAD_PAGE : Math.min(MAX_PAGE, Math.max(THREAD_PAGE, shown));
  ui.threadsMore.disabled = true;
  try {
    const body = await c.request("api/threads", {
      query: { limit, cursor: more ? threads.cursor : null },
    });
    if (c !== client || generation !== threads.generation) return;
    const known = new Set(more ? [...ui.threadList.children].map((li) => li.dataset.threadId) : []);
    const items = (Array.isArray(body.threads) ? body.threads : [])
      .filter((t) => t && typeof t.thread_id === "string" && !known.has(t.thread_id))
      .map(threadItem);
    if (more) {
      ui.threadList.append(...items);
    } else {
      const focused = document.activeElement;
      const focusedId = ui.threadList.contains(focused)
        ? focused.closest(".thread-item")?.dataset.threadId
        : null;
      ui.threadList.replaceChildren(...items);
      if (focusedId) {
        const again = ui.threadList.querySelector(`[data-thread-id="${CSS.escape(focusedId)}"]`);
        const which = focused.classList.contains("thread-delete") ? "delete" : "open";
        again?.querySelector(`.thread-${which}`)?.focus();
      }
    }
    threads.cursor = typeof body.next_cursor === "string" ? body.next_cursor : null;
    ui.threadsMore.hidden = !threads.cursor;
    ui.threadsEmpty.hidden = ui.threadList.childElementCount > 0;
    ui.threadsStatus.textContent = "";
    markThreads();
  } catch (error) {
    if (c !== client || generation !== threads.generation) return;
    ui.threadsStatus.textContent = "Could not load";
    ui.threadsStatus.title = `${error.code}: ${error.message}`;
  } finally {
    ui.threadsMore.disabled = false;
  }
}

function scheduleThreadsRefresh() {
  clearTimeout(threads.refreshTimer);
  threads.refreshTimer = setTimeout(() => loadThreads(), 150);
}

function clearThreads() {
  threads.generation++;
  threads.cursor = null;
  clearTimeout(threads.refreshTimer);
  ui.threadList.replaceChildren();
  ui.threadsMore.hidden = true;
  ui.threadsEmpty.hidden = true;
  ui.threadsStatus.textContent = "";
}

/** Empty the conversation view; the next message starts a new thread. */
function clearConversation() {
  threadId = null;
  turnsByRun.clear();
  for (const node of [...ui.transcript.children]) if (node !== ui.empty) node.remove();
  ui.empty.hidden = false;
  showNotice("");
  markThreads();
}

/** Show a thread's saved messages, oldest first, paired into turns. */
function showHistory(messages) {
  let turn = null;
  let answered = true;
  const settle = () => {
    if (turn && !answered) turn.showSaved(null);
  };
  for (const message of messages) {
    if (!message || typeof message.content !== "string") continue;
    if (message.role === "user") {
      settle();
      turn = new Turn({ userText: message.content });
      answered = false;
    } else if (message.role === "assistant") {
      if (answered) turn = new Turn();
      turn.showSaved(message);
      answered = true;
    }
  }
  settle();
  ui.empty.hidden = ui.transcript.querySelector(".turn") !== null;
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

/** Load every page of a thread's history into the view; the next message continues it. */
async function openThread(id) {
  const c = client;
  if (!c || isBusy()) return;
  const load = ++historyLoad;
  ui.threadsStatus.textContent = "Loading…";
  const messages = [];
  try {
    let cursor = null;
    do {
      const body = await c.request(`api/threads/${encodeURIComponent(id)}/messages`, {
        query: { limit: MAX_PAGE, cursor },
      });
      if (load !== historyLoad || c !== client) return;
      if (Array.isArray(body.messages)) messages.push(...body.messages);
      const next = typeof body.next_cursor === "string" ? body.next_cursor : null;
      cursor = next !== cursor ? next : null;
    } while (cursor);
  } catch (error) {
    if (load !== historyLoad || c !== client) return;
    ui.threadsStatus.textContent = "";
    if (error.status === 404) {
      showNotice("That conversation no longer exists.");
      scheduleThreadsRefresh();
    } else {
      showNotice(`Could not load the conversation (${error.code}: ${error.message}).`);
    }
    return;
  }
  ui.threadsStatus.textContent = "";
  if (isBusy()) return; // a run started meanwhile: leave its view alone
  clearConversation();
  threadId = id;
  showHistory(messages);
  markThreads();
  if (narrow.matches) setThreadsOpen(false);
  ui.message.focus();
}

async function deleteThread(id, item) {
  const c = client;
  if (!c) return;
  for (const button of item.querySelectorAll("button")) button.disabled = true;
  const hadFocus = item.contains(document.activeElement);
  const next = item.nextElementSibling ?? item.previousElementSibling;
  try {
    await c.request(`api/threads/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch (error) {
    if (c !== client) return;
    if (error.status !== 404) {
      showNotice(`Could not delete the conversation (${error.code}: ${error.message}).`);
      markThreads();
      for (const button of item.querySelectorAll("button")) button.disabled = false;
      return;
    }
  }
  if (c !== client) return;
  item.remove();
  ui.threadsEmpty.hidden = ui.threadList.childElementCount > 0;
  if (id === threadId && !isBusy()) {
    historyLoad++;
    clearConversation();
  }
  if (hadFocus) (next?.querySelector(".thread-open") ?? ui.message).focus();
  await loadThreads();
}

function startClient(token) {
  client?.close();
  const asked = params.get("transport");
  const transport = ["auto", "websocket", "sse"].includes(asked) ? asked : "auto";
  client = new ChatClient({ token, transport });
  const who = tokenSubject(token);
  ui.who.textContent = who ? `Signed in as ${who}` : "";
  ui.signOut.hidden = false;
  ui.signin.hidden = true;
  document.body.dataset.signedIn = "true";

  client.addEventListener("state", (e) => showConnection(e.detail.state, e.detail.transport));
  client.addEventListener("ready", (e) => {
    ui.who.textContent = `Signed in as ${e.detail.user_id}`;
  });
  client.addEventListener("event", (e) => {
    const { event, run } = e.detail;
    const turn = turnFor(run);
    turn.onEvent(event);
    if (!run.done && (!current || current.done || current === run)) current = run;
    if (event.type === "user_message" && run.threadId) threadId = run.threadId;
    updateRunbar();
  });
  client.addEventListener("run", (e) => {
    const { run } = e.detail;
    if (run.lost) turnFor(run).lost(run.error);
    if (run.done) scheduleThreadsRefresh();
    rememberLiveRuns();
    updateRunbar();
  });
  client.addEventListener("error", (e) => {
    if (!e.detail.run) showNotice(`${e.detail.error.code}: ${e.detail.error.message}`);
  });
  client.addEventListener("auth", (e) => {
    signOut(`The gateway refused the token (${e.detail.detail || e.detail.reason}).`);
  });
  showConnection("connecting", null);
  client.connect();
  for (const runId of storedLiveRuns()) client.resume(runId, 0);
  clearThreads();
  loadThreads();
  loadAgents();
  ui.message.focus();
}

function signOut(message = "") {
  client?.close();
  client = null;
  current = null;
  store.remove(TOKEN_KEY);
  store.remove(LIVE_RUNS_KEY);
  showConnection("idle", null);
  ui.who.textContent = "";
  ui.signOut.hidden = true;
  ui.runbar.hidden = true;
  clearThreads();
  document.body.dataset.signedIn = "false";
  ui.signinError.textContent = message;
  ui.signin.hidden = false;
  ui.token.value = "";
  ui.token.focus();
}

async function loadAgents() {
  const wanted = params.get("agent");
  let agents = [];
  let fallback = null;
  try {
    const response = await fetch("health", { cache: "no-store" });
    const health = await response.json();
    agents = Array.isArray(health.agents) ? health.agents.filter((a) => typeof a === "string") : [];
    fallback = typeof health.default_agent === "string" ? health.default_agent : null;
  } catch {
    // the list is a convenience: the default agent answers anyway
  }
  if (wanted && !agents.includes(wanted)) agents.push(wanted);
  const options = [el("option", "", null, fallback ? `default (${fallback})` : "default")];
  options[0].value = "";
  for (const name of agents) {
    const option = el("option", "", null, name);
    option.value = name;
    options.push(option);
  }
  ui.agent.replaceChildren(...options);
  ui.agent.value = wanted ?? "";
}

async function submit() {
  const text = ui.message.value;
  if (!client || !text.trim() || sending) return;
  ui.empty.hidden = true;
  showNotice("");
  ui.message.value = "";
  autosize();
  const ref = client.newId();
  const turn = new Turn({ userText: text, ref });
  turnsByRef.set(ref, turn);
  sending = true;
  updateRunbar();
  try {
    const agent = ui.agent.value || undefined;
    const result = await client.send(text, { id: ref, agent, threadId });
    if (result.threadId && result.threadId !== threadId) scheduleThreadsRefresh();
    threadId = result.threadId ?? threadId;
    markThreads();
    if (!current || current.done) current = client.runs.get(result.runId) ?? current;
  } catch (error) {
    turn.notSent(error);
    if (!ui.message.value) {
      ui.message.value = text; // give the text back, to try again
      autosize();
    }
  } finally {
    sending = false;
    turnsByRef.delete(ref);
    rememberLiveRuns();
    updateRunbar();
  }
}

function control(action) {
  const run = current;
  if (!client || !run || run.done) return;
  const button = { stop: ui.stop, start: ui.resume, cancel: ui.cancel }[action];
  button.disabled = true;
  client[action](run.runId)
    .catch((error) => showNotice(`${action} failed: ${error.code}: ${error.message}`))
    .finally(updateRunbar);
}

function autosize() {
  ui.message.style.height = "auto";
  ui.message.style.height = `${Math.min(ui.message.scrollHeight, 200)}px`;
}

// Wiring --------------------------------------------------------------------------------

ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  submit();
});
ui.message.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.altKey && !e.ctrlKey && !e.metaKey && !e.isComposing) {
    e.preventDefault();
    submit();
  }
});
ui.message.addEventListener("input", autosize);
ui.stop.addEventListener("click", () => control("stop"));
ui.resume.addEventListener("click", () => control("start"));
ui.cancel.addEventListener("click", () => control("cancel"));
ui.signOut.addEventListener("click", () => signOut());
ui.newChat.addEventListener("click", () => {
  if (isBusy()) return;
  historyLoad++;
  clearConversation();
  ui.message.focus();
});
ui.threadsToggle.addEventListener("click", () => setThreadsOpen(ui.threads.hidden));
ui.threadsMore.addEventListener("click", () => loadThreads(true));
setThreadsOpen(!narrow.matches);
for (const button of document.querySelectorAll(".example")) {
  button.addEventListener("click", () => {
    ui.message.value = button.textContent;
    submit();
  });
}
ui.signinForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const token = ui.token.value.trim();
  if (!token) return;
  store.set(TOKEN_KEY, token);
  ui.token.value = "";
  ui.signinError.textContent = "";
  startClient(token);
});

// Devtools and tests can reach the client here; it holds nothing the page does not.
Object.defineProperty(window, "chat", {
  value: Object.freeze({
    get client() {
      return client;
    },
  }),
});

const token = takeTokenFromUrl();
if (token) startClient(token);
else signOut();
