// The Vercel AI SDK against the gateway: `node ai_sdk.mjs <case> <model>` prints one JSON
// object of what the SDK returned. The default provider, `createOpenAI(...)(model)`, posts to
// /v1/responses; `provider.chat(model)` to /v1/chat/completions (cases named `chat-*`).
// Driven by tests/test_node_clients.py.
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, Output, streamText } from "ai";
import { z } from "zod";

const provider = createOpenAI({
  baseURL: process.env.GATEWAY_BASE_URL,
  apiKey: process.env.GATEWAY_API_KEY,
});
const [kind, modelId] = process.argv.slice(2);
const chatPath = kind.startsWith("chat-");
const model = chatPath ? provider.chat(modelId) : provider(modelId);
const prompt = process.env.QUESTION ?? "How often does the contract renew?";

const Renewal = z.object({
  answer: z.string(),
  period: z.enum(["monthly", "yearly"]),
  months: z.number().int(),
  sources: z.array(z.object({ title: z.string() })),
});

const cases = {
  async generate() {
    const result = await generateText({ model, prompt, maxRetries: 0 });
    return { text: result.text, finish: result.finishReason, usage: result.usage };
  },
  async stream() {
    const errors = [];
    const result = streamText({ model, prompt, maxRetries: 0,
                                onError: ({ error }) => errors.push(String(error)) });
    let text = "", parts = 0;
    for await (const part of result.textStream) {
      text += part;
      parts += 1;
    }
    return { text, parts, finish: await result.finishReason, errors };
  },
  async object() {
    const result = await generateText({ model, prompt, maxRetries: 0,
                                        output: Output.object({ schema: Renewal }) });
    return { output: result.output, text: result.text };
  },
};

const name = chatPath ? kind.slice("chat-".length) : kind;
try {
  console.log(JSON.stringify(await cases[name]()));
} catch (error) {
  console.log(JSON.stringify({ thrown: { error: error.constructor.name, message: error.message,
                                         status: error.statusCode ?? null } }));
}
