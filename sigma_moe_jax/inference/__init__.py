"""A trained model used: loading a run (`load`), generation with a KV cache, scoring."""
