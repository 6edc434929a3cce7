"""Library behind the pipeline stages: config, data, models, losses, trainers, tracking."""
