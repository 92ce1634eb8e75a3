module example.com/mailpool-examples

go 1.21

require (
	github.com/redis/go-redis/v9 v9.7.0
	github.com/vmihailenco/msgpack/v5 v5.4.1
)
