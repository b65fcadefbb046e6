"""The Open Inference Protocol (KServe "v2", Triton): REST and gRPC front-ends over the service.

``dataplane`` holds the protocol's logic and calls the service core; ``codec`` reads and writes
the REST wire format (JSON tensors and the binary tensor data extension); ``rest`` and
``grpc_server`` only convert requests and answers. ``generated`` holds the gRPC stubs, imported
only when the gRPC server starts (tritonclient registers the same protobuf names).
"""
