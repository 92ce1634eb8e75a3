// mailauth (an independent DKIM implementation) for mailpool's DKIM tests, with every DNS
// question sent to the test's own DNS server.
//   node dkim.mjs verify HOST:PORT < message       -> JSON: one result per DKIM-Signature
//   node dkim.mjs sign KEY.pem DOMAIN SELECTOR < message -> the message with a signature
//   node dkim.mjs seal KEY.pem DOMAIN SELECTOR AUTHRES CV < message -> with an ARC set
import { readFileSync } from 'node:fs';
import { Resolver } from 'node:dns/promises';
import { dkimVerify } from 'mailauth/lib/dkim/verify.js';
import { dkimSign } from 'mailauth/lib/dkim/sign.js';
import { sealMessage } from 'mailauth/lib/arc/index.js';

const message = readFileSync(0);
const [command, ...args] = process.argv.slice(2);
// The signing time, read once. Without it mailauth reads the clock for t= twice, once for
// the field it signs and once for the field it writes (lib/tools.js,
// formatSignatureHeaderLine, t: Math.round(Date.now() / 1000)): when the half second turns
// between the two (an RSA signature on a loaded machine), the written t= is not the signed
// one and the signature fails. That failed CI twice.
const signTime = new Date();

if (command === 'verify') {
  const resolver = new Resolver({ timeout: 2000, tries: 1 });
  resolver.setServers([args[0]]);
  const verdict = await dkimVerify(message, { resolver: (name, type) => resolver.resolve(name, type) });
  const results = verdict.results.map((r) => ({
    result: r.status.result,
    comment: r.status.comment || null,
    domain: r.signingDomain || null,
    selector: r.selector || null,
    algorithm: r.algo || null,
    aligned: r.status.aligned || null,
  }));
  process.stdout.write(JSON.stringify(results));
} else if (command === 'sign') {
  const [keyPath, domain, selector] = args;
  const signed = await dkimSign(message, {
    canonicalization: 'relaxed/relaxed',
    signTime,
    signatureData: [{ signingDomain: domain, selector, privateKey: readFileSync(keyPath) }],
  });
  if (signed.errors.length) {
    process.stderr.write(JSON.stringify(signed.errors));
    process.exit(1);
  }
  process.stdout.write(Buffer.concat([Buffer.from(signed.signatures), message]));
} else if (command === 'seal') {
  // An ARC set (RFC 8617) on top of the message, as a forwarding hop adds it.
  const [keyPath, domain, selector, authResults, cv] = args;
  const seal = await sealMessage(message, {
    signingDomain: domain, selector, privateKey: readFileSync(keyPath), authResults, cv, signTime,
  });
  process.stdout.write(Buffer.concat([seal, message]));
} else {
  process.stderr.write('usage: dkim.mjs verify HOST:PORT | sign KEY DOMAIN SELECTOR | seal KEY DOMAIN SELECTOR AUTHRES CV\n');
  process.exit(2);
}
