// bench/ingest.py's Haraka: accept every recipient, then discard the message (no queue).
exports.hook_rcpt = function (next) {
  next(OK)
}
exports.hook_queue = function (next) {
  next(OK)
}
