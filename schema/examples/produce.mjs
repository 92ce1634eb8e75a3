// Enqueue one email.send message from Node.js: npm `redis` (node-redis 5) + `@msgpack/msgpack`.
//
//   REDIS_URL=redis://127.0.0.1:6379 MAIL_TO=ann@example.org node produce.mjs
//
// The message: a UTF-8 subject, a text and an HTML alternative, and one binary attachment.
// Everything is configured by environment variables (all optional):
//   REDIS_URL    redis://[user:pass@]host:port[/db]   (default: the running `mailpool run`'s
//                private Redis from .mailpool/redis.url, else redis://127.0.0.1:6379)
//   SEND_STREAM  the send stream                               (default email.send)
//   MAIL_FROM    envelope sender and From: field               (default app@example.com)
//   MAIL_TO      recipients, comma-separated                   (default ann@example.org)
//   SUBJECT      the Subject: field, any Unicode               (default "Grüße aus Köln ✉")
//   ATTACH_FILE  a file to attach; its base name is the filename (default: 256 sample bytes)
// Prints the new entry id: delivery outcomes in email.send.events carry it as `source_id`.
import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { encode } from "@msgpack/msgpack";
import { createClient } from "redis";
import { redisUrl } from "./pool-url.mjs";

const env = process.env;
const stream = env.SEND_STREAM ?? "email.send";
const sender = env.MAIL_FROM ?? "app@example.com";
const recipients = (env.MAIL_TO ?? "ann@example.org").split(",").map((a) => a.trim());
const subject = env.SUBJECT ?? "Grüße aus Köln ✉";

// Bodies are octets: a Uint8Array (or Buffer) becomes msgpack bin, a JS string msgpack str.
const utf8 = (text) => new TextEncoder().encode(text);

function attachment() {
  if (env.ATTACH_FILE) {
    return { filename: basename(env.ATTACH_FILE), bytes: new Uint8Array(readFileSync(env.ATTACH_FILE)) };
  }
  return { filename: "sample.bin", bytes: Uint8Array.from({ length: 256 }, (_, i) => i) };
}

function buildMessage() {
  const file = attachment();
  return {
    from: sender, // envelope MAIL FROM; null would send with the null sender <>
    to: recipients, // envelope RCPT TO
    headers: { from: sender, to: recipients.join(", "), subject },
    content: {
      "content-type": "multipart/mixed", // no boundary needed: mailpool picks one
      parts: [
        {
          "content-type": "multipart/alternative",
          parts: [
            { "content-type": "text/plain; charset=utf-8", body: utf8("Hallo!\nDie Übersicht hängt an.\n") },
            { "content-type": "text/html; charset=utf-8", body: utf8("<p>Hallo!<br>Die <b>Übersicht</b> hängt an.</p>\n") },
          ],
        },
        // filename: mailpool writes Content-Disposition: attachment (RFC 2231 when not ASCII)
        { "content-type": "application/octet-stream", filename: file.filename, body: file.bytes },
      ],
    },
    version: 1,
  };
}

// A one-shot script: fail at once when Redis is not there (a long-running producer would keep
// node-redis's default, reconnecting and queueing commands meanwhile).
const client = createClient({ url: redisUrl(), socket: { reconnectStrategy: false } });
client.on("error", () => {}); // the rejected connect() or command reports it
await client.connect();
try {
  const packed = encode(buildMessage());
  // node-redis sends a Buffer as is (binary-safe); the entry's only field is `data`.
  const data = Buffer.from(packed.buffer, packed.byteOffset, packed.byteLength);
  const entryId = await client.xAdd(stream, "*", { data });
  console.log(entryId);
} finally {
  await client.close();
}
