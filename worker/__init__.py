"""The worker: an elastic Llama model that can drop and restore transformer
blocks at runtime, its KV cache, memory accounting and text generation."""
