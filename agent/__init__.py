"""The agent: what a model's blocks are worth, and which to keep.

What the operator loads, with no training code: the profile record
(`profile`), the quality estimate (`quality`), the policies (`policy`, and
the RL agent's serving half `rl.policy`) and the registry naming them all
(`registry`). What runs offline: the corpus, perplexity, profiling (GSI) and
the RL agent's training (`rl.training`).
"""
