"""Training losses as pure functions: tensors and keyword-only hyperparameters in, a scalar tensor out
(GRPO's also returns its detached statistics beside the loss)."""
