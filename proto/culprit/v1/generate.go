// Package culpritv1 is culprit's gRPC API, generated from diagnostics.proto.
package culpritv1

//go:generate sh -c "protoc -I. -I/usr/include --plugin=protoc-gen-go=$(go tool -n protoc-gen-go) --plugin=protoc-gen-go-grpc=$(go tool -n protoc-gen-go-grpc) --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative diagnostics.proto"
