"""Exceptions that the CLI turns into one line on stderr and a non-zero exit."""


class TlpipeError(Exception):
    """A failure the user can act on (runtime problem): exit code 1."""

    exit_code = 1


class UsageError(TlpipeError):
    """The user asked for something invalid (unknown base, bad option): exit code 2."""

    exit_code = 2


class WeightsUnavailable(TlpipeError):
    """Weights could not be loaded or downloaded."""


class DataError(TlpipeError):
    """The data source is missing, empty or unusable."""


class FeaturesFileError(TlpipeError):
    """A features file is missing, malformed, stale or incompatible."""


class LockedError(TlpipeError):
    """Another process is writing the same output."""


class DataNotFound(UsageError, DataError):
    """A --data path that does not exist (a usage error: exit code 2)."""


class FeaturesNotFound(UsageError, FeaturesFileError):
    """A --features file that does not exist (a usage error: exit code 2)."""


class WeightsNotFound(UsageError, WeightsUnavailable):
    """A --weights folder without the base's file (a usage error: exit code 2)."""


class WrongFile(UsageError, FeaturesFileError):
    """A path that is not the kind of file the command reads (not HDF5, not a tlpipe features file),
    or features files that cannot be fused: a usage error, exit code 2."""


class NotAModel(UsageError, DataError):
    """A --model path that Keras cannot load as a model (a usage error: exit code 2)."""


class WeightsMismatch(UsageError, WeightsUnavailable):
    """A --weights file whose arrays do not fit the base (another base's file): exit code 2."""


class DataLayoutError(UsageError, DataError):
    """A --data folder not laid out as tlpipe reads it (no class subfolders, a single class, train/
    without val/): a usage error, exit code 2."""
