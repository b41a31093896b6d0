"""The one error type of every on-disk format."""


class CheckpointError(ValueError):
    """A checkpoint, or a request about one, that cannot be carried out.

    The message names the file, key, shape, flag or value at fault; the command-line layers
    (`paligemma`, `paligemma-convert`) print it as one line.
    """
