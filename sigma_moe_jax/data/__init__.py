"""Text in: the grain pipelines with packing (`pipeline`), tokenizers, chat conversations."""
