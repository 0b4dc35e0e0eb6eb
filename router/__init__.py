"""The gRPC front door: validation, tokenization, prefix index, routing policies, worker clients."""
