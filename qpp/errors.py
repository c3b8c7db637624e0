"""One error type per kind of user mistake.

Every message names the problem and the fix. The CLI turns a ``QppError`` into one line on
stderr and exit status 2; anything else is a bug in qpp and keeps its traceback.
"""


class QppError(Exception):
    """Base class of the errors a user can fix."""


class ModelLoadError(QppError):
    """A model path or reference that cannot be loaded (missing, not a model, bad function)."""


class UnsupportedOpError(QppError):
    """An operator qpp (or a converter it uses) cannot handle."""


class CaptureError(QppError):
    """A model that neither torch.export nor torch.fx can capture."""


class DataError(QppError):
    """Data with a missing key, the wrong shape or dtype, NaN/Inf values, or no samples."""


class ConfigError(QppError):
    """An invalid setting: bit-width, estimator, policy, layer name, granularity."""


class EncodingsError(QppError):
    """Saved encodings that do not match the model they are loaded into."""


class OutputExistsError(QppError):
    """An output path that already exists; qpp never overwrites without --force."""
