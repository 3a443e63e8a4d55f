"""Error types shared by `prep` and `train`.

Library code raises these; only the CLIs turn them into exit codes and red text. Every message says what
went wrong, the value, and the fix.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad input, bad option, damaged file). The CLI prints it without a traceback."""


class DatasetError(UserError):
    """A packed dataset folder cannot be used as it is."""


class IncompleteDatasetError(DatasetError):
    """The folder has no complete manifest: packing was interrupted or is still running."""


class ManifestError(DatasetError):
    """The manifest is malformed or disagrees with the files."""


class ShardIntegrityError(DatasetError):
    """A shard is missing, truncated, changed after packing, or has the wrong schema or format version."""


class InvariantError(DatasetError):
    """A row breaks the shard contract (EOS, positions, labels, boundaries, document order)."""
