// A second implementation of mailpool's wire format: read every golden vector with
// @msgpack/msgpack and print its JSON twin, so tests/test_schema_node.py can compare it with
// the twins Python wrote.  Usage: node decode.mjs <schema/vectors directory>
//
// Prints one JSON object:
//   twins:        {name: JSON twin of name.msgpack}  (bin -> {"$bin": base64})
//   reencoded:    {name: true when encoding the twin gives back the vector's exact bytes}
//   decode_errors: names of invalid/*.msgpack this decoder refuses outright
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { decode, encode } from "@msgpack/msgpack";

function toTwin(value) {
  if (value instanceof Uint8Array) {
    return { $bin: Buffer.from(value).toString("base64") };
  }
  if (Array.isArray(value)) {
    return value.map(toTwin);
  }
  if (value !== null && typeof value === "object") {
    const twin = {};
    for (const [key, item] of Object.entries(value)) {
      twin[key] = toTwin(item);
    }
    return twin;
  }
  if (value === null || typeof value === "string" || typeof value === "number") {
    return value;
  }
  throw new TypeError(`no JSON twin for ${typeof value}`);
}

function fromTwin(value) {
  if (Array.isArray(value)) {
    return value.map(fromTwin);
  }
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value);
    if (keys.length === 1 && keys[0] === "$bin") {
      return new Uint8Array(Buffer.from(value.$bin, "base64"));
    }
    const plain = {};
    for (const [key, item] of Object.entries(value)) {
      plain[key] = fromTwin(item);
    }
    return plain;
  }
  return value;
}

function msgpackNames(directory) {
  return readdirSync(directory)
    .filter((file) => file.endsWith(".msgpack"))
    .map((file) => file.slice(0, -".msgpack".length))
    .sort();
}

function sameBytes(left, right) {
  return Buffer.compare(Buffer.from(left), Buffer.from(right)) === 0;
}

const directory = process.argv[2];
if (!directory) {
  console.error("usage: node decode.mjs <vector directory>");
  process.exit(2);
}

const result = { twins: {}, reencoded: {}, decode_errors: [] };
for (const name of msgpackNames(directory)) {
  const data = readFileSync(join(directory, `${name}.msgpack`));
  const twin = toTwin(decode(data));
  result.twins[name] = twin;
  result.reencoded[name] = sameBytes(encode(fromTwin(twin)), data);
}
const invalidDirectory = join(directory, "invalid");
for (const name of msgpackNames(invalidDirectory)) {
  try {
    decode(readFileSync(join(invalidDirectory, `${name}.msgpack`)));
  } catch {
    result.decode_errors.push(name);
  }
}
process.stdout.write(`${JSON.stringify(result)}\n`);
