"""EDF, EDF+C, BDF and BDF+C signal files.

The header is always parsed here (a few hundred bytes) so that every backend
reports the same :class:`~s2v_core.io.base.SignalHeader` and the patient and
recording identification, start date and start time are skipped at the byte
level and never kept. Sample values come from one of two backends behind the
same contract:

``numpy`` (:class:`NumpyEdfReader`, what :func:`open_edf` uses)
    a small record parser over ``np.memmap``: one pass over the data records
    per channel, about 8x faster than pyedflib on a full night (pyedflib
    issues one read per record per channel), and it also reads the files
    pyedflib refuses although they are readable: digital min/max outside the
    int16 range (DREAMS), a truncated last record, a header whose record
    count disagrees with the file size. Nothing readable is lost.
``pyedflib`` (:class:`PyEdfLibReader`)
    the reference C reader. The conformance tests check that both backends
    return identical samples, and that both agree with MNE.

EDF+D (discontinuous) files are refused with that reason: their records are
not contiguous in time and would silently shift the hypnogram.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from s2v_core.io.base import ChannelHeader, SignalHeader, UnreadableRecording

logger = logging.getLogger(__name__)

ANNOTATION_LABELS = ("EDF Annotations", "BDF Annotations")
_BDF_VERSION = b"\xffBIOSEMI"
_UNITS = {"uv": "uV", "µv": "uV", "mv": "mV", "v": "V", "nv": "nV", "%": "%", "bpm": "bpm"}
# (field name, width in bytes) of the per-signal header block, in file order.
_SIGNAL_FIELDS = (
    ("label", 16),
    ("transducer", 80),
    ("unit", 8),
    ("physical_min", 8),
    ("physical_max", 8),
    ("digital_min", 8),
    ("digital_max", 8),
    ("prefiltering", 80),
    ("samples_per_record", 8),
    ("reserved", 32),
)


@dataclass(frozen=True)
class _Layout:
    """Where the samples are: what both backends need beyond the public header."""

    header: SignalHeader
    header_bytes: int
    bytes_per_sample: int
    record_samples: int  # samples of all signals (annotations included) per record
    starts: tuple[int, ...]  # first sample of each signal within a record
    annotation_indices: tuple[int, ...]  # file indices of annotation signals
    consistent: bool  # record count matches the file size exactly

    @property
    def record_bytes(self) -> int:
        return self.record_samples * self.bytes_per_sample

    def span(self, file_index: int) -> tuple[int, int]:
        """First and one-past-last sample of signal ``file_index`` within a record."""
        stop = self.starts[file_index + 1] if file_index + 1 < len(self.starts) else self.record_samples
        return self.starts[file_index], stop


def _number(raw: bytes, what: str, path: str) -> float:
    text = raw.decode("ascii", "replace").strip()
    try:
        return float(text)
    except ValueError:
        # The field's text is not repeated: a file that is not a recording may hold anything there.
        raise UnreadableRecording(
            f"{path}: header field {what!r} is not a number ({len(text)} characters that do not parse as one)"
        ) from None


def _normalise_unit(unit: str) -> str:
    return _UNITS.get(unit.strip().casefold(), unit.strip())


#: Leading bytes of files that are often mistaken for recordings -> what they are
#: (said instead of echoing a file's bytes, which may be a CSV row of patient data).
_MAGIC = (
    (b"PK\x03\x04", "a ZIP archive"),
    (b"%PDF", "a PDF document"),
    (b"<?xml", "an XML file"),
    (b"<", "an HTML/XML file"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"PAR1", "a Parquet file"),
    (b"\x89HDF", "an HDF5 file"),
    (b"MATLAB", "a MATLAB file"),
    (b"\xef\xbb\xbf", "a text file"),
)


def _looks_like(head: bytes) -> str:
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return "a text file" if head and printable == len(head) else "an unknown binary format"


def read_layout(path: str | os.PathLike) -> _Layout:
    """Parse and validate the header of an EDF/BDF file (without keeping PHI fields).

    Raises :class:`UnreadableRecording` with a one-line reason for empty,
    non-EDF, truncated-header and EDF+D files.
    """
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        return parse_layout(handle, size, path)


def parse_layout(handle, size: int, path: str) -> _Layout:
    """:func:`read_layout` over an open binary stream of ``size`` bytes (``path`` names it in messages).

    Reads only the header (``256 * (signals + 1)`` bytes), so the ingest can
    check a remote file's declared duration before anything is downloaded.
    """
    if size == 0:
        raise UnreadableRecording(f"{path}: empty file (0 bytes)")
    fixed = handle.read(256)
    if len(fixed) < 256:
        raise UnreadableRecording(f"{path}: {size} bytes, shorter than the 256-byte EDF header")
    version = fixed[:8]
    if version == _BDF_VERSION:
        bytes_per_sample, family = 3, "BDF"
    elif version.strip() == b"0":
        bytes_per_sample, family = 2, "EDF"
    else:
        raise UnreadableRecording(
            f"{path}: not an EDF/BDF file (its first bytes are those of "
            f"{_looks_like(fixed[:64])}, not the EDF version '0' or BDF's '\\xffBIOSEMI')"
        )
    # Bytes 8-184 (patient id, recording id, start date, start time) are PHI
    # and deliberately never decoded.
    header_bytes = int(_number(fixed[184:192], "number of bytes in header", path))
    reserved = fixed[192:236].decode("ascii", "replace").strip()
    declared_records = int(_number(fixed[236:244], "number of data records", path))
    record_seconds = _number(fixed[244:252], "duration of a data record", path)
    n_signals = int(_number(fixed[252:256], "number of signals", path))
    if n_signals < 1 or n_signals > 4096:
        raise UnreadableRecording(f"{path}: header declares {n_signals} signals, expected 1-4096")
    if header_bytes != 256 * (n_signals + 1):
        raise UnreadableRecording(
            f"{path}: header length field says {header_bytes} bytes, expected "
            f"{256 * (n_signals + 1)} for {n_signals} signals"
        )
    block = handle.read(header_bytes - 256)
    if len(block) < header_bytes - 256:
        raise UnreadableRecording(f"{path}: truncated header ({size} bytes, header needs {header_bytes})")
    if reserved.startswith(("EDF+D", "BDF+D")):
        raise UnreadableRecording(
            f"{path}: {reserved[:5]} (discontinuous) recording; only continuous EDF/EDF+C/BDF is ingested"
        )
    file_type = family + ("+C" if reserved.startswith(("EDF+C", "BDF+C")) else "")

    fields: dict[str, list[str]] = {}
    offset = 0
    for name, width in _SIGNAL_FIELDS:
        fields[name] = [
            block[offset + i * width : offset + (i + 1) * width].decode("latin-1").strip() for i in range(n_signals)
        ]
        offset += width * n_signals
    samples = [
        int(_number(v.encode(), f"samples per record of signal {i}", path))
        for i, v in enumerate(fields["samples_per_record"])
    ]
    if any(n < 1 for n in samples):
        raise UnreadableRecording(f"{path}: a signal declares {min(samples)} samples per record, expected >= 1")
    starts = tuple(int(s) for s in np.concatenate([[0], np.cumsum(samples)[:-1]]))
    annotations = tuple(i for i, label in enumerate(fields["label"]) if label in ANNOTATION_LABELS)
    record_samples = int(sum(samples))

    notes = []
    record_bytes = record_samples * bytes_per_sample
    complete = (size - header_bytes) // record_bytes
    leftover = (size - header_bytes) % record_bytes
    if declared_records == -1:
        n_records = complete
        notes.append(f"{path}: header record count is -1 (unknown); read {complete} complete records")
    elif declared_records > complete:
        n_records = complete
        notes.append(
            f"{path}: truncated: header declares {declared_records} data records, "
            f"file holds {complete} complete records; read those"
        )
    elif declared_records < complete:
        n_records = declared_records
        notes.append(
            f"{path}: header declares {declared_records} data records but the file holds "
            f"{complete}; read the declared records only"
        )
    else:
        n_records = declared_records
    if leftover and declared_records == complete:
        notes.append(f"{path}: {leftover} trailing bytes after the last complete record ignored")

    channels = []
    for i in range(n_signals):
        if i in annotations:
            continue
        if record_seconds <= 0:
            raise UnreadableRecording(f"{path}: record duration {record_seconds} s, expected > 0 for signal files")
        channels.append(
            ChannelHeader(
                index=i,
                label=fields["label"][i],
                unit=_normalise_unit(fields["unit"][i]),
                sample_rate_hz=samples[i] / record_seconds,
                samples_per_record=samples[i],
                physical_min=_number(fields["physical_min"][i].encode(), f"physical minimum of signal {i}", path),
                physical_max=_number(fields["physical_max"][i].encode(), f"physical maximum of signal {i}", path),
                digital_min=int(_number(fields["digital_min"][i].encode(), f"digital minimum of signal {i}", path)),
                digital_max=int(_number(fields["digital_max"][i].encode(), f"digital maximum of signal {i}", path)),
            )
        )
    header = SignalHeader(
        path=path,
        file_type=file_type,
        n_records=n_records,
        record_seconds=record_seconds,
        channels=tuple(channels),
        reader="",
        notes=tuple(notes),
    )
    return _Layout(
        header=header,
        header_bytes=header_bytes,
        bytes_per_sample=bytes_per_sample,
        record_samples=record_samples,
        starts=starts,
        annotation_indices=annotations,
        consistent=not notes,
    )


def _scale(digital: np.ndarray, channel: ChannelHeader) -> np.ndarray:
    """Digital to physical values (float32, in ``channel.unit``)."""
    span = channel.digital_max - channel.digital_min
    gain = (channel.physical_max - channel.physical_min) / span if span else 1.0
    offset = channel.physical_min - gain * channel.digital_min
    out = digital.astype(np.float32)
    out *= np.float32(gain)
    out += np.float32(offset)
    return out


class NumpyEdfReader:
    """The fallback reader: numpy over the data records, for readable non-compliant files.

    Parameters
    ----------
    path : str or path-like
        EDF/EDF+C/BDF/BDF+C file.
    """

    def __init__(self, path: str | os.PathLike, *, layout: _Layout | None = None) -> None:
        self._layout = layout or read_layout(path)
        self.header = _with_reader(self._layout.header, "numpy")
        layout = self._layout
        if layout.header.n_records < 1:
            raise UnreadableRecording(f"{path}: no complete data record")
        dtype = np.int16 if layout.bytes_per_sample == 2 else np.uint8
        width = layout.record_samples * (1 if layout.bytes_per_sample == 2 else 3)
        self._data = np.memmap(
            path, dtype=dtype, mode="r", offset=layout.header_bytes, shape=(layout.header.n_records, width)
        )

    def _digital(self, file_index: int) -> np.ndarray:
        layout = self._layout
        start, stop = layout.span(file_index)
        if layout.bytes_per_sample == 2:
            return np.ascontiguousarray(self._data[:, start:stop]).reshape(-1)
        raw = np.ascontiguousarray(self._data[:, 3 * start : 3 * stop]).reshape(-1, 3).astype(np.int32)
        value = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        return (value ^ 0x800000) - 0x800000  # sign-extend 24-bit two's complement

    def read(self, index: int) -> np.ndarray:
        """Physical values (float32, in the channel's unit) of the channel with file index ``index``."""
        channel = _channel(self.header, index)
        return _scale(self._digital(index), channel)

    def read_annotation_bytes(self) -> bytes:
        """Raw TAL bytes of every annotation signal, record by record."""
        parts = []
        for i in self._layout.annotation_indices:
            parts.append(self._digital_bytes(i))
        return b"".join(parts)

    def _digital_bytes(self, file_index: int) -> bytes:
        layout = self._layout
        start, stop = layout.span(file_index)
        raw = self._data.view(np.uint8).reshape(layout.header.n_records, layout.record_bytes)
        return raw[:, start * layout.bytes_per_sample : stop * layout.bytes_per_sample].tobytes()

    def close(self) -> None:
        self._data = None  # drops the memmap


class PyEdfLibReader:
    """The reference reader (pyedflib) behind the same contract.

    Raises ``OSError`` when pyedflib refuses the file (the caller then falls
    back to :class:`NumpyEdfReader`).
    """

    def __init__(self, path: str | os.PathLike, *, layout: _Layout | None = None) -> None:
        import pyedflib

        self._layout = layout or read_layout(path)
        self.header = _with_reader(self._layout.header, "pyedflib")
        self._reader = pyedflib.EdfReader(str(path))
        # pyedflib numbers signals without the annotation channels.
        self._pyedflib_index = {ch.index: k for k, ch in enumerate(self.header.channels)}
        if self._reader.signals_in_file != len(self.header.channels):
            self._reader.close()
            raise OSError(
                f"{path}: pyedflib sees {self._reader.signals_in_file} signals, "
                f"header lists {len(self.header.channels)}"
            )

    def read(self, index: int) -> np.ndarray:
        """Physical values (float32, in the channel's unit) of the channel with file index ``index``."""
        channel = _channel(self.header, index)
        digital = self._reader.readSignal(self._pyedflib_index[index], digital=True)
        return _scale(digital, channel)

    def close(self) -> None:
        self._reader.close()


def _with_reader(header: SignalHeader, reader: str) -> SignalHeader:
    from dataclasses import replace

    return replace(header, reader=reader)


def _channel(header: SignalHeader, index: int) -> ChannelHeader:
    for channel in header.channels:
        if channel.index == index:
            return channel
    raise IndexError(f"{header.path}: no signal channel with index {index}")


def open_edf(path: str | os.PathLike, *, backend: str = "numpy") -> NumpyEdfReader | PyEdfLibReader:
    """Open an EDF/EDF+C/BDF/BDF+C file.

    Parameters
    ----------
    path : str or path-like
        Local file.
    backend : {"numpy", "pyedflib"}
        ``"numpy"`` (default) reads every readable file, compliant or not;
        ``"pyedflib"`` uses the reference reader and falls back to numpy for
        files pyedflib refuses or whose size disagrees with the header.

    Returns
    -------
    reader
        An object with ``header`` (:class:`SignalHeader`), ``read(index)``
        returning float32 physical values and ``close()``.

    Raises
    ------
    UnreadableRecording
        The file is empty, not EDF/BDF, EDF+D, or has no complete record.
    """
    if backend not in ("numpy", "pyedflib"):
        raise ValueError(f"backend: expected 'numpy' or 'pyedflib', found {backend!r}")
    layout = read_layout(path)
    if backend == "pyedflib" and layout.consistent and layout.header.channels:
        try:
            return PyEdfLibReader(path, layout=layout)
        except OSError as exc:
            logger.debug("pyedflib refused %s (%s); using the numpy reader", path, exc)
    return NumpyEdfReader(path, layout=layout)


#: Extension -> signal reader (the dispatch table of signal formats).
SIGNAL_READERS = {".edf": open_edf, ".bdf": open_edf, ".rec": open_edf}


def open_signal(path: str | os.PathLike):
    """Open a signal file with the reader registered for its extension.

    Raises :class:`UnreadableRecording` naming the file for unknown
    extensions and unreadable files.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in SIGNAL_READERS:
        raise UnreadableRecording(
            f"{path}: no signal reader for {suffix!r}; expected one of {', '.join(sorted(SIGNAL_READERS))}"
        )
    return SIGNAL_READERS[suffix](path)


_TAL = re.compile(rb"([+-]\d+(?:\.\d*)?)(?:\x15(\d+(?:\.\d*)?))?\x14(.*?)\x00", re.S)


def parse_tal(data: bytes) -> list[tuple[float, float, str]]:
    """Parse EDF+ time-stamped annotation lists into ``(onset s, duration s, text)``.

    Time-keeping TALs (no text) are skipped; a missing duration is ``-1``.
    """
    events = []
    for match in _TAL.finditer(data):
        onset = float(match.group(1))
        duration = float(match.group(2)) if match.group(2) else -1.0
        for text in match.group(3).split(b"\x14"):
            if text:
                events.append((onset, duration, text.decode("utf-8", "replace").strip()))
    return events
