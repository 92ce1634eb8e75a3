// A Go producer and listener for mailpool: go-redis v9 + vmihailenco/msgpack v5.
//
//	go run . produce   # enqueue one email.send message, print its entry id
//	go run . listen    # read email.receive in a consumer group, print JSON lines, XACK
//
// Environment variables as in ../produce.mjs and ../listen.mjs: REDIS_URL, SEND_STREAM,
// MAIL_FROM, MAIL_TO, SUBJECT, ATTACH_FILE (produce); RECEIVE_STREAM, GROUP, CONSUMER, START,
// COUNT (listen).
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

	"github.com/redis/go-redis/v9"
	"github.com/vmihailenco/msgpack/v5"
)

func setting(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

func main() {
	if len(os.Args) != 2 || (os.Args[1] != "produce" && os.Args[1] != "listen") {
		fmt.Fprintln(os.Stderr, "usage: go run . produce|listen")
		os.Exit(2)
	}
	options, err := redis.ParseURL(setting("REDIS_URL", "redis://127.0.0.1:6379"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "REDIS_URL:", err)
		os.Exit(2)
	}
	client := redis.NewClient(options)
	defer client.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if os.Args[1] == "produce" {
		err = produce(ctx, client)
	} else {
		err = listen(ctx, client)
	}
	if err != nil && !errors.Is(err, context.Canceled) {
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

func produce(ctx context.Context, client *redis.Client) error {
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
	id, err := client.XAdd(ctx, &redis.XAddArgs{
		Stream: setting("SEND_STREAM", "email.send"),
		Values: map[string]any{"data": data},
	}).Result()
	if err != nil {
		return err
	}
	fmt.Println(id)
	return nil
}

func listen(ctx context.Context, client *redis.Client) error {
	stream := setting("RECEIVE_STREAM", "email.receive")
	group := setting("GROUP", "go-example")
	host, _ := os.Hostname()
	consumer := setting("CONSUMER", fmt.Sprintf("go-%s-%d", host, os.Getpid()))
	limit, err := strconv.Atoi(setting("COUNT", "0")) // 0: run until interrupted
	if err != nil {
		return fmt.Errorf("COUNT: %w", err)
	}
	err = client.XGroupCreateMkStream(ctx, stream, group, setting("START", "$")).Err()
	if err != nil && !strings.HasPrefix(err.Error(), "BUSYGROUP") {
		return err // BUSYGROUP: the group exists and keeps its position
	}
	// First our own pending entries (id 0: read before, never acknowledged), then new ones.
	cursor, handled := "0", 0
	for limit == 0 || handled < limit {
		args := &redis.XReadGroupArgs{
			Group: group, Consumer: consumer, Streams: []string{stream, cursor},
			Count: 100, Block: time.Second,
		}
		if cursor == "0" {
			args.Block = -1 // go-redis: negative = no BLOCK; 0 would block forever
		}
		streams, err := client.XReadGroup(ctx, args).Result()
		if errors.Is(err, redis.Nil) { // BLOCK timed out with nothing new
			continue
		}
		if err != nil {
			return err
		}
		if cursor == "0" && len(streams[0].Messages) == 0 {
			cursor = ">"
			continue
		}
		for _, entry := range streams[0].Messages {
			printEntry(entry)
			if err := client.XAck(ctx, stream, group, entry.ID).Err(); err != nil {
				return err
			}
			handled++
		}
	}
	return nil
}

func printEntry(entry redis.XMessage) {
	data, _ := entry.Values["data"].(string) // go-redis hands bulk strings over as string
	var message map[string]any
	// Maps decode to map[string]any, msgpack str to string, bin to []byte.
	if err := msgpack.Unmarshal([]byte(data), &message); err != nil {
		fmt.Fprintf(os.Stderr, "%s: cannot decode: %v\n", entry.ID, err)
		return
	}
	message["entry_id"] = entry.ID
	if content, ok := message["content"].(map[string]any); ok {
		textBodies(content)
	}
	// encoding/json writes the remaining []byte (attachments, raw) as base64.
	out := json.NewEncoder(os.Stdout)
	out.SetEscapeHTML(false) // keep <addresses> readable
	if err := out.Encode(message); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", entry.ID, err)
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
