"""Writers for the files a real site hands over: signals, hypnograms, metadata, site config.

* signals: EDF+C (16 bit) or BDF+C (24 bit) through pyedflib, 1-s data
  records, each channel quantised over its own physical range;
* hypnograms: EDF+ annotation files in Sleep-EDF R&K wording
  (``Sleep stage W/1/2/3/4/R/?``, ``Movement time``; runs of equal stages
  merged) or AASM wording (``Sleep stage W/N1/N2/N3/R``, one per epoch, with
  ``Lights off``/``Lights on``), NSRR XML (``ScoredEvent`` with ``EventType``
  ``Stages|Stages`` and ``EventConcept`` ``Wake|0`` …, plus respiratory
  events and desaturations), or a CSV with one ``stage`` row per 30-s epoch
  (values ``W``, ``N1``, ``N2``, ``N3``, ``REM``, ``?``);
* metadata: one CSV per site in the site's own column names and codes;
* ``site.toml``: the :class:`s2v_core.io.site_config.SiteConfig` that reads it all.

Nothing here reads a clock: every byte follows from the arguments.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyedflib

from s2v_core.modalities import EPOCH_SECONDS, match_channel
from s2v_core.synth.hypnogram import N1, N2, N3, REM, NightHypnogram, W
from s2v_core.synth.night import EVENT_NAMES, Night
from s2v_core.synth.sites import ChannelSpec, SiteArchetype

_DIGITAL_RANGE = {"edf": (-32768, 32767), "bdf": (-8388608, 8388607)}
_FILE_TYPE = {"edf": pyedflib.FILETYPE_EDFPLUS, "bdf": pyedflib.FILETYPE_BDFPLUS}


@dataclass(frozen=True)
class HeaderIdentity:
    """Fake patient and recording header fields (for de-identification tests downstream).

    ``patient_name`` is written as EDF+ requires (spaces replaced by ``_``),
    ``birthdate`` as EDF+ writes it (``dd-MMM-yyyy``).
    """

    patient_name: str
    patient_code: str
    birthdate: dt.date
    sex: int
    admincode: str
    technician: str
    start: dt.datetime

    @property
    def birthdate_text(self) -> str:
        """Birth date as it appears in an EDF+ header, e.g. ``04-MAR-1950``."""
        return self.birthdate.strftime("%d-%b-%Y").upper()

    @property
    def phi(self) -> tuple[str, ...]:
        """Every identifying string written to the header: none may reach the store."""
        return (
            self.patient_name,
            self.patient_name.replace("_", " "),
            self.patient_code,
            self.birthdate_text,
            self.admincode,
            self.technician,
        )


def _quantise(values: np.ndarray, spec: ChannelSpec, file_format: str) -> np.ndarray:
    """Physical values -> integers over the channel's physical range (clipping like an ADC)."""
    low, high = spec.physical_range
    dmin, dmax = _DIGITAL_RANGE[file_format]
    scaled = (values.astype(np.float64 if file_format == "bdf" else np.float32) - low) * ((dmax - dmin) / (high - low))
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, dmax - dmin, out=scaled)
    return scaled.astype(np.int32) + dmin


def write_signals(
    path: Path,
    channels: Sequence[ChannelSpec],
    data: Sequence[np.ndarray],
    *,
    file_format: str,
    identity: HeaderIdentity,
    equipment: str,
) -> None:
    """Write one recording as EDF+C or BDF+C.

    Parameters
    ----------
    path : Path
        Output file.
    channels : sequence of ChannelSpec
        Label, rate (Hz), unit and physical range of each channel.
    data : sequence of numpy.ndarray
        Physical values in each channel's unit, ``seconds * rate_hz`` samples each.
    file_format : {"edf", "bdf"}
        16-bit EDF+ or 24-bit BDF+.
    identity : HeaderIdentity
        Fake patient/recording header fields and the start date-time.
    equipment : str
        Recording equipment written in the header.
    """
    seconds = data[0].size // channels[0].rate_hz
    for spec, values in zip(channels, data):
        if values.size != seconds * spec.rate_hz:
            raise ValueError(
                f"{path}: channel {spec.label!r} has {values.size} samples, "
                f"expected {seconds * spec.rate_hz} ({seconds} s at {spec.rate_hz} Hz)"
            )
    dmin, dmax = _DIGITAL_RANGE[file_format]
    writer = pyedflib.EdfWriter(str(path), len(channels), file_type=_FILE_TYPE[file_format])
    try:
        writer.setSignalHeaders(
            [
                {
                    "label": spec.label,
                    "dimension": spec.unit,
                    "sample_frequency": spec.rate_hz,
                    "physical_min": spec.physical_range[0],
                    "physical_max": spec.physical_range[1],
                    "digital_min": dmin,
                    "digital_max": dmax,
                    "transducer": "",
                    "prefilter": "",
                }
                for spec in channels
            ]
        )
        writer.setStartdatetime(identity.start)
        writer.setPatientName(identity.patient_name)
        writer.setPatientCode(identity.patient_code)
        writer.setBirthdate(identity.birthdate)
        writer.setSex(identity.sex)
        writer.setAdmincode(identity.admincode)
        writer.setTechnician(identity.technician)
        writer.setEquipment(equipment)
        # One 1-s data record holds rate_hz samples of every channel: write record by record
        # from one (records, samples-per-record) block instead of pyedflib's per-sample loop.
        block = np.concatenate(
            [
                _quantise(values, spec, file_format).reshape(seconds, spec.rate_hz)
                for spec, values in zip(channels, data)
            ],
            axis=1,
        )
        for record in np.ascontiguousarray(block):
            if writer.blockWriteDigitalSamples(record) < 0:
                raise OSError(f"{path}: pyedflib failed to write a data record")
    finally:
        writer.close()


# -- hypnograms ---------------------------------------------------------------------------
_RK_LABELS = {
    0: "Sleep stage W",
    1: "Sleep stage 1",
    2: "Sleep stage 2",
    3: "Sleep stage 3",
    4: "Sleep stage 4",
    5: "Sleep stage R",
    -1: "Movement time",
}
_AASM_LABELS = {
    W: "Sleep stage W",
    N1: "Sleep stage N1",
    N2: "Sleep stage N2",
    N3: "Sleep stage N3",
    REM: "Sleep stage R",
    -1: "Sleep stage ?",
}
_NSRR_RK = {
    0: "Wake|0",
    1: "Stage 1 sleep|1",
    2: "Stage 2 sleep|2",
    3: "Stage 3 sleep|3",
    4: "Stage 4 sleep|4",
    5: "REM sleep|5",
    -1: "Movement|6",
}
_CSV_LABELS = {W: "W", N1: "N1", N2: "N2", N3: "N3", REM: "REM", -1: "?"}


def _runs(codes: np.ndarray) -> list[tuple[int, int, int]]:
    """(code, first epoch, epoch count) of each run of equal codes."""
    edges = np.flatnonzero(np.diff(codes)) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [codes.size]])
    return [(int(codes[a]), int(a), int(b - a)) for a, b in zip(starts, stops)]


def write_edf_hypnogram(path: Path, hypnogram: NightHypnogram, *, style: str, identity: HeaderIdentity) -> None:
    """Annotation-only EDF+ hypnogram: ``edf_rk`` (Sleep-EDF wording, runs merged) or ``edf_aasm``.

    Like real scoring exports, the header repeats the recording's patient fields.
    """
    writer = pyedflib.EdfWriter(str(path), 0, file_type=pyedflib.FILETYPE_EDFPLUS)
    try:
        writer.setStartdatetime(identity.start)
        writer.setPatientName(identity.patient_name)
        writer.setPatientCode(identity.patient_code)
        writer.setBirthdate(identity.birthdate)
        writer.setSex(identity.sex)
        seconds = hypnogram.epochs * EPOCH_SECONDS
        if style == "edf_rk":
            for code, first, count in _runs(hypnogram.rk_stages()):
                writer.writeAnnotation(first * EPOCH_SECONDS, count * EPOCH_SECONDS, _RK_LABELS[code])
            # Sleep-EDF ends with an unscored tail.
            writer.writeAnnotation(seconds, EPOCH_SECONDS, "Sleep stage ?")
        elif style == "edf_aasm":
            writer.writeAnnotation(0, -1, "Lights off")
            for epoch, code in enumerate(hypnogram.stages):
                writer.writeAnnotation(epoch * EPOCH_SECONDS, EPOCH_SECONDS, _AASM_LABELS[int(code)])
            writer.writeAnnotation(seconds, -1, "Lights on")
        else:
            raise ValueError(f"{path}: EDF hypnogram style must be 'edf_rk' or 'edf_aasm', found {style!r}")
    finally:
        writer.close()


def write_nsrr_xml(
    path: Path, night: Night, *, start: dt.datetime, rk: bool, spo2_label: str, airflow_label: str
) -> None:
    """NSRR XML: staging runs (R&K concepts when ``rk``) plus respiratory events and desaturations."""
    hypnogram = night.hypnogram
    codes = hypnogram.rk_stages() if rk else np.where(hypnogram.stages == REM, 5, hypnogram.stages)
    seconds = hypnogram.epochs * EPOCH_SECONDS
    lines = [
        '<?xml version="1.0" encoding="UTF-8" standalone="no"?>',
        "<PSGAnnotation>",
        "<SoftwareVersion>Compumedics</SoftwareVersion>",
        "<EpochLength>30</EpochLength>",
        "<ScoredEvents>",
    ]

    def event(kind: str, concept: str, onset: float, duration: float, extra: str = "") -> None:
        lines.append(
            f"<ScoredEvent><EventType>{kind}</EventType><EventConcept>{concept}</EventConcept>"
            f"<Start>{onset:.1f}</Start><Duration>{duration:.1f}</Duration>{extra}</ScoredEvent>"
        )

    lines.append(
        "<ScoredEvent><EventType/><EventConcept>Recording Start Time</EventConcept>"
        f"<Start>0</Start><Duration>{seconds:.1f}</Duration>"
        f"<ClockTime>00.00.00 {start:%H.%M.%S}</ClockTime></ScoredEvent>"
    )
    for code, first, count in _runs(codes):
        event("Stages|Stages", _NSRR_RK[code], first * EPOCH_SECONDS, count * EPOCH_SECONDS)
    for onset, duration, kind, depth in zip(
        night.event_onsets_s, night.event_durations_s, night.event_kinds, night.event_desaturations
    ):
        name = EVENT_NAMES[int(kind)]
        event(
            "Respiratory|Respiratory",
            f"{name}|{name}",
            onset,
            duration,
            f"<SignalLocation>{airflow_label}</SignalLocation>",
        )
        event(
            "Respiratory|Respiratory",
            "SpO2 desaturation|SpO2 desaturation",
            onset + 10.0,
            duration + 15.0,
            f"<SignalLocation>{spo2_label}</SignalLocation>"
            f"<SpO2Nadir>{night.subject.spo2_baseline - depth:.0f}</SpO2Nadir>"
            f"<SpO2Baseline>{night.subject.spo2_baseline:.0f}</SpO2Baseline>",
        )
    for onset, duration in zip(night.arousal_onsets_s, night.arousal_durations_s):
        event("Arousals|Arousals", "Arousal|Arousal ()", onset, duration)
    lines += ["</ScoredEvents>", "</PSGAnnotation>", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_stage_csv(path: Path, hypnogram: NightHypnogram) -> None:
    """CSV hypnogram: header ``stage``, then one of W/N1/N2/N3/REM/? per 30-s epoch from lights-off."""
    rows = ["stage"] + [_CSV_LABELS[int(code)] for code in hypnogram.stages]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


# -- metadata and site config ---------------------------------------------------------------
def write_metadata_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A site's metadata table (never carries header PHI: only ids, age, sex, outcomes, extras)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle, lineterminator="\n")
        out.writerow(header)
        out.writerows(rows)


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def site_config_toml(name: str, archetype: SiteArchetype) -> str:
    """The ``site.toml`` that lets the ingest read a site written from ``archetype``."""
    meta = archetype.metadata
    channels = {
        c.label: c.modality
        for c in archetype.channels
        if c.modality is not None and match_channel(c.label) != c.modality
    }
    ignored = [c.label for c in archetype.channels if c.modality is None]
    lines = [
        f"# Synthetic site written by `s2v synth` from the {archetype.key!r} archetype:",
        f"# {archetype.description}",
        f"name = {_toml_string(name)}",
        "signals = [" + ", ".join(_toml_string(g) for g in archetype.signal_globs) + "]",
        f"key_regex = {_toml_string(archetype.key_regex)}",
        "ignore_channels = [" + ", ".join(_toml_string(label) for label in ignored) + "]",
        "",
        "[channels]  # labels the modality registry does not know",
    ]
    lines += [f"{_toml_string(label)} = {_toml_string(key)}" for label, key in channels.items()]
    lines += [
        "",
        "[hypnogram]",
        f"format = {_toml_string(archetype.hypnogram_format)}",
        f"pattern = {_toml_string(archetype.hypnogram_pattern)}",
        f"epoch_seconds = {float(EPOCH_SECONDS)}",
        "",
        "[metadata]",
        f"file = {_toml_string(meta.file)}",
        f"key_column = {_toml_string(meta.key_column)}",
    ]
    if meta.subject_column:
        lines.append(f"subject_column = {_toml_string(meta.subject_column)}")
    lines += [
        f"age_column = {_toml_string(meta.age_column)}",
        f"sex_column = {_toml_string(meta.sex_column)}",
        f"sex_values = {{ {_toml_string(meta.female_value)} = 0, {_toml_string(meta.male_value)} = 1 }}",
        "",
        "[metadata.outcomes]",
        f"ahi = {_toml_string(meta.ahi_column)}",
        f"hypertension = {_toml_string(meta.hypertension_column)}",
        "",
    ]
    return "\n".join(lines)
