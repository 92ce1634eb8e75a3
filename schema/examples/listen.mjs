// Listen to email.receive from Node.js in a consumer group: npm `redis` (node-redis 5) +
// `@msgpack/msgpack`.  Prints each message as one JSON line, then acknowledges it.
//
//   REDIS_URL=redis://127.0.0.1:6379 GROUP=billing node listen.mjs
//
// Environment variables (all optional):
//   REDIS_URL       redis://[user:pass@]host:port[/db] (default: the running `mailpool run`'s
//                   private Redis from .mailpool/redis.url, else redis://127.0.0.1:6379)
//   RECEIVE_STREAM  the receive stream                         (default email.receive)
//   GROUP           your application's consumer group          (default node-example)
//   CONSUMER        this process's name in the group           (default node-<pid>)
//   START           where a NEW group starts: $ = new messages only, 0 = all history (default $)
//   COUNT           exit after this many messages              (default: run until Ctrl-C)
//
// Every group sees every message; the consumers of one group share them.  A message is
// acknowledged (XACK) only after it was handled, so one that was read but not handled stays
// pending: a restart under the same CONSUMER name reads its own pending entries first.
import { hostname } from "node:os";
import { decode } from "@msgpack/msgpack";
import { createClient, RESP_TYPES } from "redis";
import { redisUrl } from "./pool-url.mjs";

const env = process.env;
const stream = env.RECEIVE_STREAM ?? "email.receive";
const group = env.GROUP ?? "node-example";
const consumer = env.CONSUMER ?? `node-${hostname()}-${process.pid}`;
const start = env.START ?? "$";
const limit = env.COUNT ? Number(env.COUNT) : Infinity;
const BLOCK_MS = 1000; // a Ctrl-C is noticed within this

// Bodies as text where they are text (text/* in a charset Node knows), base64 otherwise: the
// same convention as `mailpool listen`.  No charset parameter: read as UTF-8, as mailpool does
// (a superset of the us-ascii default that also fits the many senders that omit it).
function charsetOf(contentType) {
  const match = /;\s*charset\s*=\s*"?([^";\s]+)"?/i.exec(contentType);
  return match ? match[1].toLowerCase() : "utf-8";
}

function decodeText(charset, body) {
  // WHATWG's TextDecoder reads the label us-ascii as windows-1252: check ASCII ourselves
  if (["us-ascii", "ascii"].includes(charset)) {
    if (body.some((octet) => octet > 0x7f)) throw new RangeError("not ASCII");
    charset = "utf-8";
  }
  return new TextDecoder(charset, { fatal: true, ignoreBOM: true }).decode(body);
}

function bodyToJson(contentType, body) {
  if (/^\s*text\//i.test(contentType)) {
    try {
      return { body: decodeText(charsetOf(contentType), body), body_encoding: "text" };
    } catch {
      // unknown charset or octets that do not decode: keep them exact, as base64
    }
  }
  return { body: Buffer.from(body).toString("base64"), body_encoding: "base64" };
}

function contentToJson(content) {
  const out = {};
  const contentType = content["content-type"] ?? "text/plain; charset=us-ascii";
  for (const [key, value] of Object.entries(content)) {
    if (key === "parts") {
      out.parts = value.map(contentToJson);
    } else if (key === "body") {
      Object.assign(out, bodyToJson(contentType, value));
    } else {
      out[key] = value;
    }
  }
  return out;
}

function messageToJson(entryId, message) {
  const out = { entry_id: entryId };
  for (const [key, value] of Object.entries(message)) {
    if (key === "content") {
      out.content = contentToJson(value);
    } else if (value instanceof Uint8Array) {
      out[key] = Buffer.from(value).toString("base64"); // `raw`: the message as received
    } else {
      out[key] = value;
    }
  }
  return JSON.stringify(out);
}

const client = createClient({ url: redisUrl() });
client.on("error", (error) => console.error("redis:", error.message));
await client.connect();
// Entry fields are octets (msgpack): read replies as Buffers, not as UTF-8 strings.
const binary = client.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer });

try {
  await client.xGroupCreate(stream, group, start, { MKSTREAM: true });
} catch (error) {
  if (!String(error.message).startsWith("BUSYGROUP")) throw error; // the group exists: keep its position
}

let stopping = false;
process.on("SIGINT", () => (stopping = true));
process.on("SIGTERM", () => (stopping = true));

// First our own pending entries (id 0: read before, never acknowledged), then new ones (>).
let cursor = "0";
let handled = 0;
try {
  while (!stopping && handled < limit) {
    const count = Math.min(100, limit - handled);
    const options = cursor === ">" ? { COUNT: count, BLOCK: BLOCK_MS } : { COUNT: count };
    const reply = await binary.xReadGroup(group, consumer, { key: stream, id: cursor }, options);
    const entries = reply?.[0]?.messages ?? [];
    if (cursor === "0" && entries.length === 0) {
      cursor = ">";
      continue;
    }
    for (const { id, message: fields } of entries) {
      const entryId = id.toString();
      try {
        console.log(messageToJson(entryId, decode(fields.data)));
      } catch (error) {
        // not msgpack, or trimmed from the stream while pending (no fields): report and move
        // on, or it would come back first on every restart
        console.error(`${entryId}: cannot decode: ${error.message}`);
      }
      await client.xAck(stream, group, entryId);
      handled += 1;
    }
  }
} finally {
  await client.close();
}
