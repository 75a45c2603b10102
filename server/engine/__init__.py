"""The engine: the scheduler thread, requests as sequences, sampling, stopping, detokenizing; no gRPC."""
