"""Declared rewards for RL post-training: pure rule functions of (action, label), never learned."""
