"""Fine-tune LoRA adapters that loraserve serves."""
