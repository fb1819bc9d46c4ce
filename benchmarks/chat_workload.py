"""What the speed benchmarks ask, and how they ask transformers: one list
of chat questions and one greedy `generate` call on a left-padded batch, so
every benchmark puts the same work to the peer.

torch is imported inside the function: worker_speed's client processes
import the questions and need no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a child.",
    "List three uses of copper.",
    "Why do cats purr?",
    "Summarise the plot of Hamlet in one sentence.",
    "What is a prime number?",
    "Give me a tip for learning Python.",
    "How do bees make honey?",
    "What causes the seasons?",
    "Name a famous painting and its painter.",
    "Why is the sky blue?",
]
# SmolLM2's end-of-sequence id, which transformers pads with.
PAD_TOKEN_ID = 2


def hf_greedy(
    model: LlamaForCausalLM, prompts: list[list[int]], new_tokens: int, streamer: Any = None
) -> Any:
    """Exactly `new_tokens` greedy tokens for every prompt, batched and
    left-padded as transformers expects for generation."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=PAD_TOKEN_ID,
            streamer=streamer,
        )
