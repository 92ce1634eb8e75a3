# Enqueue one email.send message from Ruby: gems `redis` (4.8 or 5) and `msgpack`.
#
#   REDIS_URL=redis://127.0.0.1:6379 MAIL_TO=ann@example.org ruby produce.rb
#
# The message: a UTF-8 subject, a text and an HTML alternative, and one binary attachment.
# Environment variables (all optional), as in produce.mjs:
#   REDIS_URL    redis://[user:pass@]host:port[/db]   (default: the running `mailpool run`'s
#                private Redis from .mailpool/redis.url, else redis://127.0.0.1:6379)
#   SEND_STREAM  the send stream                               (default email.send)
#   MAIL_FROM    envelope sender and From: field               (default app@example.com)
#   MAIL_TO      recipients, comma-separated                   (default ann@example.org)
#   SUBJECT      the Subject: field, any Unicode               (default "Grüße aus Köln ✉")
#   ATTACH_FILE  a file to attach; its base name is the filename (default: 256 sample bytes)
# Prints the new entry id: delivery outcomes in email.send.events carry it as `source_id`.
require "msgpack"
require "pathname"
require "redis"

# msgpack-ruby writes a String by its encoding: UTF-8 -> msgpack str, BINARY
# (ASCII-8BIT, what String#b and File.binread give) -> msgpack bin.  Bodies must be bin.
def utf8_octets(text)
  text.encode("UTF-8").b
end

# Environment strings come in the locale's encoding (US-ASCII under LANG=C): take them as UTF-8.
def setting(name, default)
  value = ENV[name]
  value.nil? || value.empty? ? default : value.dup.force_encoding("UTF-8")
end

# REDIS_URL, else the private redis-server of a running `mailpool run` (its URL is in
# <data dir>/redis.url: $MAILPOOL_DATA_DIR, or the nearest .mailpool here or above), else
# Redis's default port on this machine.
def redis_url
  explicit = setting("REDIS_URL", nil)
  return explicit if explicit

  data_dir = setting("MAILPOOL_DATA_DIR", nil)
  files = if data_dir
            [File.join(data_dir, "redis.url")]
          else
            Pathname.pwd.ascend.map { |dir| (dir + ".mailpool" + "redis.url").to_s }
          end
  recorded = files.find { |path| File.file?(path) }
  recorded ? File.read(recorded).strip : "redis://127.0.0.1:6379"
end

def attachment
  path = setting("ATTACH_FILE", nil)
  return ["sample.bin", (0..255).to_a.pack("C*")] unless path

  [File.basename(path), File.binread(path)]
end

sender = setting("MAIL_FROM", "app@example.com")
recipients = setting("MAIL_TO", "ann@example.org").split(",").map(&:strip)
subject = setting("SUBJECT", "Grüße aus Köln ✉")
filename, attachment_bytes = attachment

message = {
  "from" => sender, # envelope MAIL FROM; nil would send with the null sender <>
  "to" => recipients, # envelope RCPT TO
  "headers" => { "from" => sender, "to" => recipients.join(", "), "subject" => subject },
  "content" => {
    "content-type" => "multipart/mixed", # no boundary needed: mailpool picks one
    "parts" => [
      {
        "content-type" => "multipart/alternative",
        "parts" => [
          { "content-type" => "text/plain; charset=utf-8",
            "body" => utf8_octets("Hallo!\nDie Übersicht hängt an.\n") },
          { "content-type" => "text/html; charset=utf-8",
            "body" => utf8_octets("<p>Hallo!<br>Die <b>Übersicht</b> hängt an.</p>\n") },
        ],
      },
      # filename: mailpool writes Content-Disposition: attachment (RFC 2231 when not ASCII)
      { "content-type" => "application/octet-stream", "filename" => filename,
        "body" => attachment_bytes },
    ],
  },
  "version" => 1,
}

redis = Redis.new(url: redis_url)
# The entry's only field is `data`; redis-rb sends the binary String as is.
puts redis.xadd(setting("SEND_STREAM", "email.send"), { "data" => MessagePack.pack(message) })
redis.close
