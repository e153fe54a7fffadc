// An agent on Node 20 with the official `openai` npm package, pointed at the gateway by
// its base URL (Node's fetch ignores HTTPS_PROXY). Usage:
//   node agent.mjs BASE_URL PROMPT plain|stream     (OPENAI_API_KEY: the gateway token)
// Prints the completion's text; on an API error prints its message to stderr, exit 1.
import OpenAI from "openai";

const [baseURL, prompt, mode] = process.argv.slice(2);
const client = new OpenAI({ baseURL, maxRetries: 0 });
const messages = [{ role: "user", content: prompt }];
try {
  if (mode === "stream") {
    let text = "";
    for await (const chunk of await client.chat.completions.create({ model: "m", messages, stream: true })) {
      text += chunk.choices[0]?.delta?.content ?? "";
    }
    process.stdout.write(text);
  } else {
    const completion = await client.chat.completions.create({ model: "m", messages });
    process.stdout.write(completion.choices[0].message.content);
  }
} catch (error) {
  process.stderr.write(`${error.constructor.name}: ${error.message}\n`);
  process.exit(1);
}
