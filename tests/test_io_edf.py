"""Signal readers: the conformance test every backend passes, real files against MNE, bad files.

``write_edf`` (used by the other ingest tests too) writes real EDF/EDF+/BDF
files with pyedflib.
"""

from __future__ import annotations

from pathlib import Path

import mne
import numpy as np
import pyedflib
import pytest

from s2v_core.io.base import UnreadableRecording
from s2v_core.io.edf import NumpyEdfReader, PyEdfLibReader, open_edf, open_signal, parse_tal, read_layout

FAKE_PATIENT = "Jane_Q_Testpatient"


def write_edf(
    path: Path,
    channels: dict[str, tuple[float, np.ndarray]],
    *,
    file_type: str = "edf+",
    annotations: tuple[tuple[float, float, str], ...] = (),
    unit: str = "uV",
    record_seconds: int = 1,
) -> Path:
    """Write ``{label: (rate Hz, values)}`` as EDF (``edf``, ``edf+``, ``bdf``, ``bdf+``) with a fake patient."""
    kinds = {
        "edf": pyedflib.FILETYPE_EDF,
        "edf+": pyedflib.FILETYPE_EDFPLUS,
        "bdf": pyedflib.FILETYPE_BDF,
        "bdf+": pyedflib.FILETYPE_BDFPLUS,
    }
    digital = (-8388608, 8388607) if file_type.startswith("bdf") else (-32768, 32767)
    writer = pyedflib.EdfWriter(str(path), len(channels), file_type=kinds[file_type])
    try:
        if record_seconds != 1:  # pyedflib's default is 1 s and it warns when forced
            writer.setDatarecordDuration(record_seconds)
        headers = []
        for label, (rate, values) in channels.items():
            low, high = float(np.floor(np.min(values))), float(np.ceil(np.max(values)))
            if high - low < 1e-3:
                low, high = low - 1.0, high + 1.0
            headers.append(
                {
                    "label": label,
                    "dimension": unit,
                    "sample_frequency": rate,
                    "physical_min": low,
                    "physical_max": high,
                    "digital_min": digital[0],
                    "digital_max": digital[1],
                }
            )
        writer.setSignalHeaders(headers)
        if file_type.endswith("+"):
            writer.setPatientName(FAKE_PATIENT)
            writer.setPatientCode("HOSP-4711")
            writer.setBirthdate("01.01.1950")
        for onset, duration, text in annotations:
            writer.writeAnnotation(onset, duration, text)
        writer.writeSamples([np.asarray(v, dtype=np.float64) for _, v in channels.values()])
    finally:
        writer.close()
    return path


def _channels(seconds: int = 60) -> dict[str, tuple[float, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        "EEG C3-M2": (256.0, rng.normal(0, 30, 256 * seconds)),
        "ECG": (128.0, rng.normal(0, 500, 128 * seconds)),
        "SpO2": (4.0, 95 + rng.normal(0, 1, 4 * seconds)),
    }


@pytest.mark.parametrize("file_type", ["edf", "edf+", "bdf", "bdf+"])
@pytest.mark.parametrize("backend", [NumpyEdfReader, PyEdfLibReader])
def test_every_signal_reader_conforms(tmp_path, file_type, backend):
    channels = _channels()
    path = write_edf(tmp_path / f"x.{file_type[:3]}", channels, file_type=file_type)
    reader = backend(path)
    try:
        header = reader.header
        assert header.file_type == file_type.upper().replace("+", "+C")
        assert header.duration_seconds == 60
        assert [c.label for c in header.channels] == list(channels)
        for channel in header.channels:
            rate, written = channels[channel.label]
            assert channel.sample_rate_hz == rate and channel.unit == "uV"
            values = reader.read(channel.index)
            assert values.dtype == np.float32 and values.shape == written.shape
            resolution = (channel.physical_max - channel.physical_min) / (channel.digital_max - channel.digital_min)
            np.testing.assert_allclose(values, written, atol=1.5 * resolution + 1e-3 * np.abs(written).max())
    finally:
        reader.close()


def test_backends_agree_sample_for_sample(tmp_path):
    path = write_edf(tmp_path / "x.edf", _channels())
    numpy_reader, reference = NumpyEdfReader(path), PyEdfLibReader(path)
    for channel in reference.header.channels:
        np.testing.assert_array_equal(numpy_reader.read(channel.index), reference.read(channel.index))


def test_header_keeps_no_phi(tmp_path):
    path = write_edf(tmp_path / "x.edf", _channels(), annotations=((0.0, -1, "start"),))
    assert FAKE_PATIENT.encode() in path.read_bytes()  # the file does carry it ...
    header = open_edf(path).header
    assert FAKE_PATIENT not in repr(header) and "HOSP-4711" not in repr(header)  # ... the header never does
    assert "1950" not in repr(header)


def _mne_agrees(path: Path, reader, skip=()):
    raw = (mne.io.read_raw_bdf if path.suffix == ".bdf" else mne.io.read_raw_edf)(path, preload=True, verbose="error")
    checked = 0
    for channel in reader.header.channels:
        if channel.label in skip or channel.sample_rate_hz != raw.info["sfreq"]:
            continue  # MNE resamples slower channels to the fastest rate
        ours = reader.read(channel.index).astype(np.float64)
        theirs = raw.get_data(picks=[channel.label])[0]
        # MNE converts known units (uV, mV) to volts and leaves unknown ones (DREAMS' "UV") as written.
        scale = min((1.0, 1e-3, 1e-6), key=lambda s: np.abs(ours * s - theirs).max())
        np.testing.assert_allclose(ours * scale, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())
        checked += 1
    return checked


@pytest.mark.parametrize("backend", ["numpy", "pyedflib"])
def test_sleep_edf_crop_matches_mne(real_data, backend):
    path = real_data / "SleepEDF_SC4001" / "short_psg.edf"
    reader = open_edf(path, backend=backend)
    assert reader.header.reader == backend and reader.header.duration_seconds == 300
    labels = {c.label: c.sample_rate_hz for c in reader.header.channels}
    assert labels["EEG Fpz-Cz"] == 100 and labels["EMG submental"] == 1
    assert _mne_agrees(path, reader) == 3


@pytest.mark.parametrize("backend", ["numpy", "pyedflib"])
def test_openbci_bdf_matches_mne(real_data, backend):
    path = real_data / "OpenBCI_COsleep" / "multiple_annotation_chans.bdf"
    reader = open_edf(path, backend=backend)
    assert reader.header.file_type == "BDF+C" and reader.header.reader == backend
    assert len(reader.header.channels) == 19
    assert _mne_agrees(path, reader, skip=("Trigger",)) == 18  # MNE treats the BDF trigger as a stim channel


def test_dreams_non_compliant_edf_is_read_and_matches_mne(real_data):
    path = real_data / "DREAMS_Spindles" / "excerpt3.edf"
    with pytest.raises(OSError):
        pyedflib.EdfReader(str(path))  # digital min/max outside int16
    assert open_edf(path, backend="pyedflib").header.reader == "numpy"  # the fallback
    reader = open_edf(path)
    assert reader.header.reader == "numpy"
    channels = {c.label: c for c in reader.header.channels}
    assert channels["C3-A1"].unit == "uV"  # written "UV"
    assert channels["C3-A1"].sample_rate_hz == 50 and channels["hypnogram"].sample_rate_hz == 1
    assert reader.header.duration_seconds == 1800
    assert _mne_agrees(path, reader) == 15


def test_non_compliant_digital_range_is_read_by_the_fallback(tmp_path):
    path = write_edf(tmp_path / "x.edf", _channels(), file_type="edf")
    layout = read_layout(path)
    raw = bytearray(path.read_bytes())
    n = len(layout.header.channels)
    # Widen the declared digital range of signal 0 beyond int16, scaling the physical range alike.
    dmin_at = 256 + n * (16 + 80 + 8 + 8 + 8)
    dmax_at = dmin_at + n * 8
    pmin_at, pmax_at = 256 + n * (16 + 80 + 8), 256 + n * (16 + 80 + 8 + 8)
    channel = layout.header.channels[0]
    raw[dmin_at : dmin_at + 8] = b"-65536  "
    raw[dmax_at : dmax_at + 8] = b"65534   "
    raw[pmin_at : pmin_at + 8] = f"{2 * channel.physical_min:<8.6g}".encode()[:8].ljust(8)
    raw[pmax_at : pmax_at + 8] = f"{2 * channel.physical_max:<8.6g}".encode()[:8].ljust(8)
    path.write_bytes(bytes(raw))
    with pytest.raises(OSError):
        pyedflib.EdfReader(str(path))
    reader = open_edf(path, backend="pyedflib")
    assert reader.header.reader == "numpy"
    written = _channels()["EEG C3-M2"][1]
    np.testing.assert_allclose(reader.read(0), written, atol=0.05 * np.abs(written).max())


def test_truncated_file_reads_complete_records_with_a_note(tmp_path):
    path = write_edf(tmp_path / "x.edf", _channels(), file_type="edf")
    full = path.read_bytes()
    record_bytes = (256 + 128 + 4) * 2
    path.write_bytes(full[: len(full) - 10 * record_bytes - 100])
    reader = open_edf(path, backend="pyedflib")
    assert reader.header.reader == "numpy" and reader.header.n_records == 49
    assert "truncated" in reader.header.notes[0] and "x.edf" in reader.header.notes[0]
    assert reader.read(0).size == 49 * 256


def test_header_that_lies_about_its_length(tmp_path):
    path = write_edf(tmp_path / "x.edf", _channels(), file_type="edf")
    raw = bytearray(path.read_bytes())
    raw[236:244] = b"30      "  # declares 30 records, the file holds 60
    path.write_bytes(bytes(raw))
    reader = open_edf(path)
    assert reader.header.n_records == 30 and "declares 30" in reader.header.notes[0]
    raw[236:244] = b"600     "  # declares 600 records, the file holds 60
    path.write_bytes(bytes(raw))
    assert open_edf(path).header.n_records == 60


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"PK\x03\x04 this is a zip archive" + b"\0" * 300, "not an EDF/BDF file"),
        (b"0       " + b" " * 100, "shorter than the 256-byte"),
    ],
)
def test_files_that_are_not_edf_are_refused_with_a_reason(tmp_path, content, message):
    path = tmp_path / "fake.edf"
    path.write_bytes(content)
    with pytest.raises(UnreadableRecording, match=message) as caught:
        open_signal(path)
    assert "fake.edf" in str(caught.value)


def test_refusals_never_repeat_the_file_bytes(tmp_path):
    path = tmp_path / "export.edf"  # a CSV export of a patient list, saved under the wrong name
    path.write_bytes(b"Doe,John,1961-02-03,MRN 0012345\n" * 20)
    with pytest.raises(UnreadableRecording, match="not an EDF/BDF file.*a text file") as caught:
        open_signal(path)
    assert b"Doe" not in str(caught.value).encode() and "1961" not in str(caught.value)
    raw = bytearray(write_edf(tmp_path / "x.edf", _channels(), file_type="edf").read_bytes())
    raw[236:244] = b"Doe_John"  # number of data records
    (tmp_path / "x.edf").write_bytes(bytes(raw))
    with pytest.raises(UnreadableRecording, match="'number of data records' is not a number") as caught:
        open_signal(tmp_path / "x.edf")
    assert "Doe" not in str(caught.value)


def test_header_length_field_mismatch_is_refused(tmp_path):
    path = write_edf(tmp_path / "x.edf", _channels(), file_type="edf")
    raw = bytearray(path.read_bytes())
    raw[184:192] = b"999     "
    path.write_bytes(bytes(raw))
    with pytest.raises(UnreadableRecording, match="header length field"):
        open_signal(path)


def test_discontinuous_edf_is_refused(tmp_path):
    path = write_edf(tmp_path / "x.edf", _channels(), file_type="edf+")
    raw = bytearray(path.read_bytes())
    raw[192:197] = b"EDF+D"
    path.write_bytes(bytes(raw))
    with pytest.raises(UnreadableRecording, match="discontinuous"):
        open_signal(path)


def test_unknown_extension_is_refused(tmp_path):
    path = tmp_path / "x.wav"
    path.write_bytes(b"RIFF")
    with pytest.raises(UnreadableRecording, match="no signal reader"):
        open_signal(path)


def test_tal_parser_matches_pyedflib(real_data):
    path = real_data / "OpenBCI_COsleep" / "multiple_annotation_chans.bdf"
    ours = parse_tal(NumpyEdfReader(path).read_annotation_bytes())
    reader = pyedflib.EdfReader(str(path))
    onsets, _, texts = reader.readAnnotations()
    reader.close()
    assert [t for _, _, t in ours] == list(texts)
    np.testing.assert_allclose([o for o, _, _ in ours], onsets)
