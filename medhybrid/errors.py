"""Every error medhybrid raises on purpose.

Each message says what went wrong, where (the file or folder), and how to fix it. The CLI turns any
:class:`MedHybridError` into one line on stderr and exit code 1; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class MedHybridError(Exception):
    """Base class of all domain errors.

    Args:
        message: what went wrong, in one sentence.
        path: the file or folder concerned, if any.
        fix: what the user can do about it.
        files: further files involved (listed, up to a few, in the message).
    """

    code = "error"

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        fix: str | None = None,
        files: Sequence[str | Path] = (),
    ) -> None:
        self.message = message
        self.path = Path(path) if path is not None else None
        self.fix = fix
        self.files = [Path(f) for f in files]
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = [f"{self.path}: {self.message}" if self.path is not None else self.message]
        if self.files:
            shown = ", ".join(str(f) for f in self.files[:5])
            more = f" (+{len(self.files) - 5} more)" if len(self.files) > 5 else ""
            parts.append(f"files: {shown}{more}")
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return "; ".join(parts)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:  # keep keyword arguments when pickled
        return (_rebuild, (type(self), self.message, self.path, self.fix, self.files))


def _rebuild(
    cls: type[MedHybridError], message: str, path: Path | None, fix: str | None, files: list[Path]
) -> MedHybridError:
    return cls(message, path=path, fix=fix, files=files)


# --- input files -------------------------------------------------------------------------------


class InputError(MedHybridError):
    """A path the user gave does not exist or is not what the command needs."""

    code = "input"


class UnsupportedFormatError(InputError):
    """A file is in a format medhybrid does not read."""

    code = "unsupported_format"


class ImageReadError(InputError):
    """An image file (NIfTI, NRRD, MHA, PNG, npz) could not be read or has invalid geometry."""

    code = "image_read"


class PreprocessingError(InputError):
    """A study was read but a preprocessing transform (orientation, resampling, crop, ...) failed on it."""

    code = "preprocessing"


class InvalidGeometryError(InputError):
    """An image's voxel-to-world matrix is not a usable grid: not finite, singular, sheared, or absurd sizes."""

    code = "invalid_geometry"


class GeometryMismatchError(InputError):
    """Two images that must share a world frame (a study and its reference mask) do not overlap."""

    code = "geometry_mismatch"


# --- DICOM: per file ---------------------------------------------------------------------------


class DicomError(MedHybridError):
    """Base class of DICOM problems."""

    code = "dicom"


class NotDicomError(DicomError):
    """The file is not a readable DICOM file (no preamble/File Meta, or unparseable)."""

    code = "not_dicom"


class TruncatedFileError(DicomError):
    """The file ends before its data set does."""

    code = "truncated_file"


class NotAnImageError(DicomError):
    """A valid DICOM object that carries no image to analyse (SR, RT plan/structure, SEG, ...)."""

    code = "not_an_image"


class UnsupportedTransferSyntaxError(DicomError):
    """The pixel data is encoded in a transfer syntax no installed decoder handles (or none is declared)."""

    code = "unsupported_syntax"


class CorruptPixelDataError(DicomError):
    """The pixel data is truncated or cannot be decoded."""

    code = "corrupt_pixel_data"


class InvalidTagError(DicomError):
    """A tag medhybrid needs holds a value that cannot be interpreted."""

    code = "invalid_tag"


# --- DICOM: per series (geometry) ----------------------------------------------------------------


class SeriesGeometryError(DicomError):
    """The slices of a series do not form one regular volume."""

    code = "geometry"


class MissingPositionError(SeriesGeometryError):
    """Slices lack ImagePositionPatient/ImageOrientationPatient, so they cannot be placed in space."""

    code = "missing_position"


class DuplicatePositionError(SeriesGeometryError):
    """Two or more slices share one position."""

    code = "duplicate_position"


class MissingSliceError(SeriesGeometryError):
    """A gap of a whole number of slice spacings: slices are missing."""

    code = "missing_slices"


class UnevenSpacingError(SeriesGeometryError):
    """Slice spacing varies more than the tolerance."""

    code = "uneven_spacing"


class MixedOrientationError(SeriesGeometryError):
    """Slices of one series have different orientations."""

    code = "mixed_orientation"


class MixedMatrixError(SeriesGeometryError):
    """Slices of one series have different matrix sizes or samples per pixel."""

    code = "mixed_matrix"


class GantryTiltError(SeriesGeometryError):
    """Slice positions do not advance along the slice normal (gantry tilt / sheared stack)."""

    code = "gantry_tilt"


# --- selection, manifests, configuration ---------------------------------------------------------


class SeriesSelectionError(MedHybridError):
    """No series, or more than one, matches the selection rules."""

    code = "series_selection"


class NoSeriesError(SeriesSelectionError):
    code = "no_series"


class AmbiguousSeriesError(SeriesSelectionError):
    code = "ambiguous_series"


class ManifestError(MedHybridError):
    """A manifest file is malformed or its content is inconsistent."""

    code = "manifest"


class ConfigError(MedHybridError):
    """A configuration (pipeline YAML, --set override, option) is invalid."""

    code = "config"


# --- models ------------------------------------------------------------------------------------


class ModelError(MedHybridError):
    """A model cannot be built, registered or run as asked."""

    code = "model"


class UnknownModelError(ModelError):
    """No registered model has this name (the message lists the close matches)."""

    code = "unknown_model"


class DuplicateModelError(ModelError):
    """Two factories were registered under one name."""

    code = "duplicate_model"


class ModelInputError(ModelError):
    """An input tensor does not fit the model (channels, spatial dims, size)."""

    code = "model_input"


# --- training ----------------------------------------------------------------------------------


class CheckpointError(MedHybridError):
    """A checkpoint or weights file is missing, unreadable, or not what was expected."""

    code = "checkpoint"


class TrainingError(MedHybridError):
    """A training run cannot start or continue (run folder, resume, diverged loss)."""

    code = "training"


class InferenceError(MedHybridError):
    """Inference cannot run (output folder, model/input mismatch) or one study could not be reported."""

    code = "inference"
