module example.com/mailpool-examples

go 1.19

require (
	github.com/gomodule/redigo v1.8.3
	github.com/vmihailenco/msgpack/v5 v5.3.5
)
