"""Model runners (a protocol and a registry by model_type), the paged KV cache, batched LoRA, CUDA graphs, loading."""
