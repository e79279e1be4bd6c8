"""The one exception type fastmnist raises for bad input, bad shards and bad arguments."""


class FastMNISTError(Exception):
    """Bad input, a damaged shard set or a bad argument; the message names the file or value."""


class MissingFileError(FastMNISTError):
    """A file that should be there is not; the message names it."""
