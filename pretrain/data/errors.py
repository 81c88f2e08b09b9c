"""The one exception the data layer raises for bad input: a single line naming the shard, path or setting."""


class DataError(Exception):
    """Bad data input (missing path, corrupt shard, mismatched manifest or tokenizer); message is one line."""
