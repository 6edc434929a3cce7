"""RL post-training of a classifier: the policy built from the finetuned model, and its decisions."""
