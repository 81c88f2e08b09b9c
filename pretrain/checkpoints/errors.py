"""The one exception checkpoint import and export raise for a file they will not read or write."""


class CheckpointError(ValueError):
    """A released checkpoint we refuse (missing shard, shape against config.json, unsupported setting or GGUF
    architecture, tokenizer larger than the model's vocabulary). The message is one line naming the file and
    the field or tensor."""
