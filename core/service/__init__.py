"""The grpc.aio service: interceptors, servicers and server assembly."""
