"""User-facing errors.

Anything a user can get wrong (a config value, a path, a file) raises a subclass of
:class:`NtpSslError` with a one-line message that names the bad value and what would be
accepted. The command line prints such errors as ``error: <message>`` and exits with
code 2, without a traceback.
"""


class NtpSslError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""


class ConfigError(NtpSslError, ValueError):
    """A config value, name or combination that cannot work."""


class DataError(NtpSslError, ValueError):
    """A dataset, folder or file that cannot be read as a domain."""


class CheckpointError(NtpSslError, ValueError):
    """A checkpoint that is missing, corrupted, unsafe or built for something else."""


class NumericalError(NtpSslError, RuntimeError):
    """A loss became NaN or infinite."""
