"""The OpenAI-compatible HTTP API, served beside gRPC on the same engine."""
