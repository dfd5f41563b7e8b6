"""DICOM pixel data: decode the frames of a parsed file into a NumPy array, with typed errors.

pydicom (with the pylibjpeg/pyjpegls plugins) decodes every compressed syntax; uncompressed
little-endian monochrome data takes a zero-copy fast path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut

from medhybrid.errors import (
    CorruptPixelDataError,
    DicomError,
    InvalidTagError,
    MedHybridError,
    NotAnImageError,
    UnsupportedTransferSyntaxError,
)
from medhybrid.io.dicom_files import (
    HEADER_TAGS,
    check_pixel_budget,
    image_tag,
    recorded_warnings,
    third_party_failure,
    transfer_syntax_of,
)

# The pixel pass needs the Image Pixel module only (geometry came from the header pass), plus
# SOPClassUID, by which a forced parse of a file without preamble is judged a data set.
PIXEL_TAGS: list[str] = [
    "SOPClassUID",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "PlanarConfiguration",
    "HighBit",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
]


def decode_frames(ds: Dataset, path: Path) -> np.ndarray:
    """All frames of ``ds`` as ``(frames, rows, cols[, samples])``, before rescale; colour as RGB.

    Raises:
        CorruptPixelDataError, UnsupportedTransferSyntaxError
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NotAnImageError("no pixel data", path=path, fix="nothing to do: it is skipped")
    ts = transfer_syntax_of(ds, path)  # raises for an unknown syntax; fills it in for bare data sets
    with recorded_warnings():
        try:
            return _decode_frames(ds, path, ts)
        except MedHybridError:
            raise
        except BaseException as exc:  # the one boundary of the pixel pass: nothing untyped gets out
            if not third_party_failure(exc):
                raise
            raise CorruptPixelDataError(
                f"pixel data cannot be decoded ({type(exc).__name__}: {str(exc)[:160]})",
                path=path,
                fix="re-export the image from the source system",
            ) from None


def _decode_frames(ds: Dataset, path: Path, ts: str) -> np.ndarray:
    rows, cols = image_tag(ds, "Rows", path, int), image_tag(ds, "Columns", path, int)
    frames = image_tag(ds, "NumberOfFrames", path, int, 1) or 1
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    samples = 3 if photometric == "PALETTE COLOR" else image_tag(ds, "SamplesPerPixel", path, int, 1)
    if not rows or not cols or frames < 1:
        raise InvalidTagError(f"image size Rows={rows} Columns={cols} NumberOfFrames={frames}", path=path)
    check_pixel_budget(ds, path, rows, cols, frames, samples, ts)  # before any buffer is allocated
    fast = _native_frames(ds)
    if fast is not None:
        return fast
    with recorded_warnings():
        try:
            pixels = ds.pixel_array
            if str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR":
                pixels = apply_color_lut(pixels, ds)
        except DicomError:
            raise
        except NotImplementedError as exc:
            raise UnsupportedTransferSyntaxError(
                f"pixel data cannot be decoded here ({exc})", path=path, fix="decompress the file"
            ) from None
        except BaseException as exc:  # decoders raise ValueError/RuntimeError/..., Rust ones panic
            if not third_party_failure(exc):
                raise
            raise CorruptPixelDataError(
                f"pixel data is truncated or corrupt ({type(exc).__name__}: {str(exc)[:160]})",
                path=path,
                fix="re-export the image from the source system",
            ) from None
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    colour = samples == 3 or str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR"
    if n_frames == 1:
        pixels = pixels[np.newaxis]
    expected = 3 + (1 if colour else 0)
    if pixels.ndim != expected:
        raise CorruptPixelDataError(
            f"decoded pixel array has shape {pixels.shape}, which does not match the header",
            path=path,
            fix="re-export the image",
        )
    return pixels


_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def _native_frames(ds: Dataset) -> np.ndarray | None:
    """Fast path for the most common case, uncompressed little-endian monochrome pixels: a zero-copy
    view of the Pixel Data bytes. pydicom's generic decoder spends ~0.8 ms a file on bookkeeping and a
    copy, which is half of a CT series' load time. Anything unusual returns None and goes to pydicom.
    """
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    try:
        if (
            ts not in _NATIVE_LE
            or "PixelData" not in ds
            or int(ds.get("SamplesPerPixel", 1)) != 1
            or str(ds.get("PhotometricInterpretation", "")).strip() not in ("MONOCHROME1", "MONOCHROME2")
        ):
            return None
        allocated, stored = int(ds.BitsAllocated), int(ds.get("BitsStored", ds.BitsAllocated))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        rows, cols, frames = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError, AttributeError):
        return None  # let pydicom produce its own (typed, below) error
    if allocated not in (8, 16, 32) or stored != allocated:
        return None  # packed or masked bits: pydicom handles the bit fiddling
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    raw = ds.PixelData
    needed = rows * cols * frames * dtype.itemsize
    if len(raw) < needed:
        return None  # pydicom raises the detailed "truncated" error
    return np.frombuffer(raw, dtype=dtype, count=rows * cols * frames).reshape(frames, rows, cols)


def stored_value_range(ds: Dataset) -> tuple[float, float]:
    """The representable range of stored values (BitsStored, PixelRepresentation)."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
    return (0.0, 2.0**bits - 1)


# Header and pixel pass in one parse, for single-pass loading.
HEADER_AND_PIXEL_TAGS: list[str] = sorted(set(HEADER_TAGS) | set(PIXEL_TAGS))
