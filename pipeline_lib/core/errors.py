"""The errors a stage reports in one line: the message names the params key, the file or the URL."""


class ConfigError(ValueError):
    """A params value is missing, unknown, of the wrong type or out of range; the message names the key."""


class DataError(Exception):
    """A data source could not be fetched or read; the message names the URL or file and what is wrong."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""
