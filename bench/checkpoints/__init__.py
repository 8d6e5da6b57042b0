"""Loading checkpoints safely: weights-only, checked before and after reading.

Checkpoints are untrusted files from the internet. :mod:`.safety` decides whether a file may be read (a regular
file in one of the accepted formats, a torch archive that holds what it declares) and whether the weights read
are finite; :mod:`.loading` reads it weights-only into a flat state dict and loads that into a model, explaining
any mismatch of keys or shapes (:func:`load_checkpoint_model`: an architecture for a dataset with a file's weights).
"""

from bench.checkpoints.loading import (
    SUPPORTED_EXTENSIONS,
    CheckpointMismatchError,
    drop_unused_keys,
    load_checkpoint_model,
    load_state_dict,
    load_weights,
    sha256_file,
)
from bench.checkpoints.safety import (
    NonFiniteWeightsError,
    NotACheckpointError,
    UnsafeCheckpointError,
    check_finite,
    check_input_file,
    check_torch_archive,
    checkpoint_format,
)

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "CheckpointMismatchError",
    "NonFiniteWeightsError",
    "NotACheckpointError",
    "UnsafeCheckpointError",
    "check_finite",
    "check_input_file",
    "check_torch_archive",
    "checkpoint_format",
    "drop_unused_keys",
    "load_checkpoint_model",
    "load_state_dict",
    "load_weights",
    "sha256_file",
]
