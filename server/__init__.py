"""The gRPC side of loraserve: servicer, engine and model runner."""
