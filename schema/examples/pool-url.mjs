// Which Redis the Node.js examples talk to: REDIS_URL when set, else the private redis-server
// of a running `mailpool run` (its URL is in <data dir>/redis.url: $MAILPOOL_DATA_DIR, or the
// nearest .mailpool directory here or above, as a clone's `make run` makes it), else Redis's
// default port on this machine.  Empty variables count as unset.
import { readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";

export const DEFAULT_REDIS_URL = "redis://127.0.0.1:6379";

function* poolUrlFiles(env) {
  if (env.MAILPOOL_DATA_DIR) {
    yield join(env.MAILPOOL_DATA_DIR, "redis.url");
    return;
  }
  for (let dir = resolve("."); ; dir = dirname(dir)) {
    yield join(dir, ".mailpool", "redis.url");
    if (dirname(dir) === dir) return;
  }
}

export function redisUrl(env = process.env) {
  if (env.REDIS_URL) return env.REDIS_URL;
  for (const file of poolUrlFiles(env)) {
    try {
      return readFileSync(file, "utf8").trim();
    } catch {
      // no pool recorded here: look further up
    }
  }
  return DEFAULT_REDIS_URL;
}
