// Drives the gateway's AG-UI routes with @ag-ui/client, unmodified: HttpAgent for runs
// (its event verification is always on in runAgent), and the library's own HTTP/SSE
// pipeline (runHttpRequest, transformHttpEventStream, verifyEvents) for a rejoin.
//
// node agui.mjs '<scenario JSON>'   (GATEWAY_URL, GATEWAY_TOKEN in the environment)
// Prints progress lines as JSON ({"progress": …}) and the outcome last ({"result": …}).
import {
  HttpAgent,
  runHttpRequest,
  transformHttpEventStream,
  verifyEvents,
} from "@ag-ui/client";
import { lastValueFrom, toArray } from "rxjs";

const base = process.env.GATEWAY_URL;
const token = process.env.GATEWAY_TOKEN;
const scenario = JSON.parse(process.argv[2]);
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
// The library rethrows a dropped connection's error from its run pipeline as well as from
// runAgent; the drop is the test's own doing, so it is recorded, not fatal.
const unhandled = [];
process.on("unhandledRejection", (exc) => void unhandled.push(String(exc?.message ?? exc)));

// A fetch that reports the gateway's run id and, when asked, drops the connection after
// `dropAfter` TEXT_MESSAGE_CONTENT events, remembering the last SSE id it passed on.
function instrumentedFetch(seen) {
  return async (url, init) => {
    const controller = new AbortController();
    const response = await fetch(url, { ...init, signal: controller.signal });
    seen.runId = response.headers.get("x-chat-run-id");
    seen.threadId = response.headers.get("x-chat-thread-id");
    say({ progress: "headers", runId: seen.runId, threadId: seen.threadId });
    if (scenario.dropAfter == null) return response;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const encoder = new TextEncoder();
    let buffer = "";
    let contents = 0;
    const body = new ReadableStream({
      async pull(out) {
        for (;;) {
          const cut = buffer.indexOf("\n\n");
          if (cut >= 0) {
            const message = buffer.slice(0, cut + 2);
            buffer = buffer.slice(cut + 2);
            const id = /^id: (\d+)$/m.exec(message);
            if (id) seen.lastEventId = id[1];
            if (message.includes('"TEXT_MESSAGE_CONTENT"')) contents += 1;
            out.enqueue(encoder.encode(message));
            if (contents >= scenario.dropAfter) {
              controller.abort();
              out.error(new Error("connection dropped by the test"));
            }
            return;
          }
          const { value, done } = await reader.read();
          if (done) {
            out.close();
            return;
          }
          buffer += decoder.decode(value, { stream: true });
        }
      },
    });
    return new Response(body, { status: response.status, headers: response.headers });
  };
}

async function runOnce(seen) {
  const events = [];
  const agent = new HttpAgent({
    url: `${base}/api/ag-ui/${scenario.agent ?? "load"}`,
    headers: { Authorization: `Bearer ${token}` },
    threadId: scenario.threadId,
    fetch: instrumentedFetch(seen),
  });
  agent.addMessage({ id: `u-${Date.now()}`, role: "user", content: scenario.message });
  let error = null;
  let result = null;
  try {
    result = await agent.runAgent(
      { runId: scenario.runId, tools: scenario.tools ?? [] },
      { onEvent: ({ event }) => void events.push(event) },
    );
  } catch (exc) {
    error = String(exc?.message ?? exc);
  }
  return { events, error, messages: agent.messages, newMessages: result?.newMessages ?? null };
}

async function rejoin(runId, lastEventId) {
  const url = `${base}/api/ag-ui/runs/${encodeURIComponent(runId)}/events`;
  const headers = { Authorization: `Bearer ${token}`, Accept: "text/event-stream" };
  if (lastEventId != null) headers["Last-Event-ID"] = lastEventId;
  const events$ = transformHttpEventStream(runHttpRequest(() => fetch(url, { headers })));
  return lastValueFrom(events$.pipe(verifyEvents(false), toArray()));
}

const seen = {};
if (scenario.kind === "run") {
  const out = await runOnce(seen);
  say({ result: { ...out, ...seen } });
} else if (scenario.kind === "drop") {
  const first = await runOnce(seen);
  let after = null;
  let rejoinError = null;
  try {
    after = await rejoin(seen.runId, seen.lastEventId);
  } catch (exc) {
    rejoinError = String(exc?.message ?? exc);
  }
  say({ result: { ...first, ...seen, after, rejoinError, unhandled } });
} else if (scenario.kind === "client-tool") {
  // AG-UI's front-end tools: the agent calls one, the run ends with the call open, the
  // client runs it and sends its result in the next run of the same agent and thread.
  const agent = new HttpAgent({
    url: `${base}/api/ag-ui/${scenario.agent}`,
    headers: { Authorization: `Bearer ${token}` },
    threadId: scenario.threadId,
  });
  agent.addMessage({ id: "u-1", role: "user", content: scenario.message });
  const runs = [];
  let error = null;
  try {
    for (const [i, runId] of [`${scenario.runId}-1`, `${scenario.runId}-2`].entries()) {
      const events = [];
      await agent.runAgent(
        { runId, tools: scenario.tools },
        { onEvent: ({ event }) => void events.push(event) },
      );
      runs.push({ events, sent: agent.messages.map((m) => m.role) });
      if (i > 0) break;
      const asked = agent.messages.findLast((m) => m.role === "assistant" && m.toolCalls?.length);
      for (const call of asked?.toolCalls ?? []) {
        const args = JSON.parse(call.function.arguments);
        agent.addMessage({
          id: `tool-${call.id}`,
          role: "tool",
          toolCallId: call.id,
          content: JSON.stringify({ city: args.city, celsius: 21 }),
        });
      }
    }
  } catch (exc) {
    error = String(exc?.message ?? exc);
  }
  say({ result: { runs, messages: agent.messages, error } });
} else if (scenario.kind === "rejoin") {
  // A rejoin on its own (of a finished run, say), through the library's verification.
  let after = null;
  let rejoinError = null;
  try {
    after = await rejoin(scenario.runId, scenario.lastEventId);
  } catch (exc) {
    rejoinError = String(exc?.message ?? exc);
  }
  say({ result: { after, rejoinError } });
} else {
  throw new Error(`unknown scenario ${scenario.kind}`);
}
