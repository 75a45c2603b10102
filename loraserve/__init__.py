"""loraserve: a gRPC inference server for LoRA-adapted LLaMA-family models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loraserve")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"
