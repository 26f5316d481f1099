// The Node clients the tests drive, unchanged: the `openai` package (chat and Responses, whole and streamed)
// and the Vercel AI SDK's default OpenAI provider (which calls the Responses API): generateText, streamText
// and generateObject. Prints one JSON object of what each returned; tests/test_node_clients.py checks it.
import OpenAI from "openai";
import { createOpenAI } from "@ai-sdk/openai";
import { generateObject, generateText, streamText } from "ai";
import { z } from "zod";

const baseURL = process.env.BASE_URL + "/v1";
const question = process.env.QUESTION;
const maxTokens = Number(process.env.MAX_TOKENS);
const out = {};

const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const chat = await client.chat.completions.create({
  model: "base", messages: [{ role: "user", content: question }], max_tokens: maxTokens, temperature: 0,
});
out.chat = chat.choices[0].message.content;
const resp = await client.responses.create({ model: "base", input: question, max_output_tokens: maxTokens, temperature: 0 });
out.responses = resp.output_text;
out.responses_id = resp.id;
let streamed = "";
for await (const event of await client.responses.create({
  model: "base", input: question, max_output_tokens: maxTokens, temperature: 0, stream: true,
})) {
  if (event.type === "response.output_text.delta") streamed += event.delta;
}
out.responses_stream = streamed;

const provider = createOpenAI({ baseURL, apiKey: "unused" });
const model = provider("base");   // the default: the Responses API
const text = await generateText({ model, prompt: question, maxOutputTokens: maxTokens, temperature: 0 });
out.ai_text = text.text;
out.ai_finish = text.finishReason;
const stream = streamText({ model, prompt: question, maxOutputTokens: maxTokens, temperature: 0 });
let parts = "";
for await (const delta of stream.textStream) parts += delta;
out.ai_stream = parts;
const object = await generateObject({
  model, prompt: "Pick.", temperature: 0, maxOutputTokens: 40,
  schema: z.object({ a: z.enum(["x", "y", "z"]), b: z.boolean(), c: z.number().int() }),
});
out.ai_object = object.object;

console.log(JSON.stringify(out));
