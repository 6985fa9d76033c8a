// Approvals and questions through the front ends' own libraries, unmodified:
// @ag-ui/client's HttpAgent (its verification on) ending a run at an interrupt and
// resuming it with `resume`, and the `ai` package's Chat (what useChat runs) with
// DefaultChatTransport, answering a tool-approval-request with addToolApprovalResponse
// and an ask_user call with addToolOutput, sent on by sendAutomaticallyWhen.
//
// node inputs.mjs '<scenario JSON>'   (GATEWAY_URL, GATEWAY_TOKEN in the environment)
// Prints the outcome as one JSON line ({"result": …}).
import { HttpAgent } from "@ag-ui/client";
import {
  AbstractChat,
  DefaultChatTransport,
  lastAssistantMessageIsCompleteWithApprovalResponses,
  lastAssistantMessageIsCompleteWithToolCalls,
} from "ai";

const base = process.env.GATEWAY_URL;
const token = process.env.GATEWAY_TOKEN;
const scenario = JSON.parse(process.argv[2]);
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const headers = { Authorization: `Bearer ${token}` };

async function agui() {
  const runIds = [];
  const agent = new HttpAgent({
    url: `${base}/api/ag-ui/${scenario.agent}`,
    headers,
    threadId: scenario.threadId,
    fetch: async (url, init) => {
      const response = await fetch(url, init);
      runIds.push(response.headers.get("x-chat-run-id"));
      return response;
    },
  });
  agent.addMessage({ id: "u-1", role: "user", content: scenario.message });
  const rounds = [];
  const collect = () => {
    const events = [];
    return { events, subscriber: { onEvent: ({ event }) => void events.push(event) } };
  };
  let first = collect();
  await agent.runAgent({ runId: "run-1" }, first.subscriber);
  rounds.push({ events: first.events, pending: agent.pendingInterrupts });
  for (const [i, answer] of scenario.answers.entries()) {
    const [interrupt] = agent.pendingInterrupts;
    const next = collect();
    await agent.runAgent(
      {
        runId: `run-${i + 2}`,
        resume: [{ interruptId: interrupt.id, status: "resolved", payload: answer }],
      },
      next.subscriber,
    );
    rounds.push({ events: next.events, pending: agent.pendingInterrupts });
  }
  return { rounds, runIds, messages: agent.messages };
}

// A Chat with the state useChat keeps, minus React.
class State {
  constructor() {
    this.messages = [];
    this.status = "ready";
    this.error = undefined;
  }
  pushMessage = (m) => void (this.messages = this.messages.concat(m));
  popMessage = () => void (this.messages = this.messages.slice(0, -1));
  replaceMessage = (i, m) =>
    void (this.messages = [...this.messages.slice(0, i), m, ...this.messages.slice(i + 1)]);
  snapshot = (v) => structuredClone(v);
}
class Chat extends AbstractChat {
  constructor(init) {
    super({ ...init, state: new State() });
  }
}

async function aisdk() {
  const runIds = [];
  const requests = [];
  let finished = null;
  let settle;
  const done = new Promise((resolve) => (settle = resolve));
  const chat = new Chat({
    id: scenario.chatId,
    transport: new DefaultChatTransport({
      api: `${base}/api/ai-sdk/chat`,
      headers,
      body: { agent: scenario.agent },
      fetch: async (url, init) => {
        requests.push(JSON.parse(init.body));
        const response = await fetch(url, init);
        runIds.push(response.headers.get("x-chat-run-id"));
        return response;
      },
    }),
    sendAutomaticallyWhen: (opts) =>
      lastAssistantMessageIsCompleteWithApprovalResponses(opts) ||
      lastAssistantMessageIsCompleteWithToolCalls(opts),
    onError: (exc) => settle({ error: String(exc?.message ?? exc) }),
    // As a person would: the answer comes once the response is over and the chat ready.
    onFinish: (info) => void setTimeout(() => answer(info), 50),
  });
  const answer = (info) => {
    if (chat.status !== "ready") return void setTimeout(() => answer(info), 50);
    {
      finished = info;
      const parts = info.message.parts;
      const asking = parts.find((p) => p.state === "approval-requested");
      const question = parts.find((p) => p.toolName === "ask_user" && p.state === "input-available");
      if (asking) {
        const { approved, reason } = scenario.approval;
        void chat.addToolApprovalResponse({ id: asking.approval.id, approved, reason });
      } else if (question) {
        void chat.addToolOutput({
          tool: "ask_user",
          toolCallId: question.toolCallId,
          output: scenario.answer,
        });
      } else {
        settle({});
      }
    }
  };
  await chat.sendMessage({ text: scenario.message });
  const outcome = await done;
  return { ...outcome, runIds, requests, messages: chat.messages, finished: finished?.message };
}

const run = scenario.kind === "agui" ? agui : aisdk;
say({ result: await run() });
