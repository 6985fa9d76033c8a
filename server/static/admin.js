// The operator's view: the live runs of every process, filtered, with cancel.
// The token is the chat client's (sessionStorage "chat.token", or #token= in the address).

import { tokenSubject } from "./chat-client.js";

const TOKEN_KEY = "chat.token";
const REFRESH_MS = 2000;

const $ = (id) => document.getElementById(id);

function storedToken() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const token = hash.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    hash.delete("token");
    const rest = hash.toString();
    history.replaceState(history.state, "", location.pathname + (rest ? `#${rest}` : ""));
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

function age(seconds) {
  if (seconds < 60) return `${Math.floor(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.floor(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

let token = null;
let timer = null;
let asked = 0; // the latest listing asked for: an older answer arriving late is dropped

function showError(text) {
  const el = $("admin-error");
  el.textContent = text;
  el.hidden = !text;
}

function signIn(message) {
  clearInterval(timer);
  timer = null;
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("who").textContent = "";
  $("sign-out").hidden = true;
  $("signin-error").textContent = message || "";
  $("signin").hidden = false;
  $("token").focus();
}

async function call(method, path) {
  const resp = await fetch(path, { method, headers: { Authorization: `Bearer ${token}` } });
  const body = await resp.json().catch(() => ({}));
  if (resp.status === 403) {
    signIn("This token is not an operator's.");
    return null;
  }
  if (!resp.ok) throw new Error(body.error?.message || `HTTP ${resp.status}`);
  return body;
}

function query() {
  const params = new URLSearchParams();
  for (const name of ["user", "agent", "status"]) {
    const value = $(`filter-${name}`).value.trim();
    if (value) params.set(name, value);
  }
  const text = params.toString();
  return text ? `?${text}` : "";
}

function render(runs) {
  const rows = $("run-rows");
  rows.replaceChildren(
    ...runs.map((run) => {
      const tr = document.createElement("tr");
      tr.dataset.runId = run.run_id;
      const status = cell(run.status, "status");
      status.dataset.status = run.status;
      const actions = document.createElement("td");
      const cancel = document.createElement("button");
      cancel.type = "button";
      cancel.className = "danger";
      cancel.textContent = "Cancel";
      cancel.addEventListener("click", () => cancelRun(run.run_id, cancel));
      actions.append(cancel);
      tr.append(
        cell(run.run_id, "id"),
        cell(run.user, "user"),
        cell(run.agent, "agent"),
        status,
        cell(age(run.age_s), "num age"),
        cell(String(run.watchers), "num watchers"),
        cell(run.node, "node"),
        actions,
      );
      return tr;
    }),
  );
  $("runs-empty").hidden = runs.length > 0;
  $("admin-status").textContent = `${runs.length} live run${runs.length === 1 ? "" : "s"}`;
}

async function refresh() {
  if (!token) return;
  const mine = ++asked;
  try {
    const body = await call("GET", `/api/admin/runs${query()}`);
    if (mine !== asked) return;
    if (body) {
      render(body.runs);
      showError("");
    }
  } catch (e) {
    showError(`Could not list the runs: ${e.message}`);
  }
}

async function cancelRun(runId, button) {
  button.disabled = true;
  try {
    await call("POST", `/api/admin/runs/${encodeURIComponent(runId)}/cancel`);
  } catch (e) {
    showError(`Could not cancel ${runId}: ${e.message}`);
  }
  await refresh();
}

function start(given) {
  token = given;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("signin").hidden = true;
  $("who").textContent = tokenSubject(token) || "";
  $("sign-out").hidden = false;
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, REFRESH_MS);
}

$("filters").addEventListener("submit", (e) => {
  e.preventDefault();
  refresh();
});
for (const id of ["filter-user", "filter-agent"]) $(id).addEventListener("input", refresh);
$("filter-status").addEventListener("change", refresh);
$("sign-out").addEventListener("click", () => signIn(""));
$("signin-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const given = $("token").value.trim();
  $("token").value = "";
  if (given) start(given);
});

const first = storedToken();
if (first) start(first);
else signIn("");
