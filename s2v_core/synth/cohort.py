"""Write a synthetic multi-site PSG cohort: ``OUT/<site>/`` with signals, hypnograms, metadata, site.toml.

Usage::

    from s2v_core.synth import write_cohort
    summary = write_cohort("cohort", sites=3, recordings_per_site=4, hours=1.0, seed=0)
    summary.sites[0].site_config        # OUT/shhs_like/site.toml
    summary.phi                         # fake names/codes written into EDF headers

Randomness is derived from ``seed`` per site and recording
(``numpy.random.SeedSequence(seed, spawn_key=(site, recording, stream))``):
the same seed writes identical bytes, and a recording does not change when
more sites or recordings are asked for.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from s2v_core.io.site_config import SiteConfig
from s2v_core.modalities import EPOCH_SECONDS
from s2v_core.synth import signals as sig
from s2v_core.synth.cardiorespiratory import Cardiorespiratory, auxiliary
from s2v_core.synth.night import Night, Subject, draw_subject, simulate_night
from s2v_core.synth.physiology import Electrophysiology
from s2v_core.synth.sites import ChannelSpec, SiteArchetype, resolve_archetypes, site_names
from s2v_core.synth.writers import (
    HeaderIdentity,
    site_config_toml,
    write_edf_hypnogram,
    write_metadata_csv,
    write_nsrr_xml,
    write_signals,
    write_stage_csv,
)

log = logging.getLogger(__name__)

_GIVEN = (
    "Jane",
    "John",
    "Maria",
    "Ahmed",
    "Yuki",
    "Olga",
    "Pierre",
    "Amara",
    "Lars",
    "Chen",
    "Fatima",
    "Diego",
    "Ingrid",
    "Kwame",
    "Sofia",
    "Ravi",
    "Hanna",
    "Tomasz",
    "Leila",
    "Mateo",
)
_FAMILY = (
    "Doe",
    "Smith",
    "Moreau",
    "Nakamura",
    "Okafor",
    "Lindqvist",
    "Kowalski",
    "Haddad",
    "Garcia",
    "Jansen",
    "Ivanova",
    "Mensah",
    "Rossi",
    "Patel",
    "Schmidt",
    "Fernandes",
    "Novak",
    "Dubois",
)
_HYPNOGRAM_LETTERS = "CHJMPRVW"
_ELECTRO = ("eeg", "eog", "emg")


@dataclass(frozen=True)
class RecordingSummary:
    """One written night. ``identity`` holds the fake header PHI (never in metadata or site.toml)."""

    key: str
    subject: str
    signal_path: Path
    hypnogram_path: Path
    hours: float
    age: float
    sex: int
    ahi: float
    identity: HeaderIdentity


@dataclass(frozen=True)
class SiteSummary:
    """One written site directory."""

    name: str
    archetype: str
    directory: Path
    site_config: Path
    metadata_path: Path
    recordings: tuple[RecordingSummary, ...]


@dataclass(frozen=True)
class CohortSummary:
    """What :func:`write_cohort` wrote, and how fast."""

    root: Path
    sites: tuple[SiteSummary, ...]
    # Recording hours written (sum of night lengths).
    hours_written: float
    # Wall-clock seconds the whole cohort took (reporting only; never written to a file).
    seconds: float

    @property
    def hours_per_second(self) -> float:
        """Write rate in recording-hours per wall-clock second."""
        return self.hours_written / self.seconds if self.seconds > 0 else float("inf")

    @property
    def recordings(self) -> tuple[RecordingSummary, ...]:
        """All recordings of all sites."""
        return tuple(r for s in self.sites for r in s.recordings)

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file of the written site directories, sorted."""
        return tuple(sorted(p for s in self.sites for p in s.directory.iterdir() if p.is_file()))

    @property
    def phi(self) -> tuple[str, ...]:
        """Every fake identifying string written into a header: a de-identified store holds none."""
        return tuple(dict.fromkeys(s for r in self.recordings for s in r.identity.phi))


def _stream(seed: int, site: int, recording: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(site, recording, stream)))


def fake_identity(*, seed: int, site: int, recording: int) -> HeaderIdentity:
    """The fake patient header of recording ``recording`` of site ``site`` (0-based) under ``seed``.

    Deterministic, so a de-identification test can recompute what it must not find.
    """
    rng = _stream(seed, site, recording, 1)
    birth = dt.date(1925, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 80)))
    start = dt.datetime(1995, 1, 1, 21, 0, 0) + dt.timedelta(
        days=int(rng.integers(0, 365 * 25)), minutes=int(rng.integers(0, 150))
    )
    return HeaderIdentity(
        patient_name=f"{_FAMILY[rng.integers(len(_FAMILY))]}_{_GIVEN[rng.integers(len(_GIVEN))]}",
        patient_code=f"MRN{int(rng.integers(10**6, 10**7))}",
        birthdate=birth,
        sex=int(rng.integers(0, 2)),
        admincode=f"HOSP{int(rng.integers(1000, 9999))}",
        technician=f"Tech_{_FAMILY[rng.integers(len(_FAMILY))]}",
        start=start,
    )


def _draw_person(archetype: SiteArchetype, rng: np.random.Generator) -> tuple[float, int, float, float]:
    """Age (y), sex (0 F/1 M), AHI (events/h) and BMI of a subject recorded at this site."""
    pop = archetype.population
    age = float(np.clip(rng.normal(pop.age_mean, pop.age_sd), *pop.age_range))
    sex = int(rng.random() < pop.male_fraction)
    # Apnoea is commoner in men, with age and with BMI.
    bmi = float(np.clip(rng.normal(27.5 + 0.5 * sex, 4.5), 17.0, 50.0))
    log_ahi = np.log(pop.ahi_median) + 0.25 * sex + 0.01 * (age - pop.age_mean) + 0.05 * (bmi - 27.5)
    ahi = float(np.clip(rng.lognormal(log_ahi, pop.ahi_log_sd), 0.2, 90.0))
    return age, sex, ahi, bmi


def render_channels(archetype: SiteArchetype, night: Night, rng: np.random.Generator) -> list[np.ndarray]:
    """Physical signals of every channel of ``archetype`` for ``night``, in each channel's unit."""
    electro = Electrophysiology(night, rng)
    cardio = Cardiorespiratory(night, rng)
    data = []
    for spec in archetype.channels:
        data.append(_render(spec, archetype, night, electro, cardio, rng))
    return data


def _render(
    spec: ChannelSpec,
    archetype: SiteArchetype,
    night: Night,
    electro: Electrophysiology,
    cardio: Cardiorespiratory,
    rng: np.random.Generator,
) -> np.ndarray:
    rate, kind = spec.rate_hz, spec.kind
    samples = night.seconds * rate
    if kind == "eeg":
        values = electro.eeg(spec.location, rate) * archetype.eeg_scale
    elif kind == "eog":
        values = electro.eog(spec.location, rate) * archetype.eeg_scale
    elif kind == "emg":
        values = electro.emg(rate)
    elif kind == "emg_envelope":
        values = electro.emg_envelope(rate)
    elif kind == "ecg":
        values = cardio.ecg(rate) * (1000.0 if spec.unit.lower() == "uv" else 1.0)
    elif kind == "hr":
        values = cardio.hr(rate)
    elif kind == "spo2":
        values = cardio.spo2(rate)
    elif kind in ("airflow", "thorax", "abdomen"):
        values = cardio.respiration(kind, rate)
    else:
        values = auxiliary(kind, night, rate, rng)
    if kind in _ELECTRO or kind == "ecg":
        scale = 1e-3 if spec.unit.lower() == "mv" else 1.0
        values = values + sig.mains(samples, rate, archetype.mains_hz, archetype.mains_uv * scale, rng)
    if kind in _ELECTRO:
        _add_artefacts(values, rate, night, archetype, rng)
    values = np.asarray(values, dtype=np.float32)
    values *= np.float32(spec.gain)
    values += np.float32(spec.offset)
    return values


def _add_artefacts(
    values: np.ndarray, rate: int, night: Night, archetype: SiteArchetype, rng: np.random.Generator
) -> None:
    """Electrode pops, movement bursts and flat (disconnected) stretches, in place."""
    hours = night.seconds / 3600.0
    tau = np.arange(int(3 * rate)) / rate
    for onset in rng.uniform(0, night.seconds - 4, rng.poisson(0.5 * hours)):
        start = int(onset * rate)
        stop = min(start + tau.size, values.size)
        values[start:stop] += (
            rng.choice([-1, 1]) * rng.uniform(100, 400) * np.exp(-tau[: stop - start] / rng.uniform(0.2, 0.8))
        )
    for epoch in np.flatnonzero(night.hypnogram.stages < 0):
        start, stop = epoch * EPOCH_SECONDS * rate, (epoch + 1) * EPOCH_SECONDS * rate
        values[start:stop] += np.cumsum(rng.standard_normal(stop - start)) * (30.0 / np.sqrt(rate))
    if rng.random() < archetype.flat_segment_probability:
        length = int(rng.uniform(10, 120) * rate)
        start = int(rng.uniform(0, max(values.size - length, 1)))
        values[start : start + length] = 0.0


def _metadata_row(
    archetype: SiteArchetype,
    key: str,
    subject: str,
    night_number: int,
    person,
    night: Night,
    rng: np.random.Generator,
    start: dt.datetime,
) -> list[object]:
    age, sex, _, bmi = person
    meta = archetype.metadata
    ahi = night.event_onsets_s.size / night.sleep_hours if night.sleep_hours > 0 else 0.0
    # Hypertension rises with age, AHI and male sex (logistic, population-level odds).
    logit = -3.2 + 0.055 * (age - 40.0) + 0.025 * ahi + 0.3 * sex + 0.06 * (bmi - 27.5)
    hypertension = int(rng.random() < 1.0 / (1.0 + np.exp(-logit)))
    row: dict[str, object] = {meta.key_column: key}
    if meta.subject_column:
        row[meta.subject_column] = subject
    row[meta.age_column] = int(age) if archetype.key == "sleepedf_like" else round(age, 1)
    row[meta.sex_column] = meta.male_value if sex == 1 else meta.female_value
    row[meta.ahi_column] = round(ahi, 2)
    row[meta.hypertension_column] = hypertension
    extras = {
        "bmi_s1": round(bmi, 1),
        "bmi5c": round(bmi, 1),
        "bmi": round(bmi, 1),
        "race1c": int(rng.integers(1, 5)),
        "epworth": int(rng.integers(0, 25)),
        "night": night_number,
        "lights_off": f"{start:%H:%M:%S}",
    }
    for column in meta.extra_columns:
        row[column] = extras[column]
    return list(row.values())


def _metadata_header(archetype: SiteArchetype) -> list[str]:
    meta = archetype.metadata
    header = [meta.key_column] + ([meta.subject_column] if meta.subject_column else [])
    return header + [meta.age_column, meta.sex_column, meta.ahi_column, meta.hypertension_column, *meta.extra_columns]


def _names(archetype: SiteArchetype, recording: int, rng: np.random.Generator) -> dict[str, object]:
    nights = archetype.population.nights_per_subject
    subject_number = archetype.first_subject_id + recording // nights
    return {
        "subject": subject_number,
        "night": recording % nights + 1,
        "index": recording + 1,
        "letter": _HYPNOGRAM_LETTERS[int(rng.integers(len(_HYPNOGRAM_LETTERS)))],
    }


def _check_site_directory(
    directory: Path, archetype: SiteArchetype, *, site_index: int, recordings: int, seed: int
) -> list[dict[str, object]]:
    """File-name fields of every recording; refuse a directory holding files this run would not write."""
    if recordings > archetype.max_recordings:
        raise ValueError(
            f"recordings_per_site: the {archetype.key} naming convention holds at most "
            f"{archetype.max_recordings} recordings, found {recordings}"
        )
    all_names = [_names(archetype, r, _stream(seed, site_index, r, 2)) for r in range(recordings)]
    planned = {archetype.signal_name.format(**n) for n in all_names}
    planned |= {archetype.hypnogram_name.format(**n) for n in all_names}
    planned |= {archetype.metadata.file, "site.toml"}
    if directory.is_dir():
        # A stale recording of an earlier, larger run would be ingested as part of the site.
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in planned)
        if foreign:
            raise ValueError(
                f"{directory}: expected an empty or earlier `s2v synth` site directory, found "
                f"other files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                "remove them or write to another OUT"
            )
    return all_names


def write_site(
    directory: Path, name: str, archetype: SiteArchetype, *, site_index: int, recordings: int, hours: float, seed: int
) -> SiteSummary:
    """Write one site (signals, hypnograms, metadata, site.toml) into ``directory``.

    Files of an earlier run with the same names are overwritten; any other file
    in ``directory`` is an error (it would be ingested as part of the site).
    """
    all_names = _check_site_directory(directory, archetype, site_index=site_index, recordings=recordings, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    epochs = max(int(round(hours * 3600 / EPOCH_SECONDS)), 1)
    summaries, rows = [], []
    persons: dict[int, tuple] = {}
    for recording, names in enumerate(all_names):
        subject_index = recording // archetype.population.nights_per_subject
        if subject_index not in persons:  # nights of one subject share age, sex and BMI
            persons[subject_index] = _draw_person(archetype, _stream(seed, site_index, 10_000 + subject_index, 0))
        age, sex, ahi, bmi = persons[subject_index]
        rng = _stream(seed, site_index, recording, 0)
        subject = draw_subject(age=age, sex=sex, ahi=ahi * rng.lognormal(0.0, 0.2), rng=rng)
        night = simulate_night(subject, epochs=epochs, rng=rng)
        identity = fake_identity(seed=seed, site=site_index, recording=recording)
        signal_path = directory / archetype.signal_name.format(**names)
        hypnogram_path = directory / archetype.hypnogram_name.format(**names)
        data = render_channels(archetype, night, rng)
        write_signals(
            signal_path,
            archetype.channels,
            data,
            file_format=archetype.signal_format,
            identity=identity,
            equipment=archetype.equipment,
        )
        _write_hypnogram(hypnogram_path, archetype, night, identity)
        config = SiteConfig(name=name, key_regex=archetype.key_regex)
        key = config.recording_key(signal_path)
        subject_id = f"P{names['subject']:03d}" if archetype.key == "wearable_like" else str(names["subject"])
        rows.append(
            _metadata_row(
                archetype,
                key,
                subject_id,
                int(names["night"]),
                (age, sex, ahi, bmi),
                night,
                _stream(seed, site_index, recording, 3),
                identity.start,
            )
        )
        summaries.append(
            RecordingSummary(
                key=key,
                subject=subject_id,
                signal_path=signal_path,
                hypnogram_path=hypnogram_path,
                hours=night.seconds / 3600.0,
                age=age,
                sex=sex,
                ahi=float(rows[-1][_metadata_header(archetype).index(archetype.metadata.ahi_column)]),
                identity=identity,
            )
        )
        log.debug("site %s: wrote %s (%.2f h)", name, signal_path.name, night.seconds / 3600.0)
    metadata_path = directory / archetype.metadata.file
    write_metadata_csv(metadata_path, _metadata_header(archetype), rows)
    site_config = directory / "site.toml"
    site_config.write_text(site_config_toml(name, archetype), encoding="utf-8")
    return SiteSummary(
        name=name,
        archetype=archetype.key,
        directory=directory,
        site_config=site_config,
        metadata_path=metadata_path,
        recordings=tuple(summaries),
    )


def _write_hypnogram(path: Path, archetype: SiteArchetype, night: Night, identity: HeaderIdentity) -> None:
    style = archetype.hypnogram_style
    start = identity.start
    if style in ("edf_rk", "edf_aasm"):
        write_edf_hypnogram(path, night.hypnogram, style=style, identity=identity)
    elif style == "nsrr_xml":
        label = next((c.label for c in archetype.channels if c.kind == "spo2"), "SpO2")
        airflow = next((c.label for c in archetype.channels if c.kind == "airflow"), "Airflow")
        # SHHS-1 was scored with R&K (stage 4 kept in NSRR XML); MESA with AASM.
        write_nsrr_xml(
            path, night, start=start, rk=archetype.key == "shhs_like", spo2_label=label, airflow_label=airflow
        )
    else:
        write_stage_csv(path, night.hypnogram)


def write_cohort(
    out: str | Path,
    *,
    sites: int = 3,
    recordings_per_site: int = 4,
    hours: float = 1.0,
    seed: int = 0,
    archetypes: tuple[str, ...] | None = None,
) -> CohortSummary:
    """Write a synthetic multi-site PSG cohort under ``out``.

    Parameters
    ----------
    out : str or Path
        Output directory; one sub-directory per site (``OUT/<site>/``) is created.
    sites : int
        Number of sites. Archetypes are used in turn (``shhs_like``, ``mesa_like``,
        ``sleepedf_like``, ``hst_like``, ``wearable_like``, ``psg_512``), repeats get
        ``_2``, ``_3``… suffixes.
    recordings_per_site : int
        Nights per site.
    hours : float
        Length of each night in hours (rounded to whole 30-s epochs).
    seed : int
        Seed of everything; the same seed writes identical bytes.
    archetypes : tuple of str, optional
        Archetype keys to cycle through instead of the default cycle, e.g.
        ``("psg_512",)`` for full-montage nights with 512-Hz EEG.

    Returns
    -------
    CohortSummary
        Sites, files, fake header identities, hours written and write rate.
    """
    if recordings_per_site < 1:
        raise ValueError(f"recordings_per_site must be >= 1, found {recordings_per_site}")
    if not hours * 3600 >= EPOCH_SECONDS:
        raise ValueError(f"hours must cover at least one 30-s epoch, found {hours}")
    root = Path(out)
    chosen = resolve_archetypes(sites, archetypes)
    names = site_names(tuple(a.key for a in chosen))
    for index, (name, archetype) in enumerate(zip(names, chosen)):  # check every site before writing any
        _check_site_directory(root / name, archetype, site_index=index, recordings=recordings_per_site, seed=seed)
    started = time.perf_counter()
    written = []
    for index, (name, archetype) in enumerate(zip(names, chosen)):
        written.append(
            write_site(
                root / name, name, archetype, site_index=index, recordings=recordings_per_site, hours=hours, seed=seed
            )
        )
        log.info("site %s (%s): %d recordings", name, archetype.key, recordings_per_site)
    total_hours = sum(r.hours for s in written for r in s.recordings)
    return CohortSummary(
        root=root, sites=tuple(written), hours_written=total_hours, seconds=time.perf_counter() - started
    )


__all__ = [
    "CohortSummary",
    "RecordingSummary",
    "SiteSummary",
    "Subject",
    "fake_identity",
    "render_channels",
    "write_cohort",
    "write_site",
]
