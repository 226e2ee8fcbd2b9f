"""Errors the CLI reports as one clear line (no traceback) with a non-zero exit."""


class SamBenchError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(SamBenchError, ValueError):
    """A bad setting."""


class DataError(SamBenchError):
    """A dataset that is missing, corrupt or cannot be downloaded."""


class CheckpointError(SamBenchError):
    """A checkpoint that cannot be used to resume."""


class TrainingDiverged(SamBenchError):
    """A non-finite loss, gradient or weight: the run stops before writing that state anywhere.
    ``recorded``: the run directory's divergence record says so already (not written again)."""

    def __init__(self, message: str, recorded: bool = False):
        super().__init__(message)
        self.recorded = recorded

    def __reduce__(self):  # pickled (a launcher's job result) with ``recorded``
        return type(self), (str(self), self.recorded)
