// Print, as one JSON object {schema id: JSON schema}, the schemas that the pinned
// @kubernetes-models/keda registers for the KEDA kinds named on the command line, with every
// schema they refer to (ObjectMeta and what it uses).
//
// The package embeds KEDA's CRD schemas as plain JSON and hands each one, when a model is
// first validated, to @kubernetes-models/validate's register(id, schema).  Catching those
// calls gives the schemas exactly as the package holds them, for the Python tests to check
// with jsonschema (strict about unknown fields, which the package's own validator is not).
"use strict";

const validate = require("@kubernetes-models/validate");
const models = require("@kubernetes-models/keda/keda.sh/v1alpha1");

const registered = {};
validate.register = (id, schema) => {
  registered[id] = schema;
};

for (const kind of process.argv.slice(2)) {
  const model = models[kind];
  if (model === undefined) {
    process.stderr.write(`no KEDA model ${kind} in @kubernetes-models/keda\n`);
    process.exit(1);
  }
  // setSchema() stores the registering function under a symbol on the model's prototype.
  const addSchema = Object.getOwnPropertySymbols(model.prototype)
    .map((symbol) => model.prototype[symbol])
    .find((value) => typeof value === "function");
  addSchema();
}
process.stdout.write(JSON.stringify(registered));
