// openai-node against the gateway: `node openai_client.mjs <case> <model>` prints one JSON
// object of what the client saw. Driven by tests/test_node_clients.py.
import OpenAI from "openai";
import { zodResponseFormat } from "openai/helpers/zod";
import { z } from "zod";

const client = new OpenAI({
  baseURL: process.env.GATEWAY_BASE_URL,
  apiKey: process.env.GATEWAY_API_KEY,
  maxRetries: 0,
});
const [kind, model] = process.argv.slice(2);
const question = process.env.QUESTION ?? "How often does the contract renew?";
const messages = [{ role: "user", content: question }];

const Renewal = z.object({
  answer: z.string(),
  period: z.enum(["monthly", "yearly"]),
  months: z.number().int(),
  sources: z.array(z.object({ title: z.string() })),
});

function failure(error) {
  return {
    error: error.constructor.name,
    status: error.status ?? null,
    notFound: error instanceof OpenAI.NotFoundError,
    message: error.message,
  };
}

const cases = {
  async chat() {
    const completion = await client.chat.completions.create({ model, messages });
    const choice = completion.choices[0];
    return { content: choice.message.content, finish: choice.finish_reason,
             model: completion.model, usage: completion.usage };
  },
  async "chat-stream"() {
    const stream = await client.chat.completions.create({
      model, messages, stream: true, stream_options: { include_usage: true } });
    let content = "", chunks = 0, finish = null, usage = null;
    for await (const chunk of stream) {
      chunks += 1;
      if (chunk.choices.length) {
        content += chunk.choices[0].delta.content ?? "";
        finish = chunk.choices[0].finish_reason ?? finish;
      }
      usage = chunk.usage ?? usage;
    }
    return { content, chunks, finish, usage };
  },
  async models() {
    const listed = [];
    for await (const m of client.models.list()) listed.push(m.id);
    const found = await client.models.retrieve(model);
    let missing;
    try {
      missing = await client.models.retrieve("no-such-model");
    } catch (error) {
      missing = failure(error);
    }
    return { listed, retrieved: { id: found.id, object: found.object }, missing };
  },
  async "chat-json-schema"() {
    const completion = await client.chat.completions.parse({
      model, messages, response_format: zodResponseFormat(Renewal, "renewal") });
    const message = completion.choices[0].message;
    return { parsed: message.parsed, content: message.content };
  },
  async "chat-json-schema-stream"() {
    const stream = client.chat.completions.stream({
      model, messages, response_format: zodResponseFormat(Renewal, "renewal") });
    let deltas = 0;
    stream.on("content.delta", () => { deltas += 1; });
    const completion = await stream.finalChatCompletion();
    return { parsed: completion.choices[0].message.parsed, deltas };
  },
  async responses() {
    const response = await client.responses.create({ model, input: question });
    return { text: response.output_text, status: response.status, object: response.object,
             usage: response.usage };
  },
  async "responses-stream"() {
    const stream = await client.responses.create({ model, input: question, stream: true });
    const types = [];
    let text = "", completed = null;
    for await (const event of stream) {
      types.push(event.type);
      if (event.type === "response.output_text.delta") text += event.delta;
      if (event.type === "response.completed") completed = event.response;
    }
    // `output_text` is the SDK's own convenience on non-streamed responses only
    const completedText = (completed?.output ?? [])
      .filter((item) => item.type === "message")
      .flatMap((item) => item.content)
      .filter((part) => part.type === "output_text")
      .map((part) => part.text)
      .join("");
    return { text, types, status: completed?.status ?? null, completedText,
             usage: completed?.usage ?? null };
  },
};

try {
  console.log(JSON.stringify(await cases[kind]()));
} catch (error) {
  console.log(JSON.stringify({ thrown: failure(error) }));
}
