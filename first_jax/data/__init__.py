"""Data: registry assets, example sources, the tokenizer, batches and the top-k store.
Imports runtime and core."""
