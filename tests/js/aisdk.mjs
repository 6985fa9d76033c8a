// Drives the gateway's AI SDK routes with the `ai` package, unmodified: DefaultChatTransport
// (what useChat sends and reads, resume included) and readUIMessageStream (how useChat
// builds the answer from the parts).
//
// node aisdk.mjs '<scenario JSON>'   (GATEWAY_URL, GATEWAY_TOKEN in the environment)
// Prints progress lines as JSON ({"progress": …}) and the outcome last ({"result": …}).
import { DefaultChatTransport, readUIMessageStream } from "ai";

const base = process.env.GATEWAY_URL;
const token = process.env.GATEWAY_TOKEN;
const scenario = JSON.parse(process.argv[2]);
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const seen = {};
const transport = new DefaultChatTransport({
  api: `${base}/api/ai-sdk/chat`,
  headers: { Authorization: `Bearer ${token}` },
  body: scenario.agent ? { agent: scenario.agent } : {},
  fetch: async (url, init) => {
    const response = await fetch(url, init);
    if (response.headers.get("x-chat-run-id")) {
      seen.runId = response.headers.get("x-chat-run-id");
      say({ progress: "headers", runId: seen.runId });
    }
    seen.status = response.status;
    seen.protocolHeader = response.headers.get("x-vercel-ai-ui-message-stream");
    return response;
  },
});

// Reads a chunk stream two ways at once: the parts as the SDK parsed them, and the UI
// message readUIMessageStream builds from them.  `stopAfter` text deltas, then abort.
async function consume(stream, abort, stopAfter) {
  const [forChunks, forMessage] = stream.tee();
  const chunks = [];
  const errors = [];
  let message = null;
  const reading = (async () => {
    for await (const snapshot of readUIMessageStream({
      stream: forMessage,
      onError: (exc) => void errors.push(String(exc?.message ?? exc)),
    })) {
      message = snapshot;
    }
  })().catch((exc) => void errors.push(String(exc?.message ?? exc)));
  let deltas = 0;
  try {
    for await (const chunk of forChunks) {
      chunks.push(chunk);
      if (chunk.type === "text-delta") deltas += 1;
      if (stopAfter != null && deltas >= stopAfter) {
        abort.abort();
        break;
      }
    }
  } catch (exc) {
    errors.push(String(exc?.message ?? exc));
  }
  if (stopAfter == null) await reading;
  return { chunks, message, errors };
}

function userMessage(text) {
  return { id: `u-${Date.now()}`, role: "user", parts: [{ type: "text", text }] };
}

async function send(trigger, messages, stopAfter, messageId) {
  const abort = new AbortController();
  const stream = await transport.sendMessages({
    chatId: scenario.chatId,
    messages,
    trigger,
    messageId,
    abortSignal: abort.signal,
  });
  return consume(stream, abort, stopAfter);
}

if (scenario.kind === "run") {
  const out = await send("submit-message", [userMessage(scenario.message)]);
  say({ result: { ...out, ...seen } });
} else if (scenario.kind === "regenerate") {
  const first = await send("submit-message", [userMessage(scenario.message)]);
  // As useChat's regenerate(): the answer is dropped, the rest sent again with its id.
  const sent = [userMessage(scenario.message)];
  const again = await send("regenerate-message", sent, undefined, first.message.id);
  say({ result: { first, again, ...seen } });
} else if (scenario.kind === "drop") {
  const before = await send("submit-message", [userMessage(scenario.message)], scenario.dropAfter);
  const stream = await transport.reconnectToStream({ chatId: scenario.chatId });
  const after = stream == null ? null : await consume(stream, new AbortController());
  say({ result: { before, after, ...seen } });
} else if (scenario.kind === "reconnect") {
  const stream = await transport.reconnectToStream({ chatId: scenario.chatId });
  const after = stream == null ? null : await consume(stream, new AbortController());
  say({ result: { after, ...seen } });
} else {
  throw new Error(`unknown scenario ${scenario.kind}`);
}
