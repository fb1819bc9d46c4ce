"""The elastic model: a Llama whose 2L blocks follow a pruning plan that can
change between decode steps, its KV cache, the memory model every part of
the system shares, live memory accounting, text generation and the local
model cache. Imports nothing from adapters or serving."""
