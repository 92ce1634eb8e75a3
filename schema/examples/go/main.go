// A Go producer and listener for mailpool: redigo + vmihailenco/msgpack v5.
//
//	go run . produce   # enqueue one email.send message, print its entry id
//	go run . listen    # read email.receive in a consumer group, print JSON lines, XACK
//
// Environment variables as in ../produce.mjs and ../listen.mjs: REDIS_URL, SEND_STREAM,
// MAIL_FROM, MAIL_TO, SUBJECT, ATTACH_FILE (produce); RECEIVE_STREAM, GROUP, CONSUMER, START,
// COUNT (listen).  Both libraries are packaged by Debian, so it also builds without a module
// proxy (see ../README.md).
package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/gomodule/redigo/redis"
	"github.com/vmihailenco/msgpack/v5"
)

const blockMillis = 1000 // a Ctrl-C is noticed within this

func setting(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

// redisURL: REDIS_URL, else the private redis-server of a running `mailpool run` (its URL is
// in <data dir>/redis.url: $MAILPOOL_DATA_DIR, or the nearest .mailpool here or above), else
// Redis's default port on this machine.
func redisURL() string {
	if url := os.Getenv("REDIS_URL"); url != "" {
		return url
	}
	for _, file := range poolURLFiles() {
		if recorded, err := os.ReadFile(file); err == nil {
			return strings.TrimSpace(string(recorded))
		}
	}
	return "redis://127.0.0.1:6379"
}

func poolURLFiles() []string {
	if dataDir := os.Getenv("MAILPOOL_DATA_DIR"); dataDir != "" {
		return []string{filepath.Join(dataDir, "redis.url")}
	}
	dir, err := os.Getwd()
	if err != nil {
		return nil
	}
	var files []string
	for {
		files = append(files, filepath.Join(dir, ".mailpool", "redis.url"))
		parent := filepath.Dir(dir)
		if parent == dir {
			return files
		}
		dir = parent
	}
}

func main() {
	if len(os.Args) != 2 || (os.Args[1] != "produce" && os.Args[1] != "listen") {
		fmt.Fprintln(os.Stderr, "usage: go run . produce|listen")
		os.Exit(2)
	}
	// One connection, used by one goroutine: redigo connections are not shared.
	conn, err := redis.DialURL(redisURL(), redis.DialConnectTimeout(5*time.Second))
	if err != nil {
		fmt.Fprintln(os.Stderr, "redis:", err)
		os.Exit(1)
	}
	defer conn.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if os.Args[1] == "produce" {
		err = produce(conn)
	} else {
		err = listen(ctx, conn)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// Content objects are plain maps: a leaf has "body" ([]byte -> msgpack bin), a multipart
// has "parts"; never both, so no struct with omitempty fields that could drop an empty body.
func leaf(contentType string, body []byte) map[string]any {
	return map[string]any{"content-type": contentType, "body": body}
}

func multipart(contentType string, parts ...map[string]any) map[string]any {
	return map[string]any{"content-type": contentType, "parts": parts}
}

func attachment() (string, []byte, error) {
	path := os.Getenv("ATTACH_FILE")
	if path == "" {
		sample := make([]byte, 256)
		for i := range sample {
			sample[i] = byte(i)
		}
		return "sample.bin", sample, nil
	}
	body, err := os.ReadFile(path)
	return filepath.Base(path), body, err
}

func produce(conn redis.Conn) error {
	sender := setting("MAIL_FROM", "app@example.com")
	recipients := strings.Split(setting("MAIL_TO", "ann@example.org"), ",")
	for i := range recipients {
		recipients[i] = strings.TrimSpace(recipients[i])
	}
	filename, attached, err := attachment()
	if err != nil {
		return err
	}
	file := leaf("application/octet-stream", attached)
	file["filename"] = filename // mailpool writes Content-Disposition: attachment
	message := map[string]any{
		"from": sender, // envelope MAIL FROM; nil would send with the null sender <>
		"to":   recipients,
		"headers": map[string]string{
			"from": sender, "to": strings.Join(recipients, ", "),
			"subject": setting("SUBJECT", "Grüße aus Köln ✉"),
		},
		"content": multipart("multipart/mixed",
			multipart("multipart/alternative",
				leaf("text/plain; charset=utf-8", []byte("Hallo!\nDie Übersicht hängt an.\n")),
				leaf("text/html; charset=utf-8", []byte("<p>Hallo!<br>Die <b>Übersicht</b> hängt an.</p>\n")),
			),
			file,
		),
		"version": 1,
	}
	// Go strings -> msgpack str, []byte -> msgpack bin: exactly the contract's split.
	data, err := msgpack.Marshal(message)
	if err != nil {
		return err
	}
	// redigo sends a []byte argument as is (binary-safe); the entry's only field is `data`.
	id, err := redis.String(conn.Do("XADD", setting("SEND_STREAM", "email.send"), "*", "data", data))
	if err != nil {
		return err
	}
	fmt.Println(id)
	return nil
}

type entry struct {
	id   string
	data []byte // nil: no data field (an entry trimmed from the stream while pending)
}

func listen(ctx context.Context, conn redis.Conn) error {
	stream := setting("RECEIVE_STREAM", "email.receive")
	group := setting("GROUP", "go-example")
	host, _ := os.Hostname()
	consumer := setting("CONSUMER", fmt.Sprintf("go-%s-%d", host, os.Getpid()))
	limit, err := strconv.Atoi(setting("COUNT", "0")) // 0: run until interrupted
	if err != nil {
		return fmt.Errorf("COUNT: %w", err)
	}
	_, err = conn.Do("XGROUP", "CREATE", stream, group, setting("START", "$"), "MKSTREAM")
	if err != nil && !strings.HasPrefix(err.Error(), "BUSYGROUP") {
		return err // BUSYGROUP: the group exists and keeps its position
	}
	// First our own pending entries (id 0: read before, never acknowledged), then new ones.
	cursor, handled := "0", 0
	for (limit == 0 || handled < limit) && ctx.Err() == nil {
		count := 100
		if limit > 0 && limit-handled < count {
			count = limit - handled
		}
		args := []any{"GROUP", group, consumer, "COUNT", count}
		if cursor == ">" {
			args = append(args, "BLOCK", blockMillis)
		}
		entries, err := streamEntries(conn.Do("XREADGROUP", append(args, "STREAMS", stream, cursor)...))
		if err != nil {
			return err
		}
		if cursor == "0" && len(entries) == 0 {
			cursor = ">"
			continue
		}
		for _, e := range entries {
			printEntry(e)
			if _, err := conn.Do("XACK", stream, group, e.id); err != nil {
				return err
			}
			handled++
		}
	}
	return nil
}

// streamEntries reads an XREADGROUP reply of one stream: [[name, [[id, [field, value, ...]]]]];
// nil when BLOCK timed out with nothing new.
func streamEntries(reply any, err error) ([]entry, error) {
	streams, err := redis.Values(reply, err)
	if errors.Is(err, redis.ErrNil) {
		return nil, nil
	}
	if err != nil || len(streams) == 0 {
		return nil, err
	}
	stream, err := redis.Values(streams[0], nil)
	if err != nil || len(stream) != 2 {
		return nil, fmt.Errorf("unexpected XREADGROUP reply: %v", err)
	}
	items, err := redis.Values(stream[1], nil)
	if err != nil {
		return nil, err
	}
	entries := make([]entry, 0, len(items))
	for _, item := range items {
		pair, err := redis.Values(item, nil)
		if err != nil || len(pair) != 2 {
			return nil, fmt.Errorf("unexpected stream entry: %v", err)
		}
		id, err := redis.String(pair[0], nil)
		if err != nil {
			return nil, err
		}
		// Values are bulk strings: redigo hands them over as []byte, octet for octet.
		fields, _ := redis.ByteSlices(pair[1], nil)
		e := entry{id: id}
		for i := 0; i+1 < len(fields); i += 2 {
			if string(fields[i]) == "data" {
				e.data = fields[i+1]
			}
		}
		entries = append(entries, e)
	}
	return entries, nil
}

func printEntry(e entry) {
	var message map[string]any
	// Maps decode to map[string]any, msgpack str to string, bin to []byte.
	if err := msgpack.Unmarshal(e.data, &message); err != nil || message == nil {
		fmt.Fprintf(os.Stderr, "%s: cannot decode: %v\n", e.id, err)
		return
	}
	message["entry_id"] = e.id
	if content, ok := message["content"].(map[string]any); ok {
		textBodies(content)
	}
	// encoding/json writes the remaining []byte (attachments, raw) as base64.
	out := json.NewEncoder(os.Stdout)
	out.SetEscapeHTML(false) // keep <addresses> readable
	if err := out.Encode(message); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", e.id, err)
	}
}

// textBodies turns UTF-8/ASCII text/* bodies into strings, the rest stays base64.
func textBodies(content map[string]any) {
	if parts, ok := content["parts"].([]any); ok {
		for _, part := range parts {
			if child, ok := part.(map[string]any); ok {
				textBodies(child)
			}
		}
		return
	}
	body, _ := content["body"].([]byte)
	contentType, _ := content["content-type"].(string)
	lower := strings.ToLower(contentType)
	isText := contentType == "" || strings.HasPrefix(lower, "text/") &&
		(strings.Contains(lower, "utf-8") || strings.Contains(lower, "us-ascii"))
	if isText && utf8.Valid(body) {
		content["body"], content["body_encoding"] = string(body), "text"
	} else {
		content["body"], content["body_encoding"] = base64.StdEncoding.EncodeToString(body), "base64"
	}
}
