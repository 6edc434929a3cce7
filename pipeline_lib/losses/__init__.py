"""Training losses as pure functions: tensors and keyword-only hyperparameters in, a scalar tensor out."""
