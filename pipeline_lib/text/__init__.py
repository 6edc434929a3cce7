"""The text track's data layer: corpus sources, the train/val split, tokenizers and the prepared token store."""
