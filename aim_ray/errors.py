"""User-facing errors. The CLI prints their message (no traceback) and exits with status 2.

Every message names the file, tensor or option at fault, so the user can act on it.
"""


class AimRayError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class ConfigError(AimRayError):
    """A merge / AIM / tune config or CLI option is invalid."""


class CheckpointError(AimRayError):
    """A checkpoint is missing, corrupt, or incompatible with the others."""


class CalibrationError(AimRayError):
    """Calibration data or the model cannot be calibrated as asked."""


class StatisticsError(AimRayError):
    """Expert statistics of a data-aware merge (RegMean, Fisher, trained masks): missing or bad data, a singular
    system, an unusable artifact."""


class ScalesError(AimRayError):
    """A scales artifact does not match the base model it is applied to."""


class IgnoredParameterWarning(UserWarning):
    """A config parameter that the merge method does not use and MergeKit would ignore too."""


class OutputExistsError(AimRayError):
    """The output directory exists and --overwrite was not given."""


class ClusterError(Exception):
    """The cluster failed the run (a worker or node lost for good, a call that timed out), not the input.

    The CLI prints its message without a traceback (exit status 1); the hidden work dir is kept for --resume."""


class OutputBusyError(AimRayError):
    """Another run holds the lock on the same output directory."""
