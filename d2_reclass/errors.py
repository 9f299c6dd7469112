"""Exception types raised by d2_reclass.

Every error the package raises on bad input is a :class:`ReclassError`, so callers can catch one
type; the message names the file or config key at fault and says how to fix it.
"""
from typing import Sequence

__all__ = [
    "ReclassError",
    "ConfigError",
    "ClassListError",
    "ClassMismatchError",
    "CheckpointError",
    "CombineError",
    "DatasetError",
    "UnsafeCheckpointError",
    "ResumeClassMismatchError",
]


class ReclassError(Exception):
    """Base class of every error d2_reclass raises on bad input."""


class ConfigError(ReclassError, ValueError):
    """A ``MODEL.RECLASS`` key (or the matching option) has a value it cannot take."""


class ClassListError(ReclassError, ValueError):
    """A class list or class map is malformed, or disagrees with the checkpoint."""


class ClassMismatchError(ReclassError):
    """``strict`` mode found class-dependent tensors whose classes differ from the model's.

    Attributes:
        problems (list[str]): per class space, how the classes differ.
        tensors (list[str]): the mismatched tensors with both shapes.
    """

    def __init__(self, message: str, problems: Sequence[str] = (), tensors: Sequence[str] = ()):
        super().__init__(message)
        self.problems, self.tensors = list(problems), list(tensors)


class CheckpointError(ReclassError, OSError):
    """A checkpoint file is missing, unreadable, or not a checkpoint."""


class CombineError(ReclassError):
    """Checkpoints cannot be combined as asked: their non-class tensors differ (and that was
    not allowed), or one of them gives the model no class."""


class DatasetError(ReclassError):
    """A dataset (its annotation file, its loader or its registration) cannot be read."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle file asked to create an object outside the safe allow-list."""


class ResumeClassMismatchError(ReclassError):
    """Resuming a run whose checkpoint was trained for other classes."""
