"""The gRPC edge: servicers translate protobuf ⇄ domain and map domain errors to status codes."""
