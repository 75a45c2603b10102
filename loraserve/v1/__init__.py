"""Generated code for the loraserve.v1 contract (see protos/ and scripts/generate_protos.py)."""
