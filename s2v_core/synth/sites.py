"""Site archetypes: the montage, file conventions and population of each synthetic site.

Real cohorts differ in more than their patients: channel names, sampling
rates, amplifier gains and offsets, mains frequency, file formats, hypnogram
wording and the age/sex mix of who gets recorded. Those differences are
shortcuts a model could learn instead of physiology, so the generator makes
them on purpose. Each :class:`SiteArchetype` is modelled on a public cohort
(SHHS, MESA, Sleep-EDF, a home sleep test, a consumer wearable, HMC-like
high-resolution PSG); channel labels and rates follow what those cohorts
actually write.

``kind`` of a :class:`ChannelSpec` names the generator that fills it (see
:mod:`s2v_core.synth.physiology` and :mod:`s2v_core.synth.cardiorespiratory`);
``modality`` is the registry key the ingest must map the label to, or
``None`` for channels a site records but the store does not use (position,
light, temperature, snore), which the site config lists as ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Generators a channel can be filled by.
CHANNEL_KINDS = (
    "eeg",
    "eog",
    "emg",
    "emg_envelope",
    "ecg",
    "hr",
    "spo2",
    "airflow",
    "thorax",
    "abdomen",
    "position",
    "light",
    "temperature",
    "snore",
    "activity",
    "marker",
)
#: Hypnogram conventions a site can write (wording differs, the format name is the site config's).
HYPNOGRAM_STYLES = ("nsrr_xml", "edf_rk", "edf_aasm", "csv")


@dataclass(frozen=True)
class ChannelSpec:
    """One channel as a site records it.

    Parameters
    ----------
    label : str
        Label written in the EDF/BDF header (at most 16 characters).
    kind : str
        Generator of the signal, one of :data:`CHANNEL_KINDS`.
    rate_hz : int
        Sampling rate in Hz (integer so that 1-s data records hold whole samples).
    unit : str
        Physical dimension written in the header (``uV``, ``mV``, ``%``, ``bpm``).
    physical_range : tuple of float
        ``(min, max)`` in ``unit``; the signal is clipped to it, as an amplifier would.
    modality : str or None
        Registry key the label maps to; ``None`` for channels the store ignores.
    location : str
        Scalp region of EEG/EOG electrodes: ``frontal``, ``central``, ``occipital``;
        for EOG ``left``/``right`` sets the polarity of horizontal eye movements.
    gain : float
        Site amplifier gain relative to the physiological amplitude (a shortcut cue).
    offset : float
        DC offset in ``unit`` added by the site's amplifier (a shortcut cue).
    """

    label: str
    kind: str
    rate_hz: int
    unit: str
    physical_range: tuple[float, float]
    modality: str | None
    location: str = "central"
    gain: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in CHANNEL_KINDS:
            raise ValueError(f"channel {self.label!r}: kind {self.kind!r} not in {CHANNEL_KINDS}")
        if len(self.label) > 16:
            raise ValueError(f"channel {self.label!r}: EDF labels hold at most 16 characters")
        if self.rate_hz < 1:
            raise ValueError(f"channel {self.label!r}: rate_hz must be >= 1, found {self.rate_hz}")


@dataclass(frozen=True)
class Population:
    """Who a site records: age, sex and sleep-apnoea severity distributions."""

    # Mean and standard deviation of age in years (normal, clipped to age_range).
    age_mean: float
    age_sd: float
    age_range: tuple[float, float]
    # Fraction of male participants.
    male_fraction: float
    # Median AHI in events/h; AHI is log-normal around it (sd of log below).
    ahi_median: float
    ahi_log_sd: float = 1.0
    # Nights per subject (Sleep-EDF and wearables record several nights of one person).
    nights_per_subject: int = 1


@dataclass(frozen=True)
class MetadataLayout:
    """Column names and codes of a site's metadata CSV (mirrors ``[metadata]`` of site.toml)."""

    file: str
    key_column: str
    age_column: str
    sex_column: str
    # Raw value written for female and male (site coding differs: 1/2, F/M, 0/1).
    female_value: str
    male_value: str
    ahi_column: str
    hypertension_column: str
    subject_column: str | None = None
    # Extra per-subject columns written but not mapped (BMI etc.), as real tables have.
    extra_columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class SiteArchetype:
    """Everything that makes a synthetic site look like a real one."""

    key: str
    description: str
    channels: tuple[ChannelSpec, ...]
    # "edf" (EDF+C, 16 bit) or "bdf" (BDF+C, 24 bit).
    signal_format: str
    hypnogram_style: str
    mains_hz: int
    # Amplitude of mains interference on electrophysiology in uV (site wiring).
    mains_uv: float
    # Site-wide amplitude scale of EEG/EOG (electrode type, filters): a shortcut cue.
    eeg_scale: float
    population: Population
    metadata: MetadataLayout
    # File-naming conventions; formatted with {subject}, {night}, {index}, {letter}.
    signal_name: str
    hypnogram_name: str
    # Site config fields: signal globs, key regex, hypnogram pattern (relative to the site dir).
    signal_globs: tuple[str, ...]
    key_regex: str
    hypnogram_pattern: str
    # Subject ids start here (SHHS ids are 2000xx, MESA 4 digits, ...).
    first_subject_id: int = 1
    # Most recordings per site the naming convention can hold (SC4{subject:02d}{night}: 100 subjects x 2).
    max_recordings: int = 999
    equipment: str = "PSG"
    # Probability per channel and night of a flat (disconnected) segment.
    flat_segment_probability: float = 0.15

    def __post_init__(self) -> None:
        if self.signal_format not in ("edf", "bdf"):
            raise ValueError(f"archetype {self.key}: signal_format must be 'edf' or 'bdf'")
        if self.hypnogram_style not in HYPNOGRAM_STYLES:
            raise ValueError(f"archetype {self.key}: hypnogram_style not in {HYPNOGRAM_STYLES}")
        labels = [c.label for c in self.channels]
        if len(set(labels)) != len(labels):
            raise ValueError(f"archetype {self.key}: duplicate channel labels {labels}")

    @property
    def hypnogram_format(self) -> str:
        """The site config's ``[hypnogram].format`` for this archetype."""
        return {"nsrr_xml": "nsrr_xml", "edf_rk": "edf_annotations", "edf_aasm": "edf_annotations", "csv": "csv"}[
            self.hypnogram_style
        ]


def _ch(label, kind, rate, unit, lo, hi, modality, location="central", gain=1.0, offset=0.0):
    return ChannelSpec(label, kind, rate, unit, (float(lo), float(hi)), modality, location, gain, offset)


SHHS_LIKE = SiteArchetype(
    key="shhs_like",
    description="SHHS-1-like in-home PSG (Compumedics P-Series): 125 Hz EEG, 50 Hz EOG, 10 Hz respiration, 60 Hz mains",
    channels=(
        _ch("SaO2", "spo2", 1, "%", 0, 100, "spo2"),
        _ch("H.R.", "hr", 1, "bpm", 0, 250, "hr"),
        _ch("EEG(sec)", "eeg", 125, "uV", -125, 125, "eeg", "central", gain=1.1),
        _ch("ECG", "ecg", 125, "mV", -1.25, 1.25, "ecg"),
        _ch("EMG", "emg", 125, "uV", -31.5, 31.5, "emg"),
        _ch("EOG(L)", "eog", 50, "uV", -125, 125, "eog", "left"),
        _ch("EOG(R)", "eog", 50, "uV", -125, 125, "eog", "right"),
        _ch("EEG", "eeg", 125, "uV", -125, 125, "eeg", "central", gain=1.1, offset=3.0),
        _ch("THOR RES", "thorax", 10, "", -1, 1, "thorax"),
        _ch("ABDO RES", "abdomen", 10, "", -1, 1, "abdomen"),
        _ch("POSITION", "position", 1, "", 0, 3, None),
        _ch("LIGHT", "light", 1, "", 0, 1, None),
        _ch("NEW AIR", "airflow", 10, "", -1, 1, "airflow"),
        _ch("OX stat", "marker", 1, "", 0, 3, None),
    ),
    signal_format="edf",
    hypnogram_style="nsrr_xml",
    mains_hz=60,
    mains_uv=4.0,
    eeg_scale=1.0,
    population=Population(age_mean=63, age_sd=11, age_range=(40, 90), male_fraction=0.47, ahi_median=9.0),
    metadata=MetadataLayout(
        file="shhs1-dataset.csv",
        key_column="nsrrid",
        age_column="age_s1",
        sex_column="gender",
        female_value="2",
        male_value="1",
        ahi_column="ahi_a0h3",
        hypertension_column="htnderv_s1",
        extra_columns=("bmi_s1",),
    ),
    signal_name="shhs1-{subject}.edf",
    hypnogram_name="shhs1-{subject}-nsrr.xml",
    signal_globs=("shhs1-*.edf",),
    key_regex=r"^shhs1-(?P<key>\d+)$",
    hypnogram_pattern="{stem}-nsrr.xml",
    first_subject_id=200001,
    max_recordings=99999,
    equipment="Compumedics_P",
)

MESA_LIKE = SiteArchetype(
    key="mesa_like",
    description="MESA-Sleep-like in-home PSG (Compumedics Somte): 256 Hz EEG/EOG/EMG/EKG, 32 Hz respiration, 60 Hz mains",
    channels=(
        _ch("EKG", "ecg", 256, "mV", -2.5, 2.5, "ecg"),
        _ch("EOG-L", "eog", 256, "uV", -250, 250, "eog", "left", gain=0.9),
        _ch("EOG-R", "eog", 256, "uV", -250, 250, "eog", "right", gain=0.9),
        _ch("EMG", "emg", 256, "uV", -100, 100, "emg", gain=1.3),
        _ch("EEG1", "eeg", 256, "uV", -250, 250, "eeg", "frontal", gain=0.9),
        _ch("EEG2", "eeg", 256, "uV", -250, 250, "eeg", "occipital", gain=0.9),
        _ch("EEG3", "eeg", 256, "uV", -250, 250, "eeg", "central", gain=0.9, offset=-5.0),
        _ch("Pres", "airflow", 32, "cmH2O", -2, 2, "airflow"),
        _ch("Flow", "airflow", 32, "", -1, 1, "airflow"),
        _ch("Snore", "snore", 32, "", -1, 1, None),
        _ch("Thor", "thorax", 32, "", -2, 2, "thorax"),
        _ch("Abdo", "abdomen", 32, "", -2, 2, "abdomen"),
        _ch("Pos", "position", 32, "", 0, 4, None),
        _ch("SpO2", "spo2", 1, "%", 0, 100, "spo2", offset=0.5),
        _ch("HR", "hr", 1, "bpm", 0, 200, "hr"),
    ),
    signal_format="edf",
    hypnogram_style="nsrr_xml",
    mains_hz=60,
    mains_uv=6.0,
    eeg_scale=0.9,
    population=Population(age_mean=69, age_sd=9, age_range=(54, 94), male_fraction=0.46, ahi_median=13.0),
    metadata=MetadataLayout(
        file="mesa-sleep-dataset.csv",
        key_column="mesaid",
        age_column="sleepage5c",
        sex_column="gender1",
        female_value="0",
        male_value="1",
        ahi_column="ahiu35",
        hypertension_column="htn5c",
        extra_columns=("bmi5c", "race1c"),
    ),
    signal_name="mesa-sleep-{subject}.edf",
    hypnogram_name="mesa-sleep-{subject}-nsrr.xml",
    signal_globs=("mesa-sleep-*.edf",),
    key_regex=r"^mesa-sleep-(?P<key>\d+)$",
    hypnogram_pattern="{stem}-nsrr.xml",
    first_subject_id=1001,
    max_recordings=8999,
    equipment="Somte_PSG",
)

SLEEPEDF_LIKE = SiteArchetype(
    key="sleepedf_like",
    description="Sleep-EDF SC-like ambulatory PSG: 100 Hz Fpz-Cz/Pz-Oz EEG, 1 Hz EMG envelope and respiration, R&K hypnogram, 50 Hz mains",
    channels=(
        _ch("EEG Fpz-Cz", "eeg", 100, "uV", -192, 192, "eeg", "frontal", gain=0.7),
        _ch("EEG Pz-Oz", "eeg", 100, "uV", -197, 197, "eeg", "occipital", gain=0.6),
        _ch("EOG horizontal", "eog", 100, "uV", -1000, 1000, "eog", "left"),
        _ch("Resp oro-nasal", "airflow", 1, "", -2048, 2047, "airflow", gain=600.0),
        _ch("EMG submental", "emg_envelope", 1, "uV", 0, 100, "emg"),
        _ch("Temp rectal", "temperature", 1, "DegC", 34, 40, None),
        _ch("Event marker", "marker", 1, "", -2048, 2047, None),
    ),
    signal_format="edf",
    hypnogram_style="edf_rk",
    mains_hz=50,
    mains_uv=0.0,
    eeg_scale=1.0,
    population=Population(
        age_mean=55,
        age_sd=20,
        age_range=(25, 101),
        male_fraction=0.45,
        ahi_median=3.0,
        ahi_log_sd=0.8,
        nights_per_subject=2,
    ),
    metadata=MetadataLayout(
        file="SC-subjects.csv",
        key_column="record",
        subject_column="subject",
        age_column="age",
        sex_column="sex",
        female_value="1",
        male_value="2",
        ahi_column="ahi",
        hypertension_column="hypertension",
        extra_columns=("night", "lights_off"),
    ),
    signal_name="SC4{subject:02d}{night}E0-PSG.edf",
    hypnogram_name="SC4{subject:02d}{night}E{letter}-Hypnogram.edf",
    signal_globs=("*-PSG.edf",),
    key_regex=r"^(?P<key>SC4\d{3})E0-PSG$",
    hypnogram_pattern="{key}E?-Hypnogram.edf",
    first_subject_id=0,
    max_recordings=200,
    equipment="Ambulatory_recorder",
)

HST_LIKE = SiteArchetype(
    key="hst_like",
    description="Home sleep apnoea test (type III): nasal pressure, RIP thorax/abdomen, SpO2, pulse; no EEG; 50 Hz mains",
    channels=(
        _ch("Nasal Pressure", "airflow", 100, "cmH2O", -3, 3, "airflow", gain=1.5),
        _ch("Thorax", "thorax", 20, "mV", -5, 5, "thorax", gain=2.0),
        _ch("Abdomen", "abdomen", 20, "mV", -5, 5, "abdomen", gain=2.0),
        _ch("SpO2", "spo2", 3, "%", 0, 100, "spo2"),
        _ch("Pulse", "hr", 3, "bpm", 0, 250, "hr"),
        _ch("Position", "position", 10, "", 0, 4, None),
        _ch("Activity", "activity", 10, "g", 0, 4, None),
    ),
    signal_format="edf",
    hypnogram_style="edf_aasm",
    mains_hz=50,
    mains_uv=0.0,
    eeg_scale=1.0,
    population=Population(
        age_mean=52, age_sd=12, age_range=(20, 85), male_fraction=0.65, ahi_median=16.0, ahi_log_sd=1.1
    ),
    metadata=MetadataLayout(
        file="hst_metadata.csv",
        key_column="study_id",
        age_column="age_years",
        sex_column="sex",
        female_value="F",
        male_value="M",
        ahi_column="ahi_3pct",
        hypertension_column="htn",
        extra_columns=("bmi", "epworth"),
    ),
    signal_name="HST{index:05d}.edf",
    hypnogram_name="HST{index:05d}_staging.edf",
    signal_globs=("HST?????.edf",),
    key_regex=r"^(?P<key>HST\d{5})$",
    hypnogram_pattern="{key}_staging.edf",
    first_subject_id=1,
    max_recordings=99999,
    equipment="HST_typeIII",
)

WEARABLE_LIKE = SiteArchetype(
    key="wearable_like",
    description="Consumer wearable with a chest band (BDF, 24 bit): heart rate, SpO2 and respiratory effort only; CSV hypnogram",
    channels=(
        _ch("heart_rate", "hr", 1, "bpm", 0, 255, "hr"),
        _ch("spo2", "spo2", 1, "%", 0, 100, "spo2", offset=-1.0),
        _ch("resp_effort", "thorax", 25, "mV", -10, 10, "thorax", gain=3.0),
    ),
    signal_format="bdf",
    hypnogram_style="csv",
    mains_hz=50,
    mains_uv=0.0,
    eeg_scale=1.0,
    population=Population(
        age_mean=36,
        age_sd=10,
        age_range=(18, 70),
        male_fraction=0.5,
        ahi_median=4.0,
        ahi_log_sd=0.9,
        nights_per_subject=3,
    ),
    metadata=MetadataLayout(
        file="participants.csv",
        key_column="recording",
        subject_column="participant",
        age_column="age",
        sex_column="gender",
        female_value="female",
        male_value="male",
        ahi_column="ahi",
        hypertension_column="hypertension",
    ),
    signal_name="P{subject:03d}_night{night}.bdf",
    hypnogram_name="P{subject:03d}_night{night}_stages.csv",
    signal_globs=("*.bdf",),
    key_regex=r"^(?P<key>P\d{3}_night\d+)$",
    hypnogram_pattern="{key}_stages.csv",
    first_subject_id=1,
    equipment="Wearable_v2",
)

PSG_512 = SiteArchetype(
    key="psg_512",
    description="HMC-like high-resolution clinical PSG: 512 Hz EEG/EOG/EMG/ECG, full montage, AASM EDF+ scoring, 50 Hz mains",
    channels=(
        _ch("EEG F4-M1", "eeg", 512, "uV", -400, 400, "eeg", "frontal"),
        _ch("EEG C4-M1", "eeg", 512, "uV", -400, 400, "eeg", "central"),
        _ch("EEG O2-M1", "eeg", 512, "uV", -400, 400, "eeg", "occipital"),
        _ch("EEG C3-M2", "eeg", 512, "uV", -400, 400, "eeg", "central"),
        _ch("EOG E1-M2", "eog", 512, "uV", -600, 600, "eog", "left"),
        _ch("EOG E2-M2", "eog", 512, "uV", -600, 600, "eog", "right"),
        _ch("EMG chin", "emg", 512, "uV", -300, 300, "emg"),
        _ch("ECG", "ecg", 512, "uV", -3000, 3000, "ecg"),
        _ch("Flow", "airflow", 64, "", -2, 2, "airflow"),
        _ch("RIP Thora", "thorax", 64, "uV", -2000, 2000, "thorax", gain=500.0),
        _ch("RIP Abdom", "abdomen", 64, "uV", -2000, 2000, "abdomen", gain=500.0),
        _ch("SpO2", "spo2", 4, "%", 0, 100, "spo2"),
        _ch("Pulse", "hr", 4, "bpm", 0, 250, "hr"),
        _ch("Body position", "position", 4, "", 0, 4, None),
    ),
    signal_format="edf",
    hypnogram_style="edf_aasm",
    mains_hz=50,
    mains_uv=3.0,
    eeg_scale=1.15,
    population=Population(age_mean=53, age_sd=15, age_range=(18, 88), male_fraction=0.58, ahi_median=10.0),
    metadata=MetadataLayout(
        file="patients.csv",
        key_column="patient",
        age_column="Age",
        sex_column="Sex",
        female_value="female",
        male_value="male",
        ahi_column="AHI",
        hypertension_column="Hypertension",
    ),
    signal_name="SN{index:03d}.edf",
    hypnogram_name="SN{index:03d}_sleepscoring.edf",
    signal_globs=("SN???.edf",),
    key_regex=r"^(?P<key>SN\d{3})$",
    hypnogram_pattern="{key}_sleepscoring.edf",
    first_subject_id=1,
    equipment="Clinical_PSG_512",
)

#: Every archetype by key.
ARCHETYPES: dict[str, SiteArchetype] = {
    a.key: a for a in (SHHS_LIKE, MESA_LIKE, SLEEPEDF_LIKE, HST_LIKE, WEARABLE_LIKE, PSG_512)
}
#: The cycle ``write_cohort`` walks through when no archetypes are named: one
#: of each kind of real site, then ``shhs_like_2`` and so on.
DEFAULT_CYCLE: tuple[str, ...] = ("shhs_like", "mesa_like", "sleepedf_like", "hst_like", "wearable_like", "psg_512")


def site_names(archetype_keys: tuple[str, ...]) -> tuple[str, ...]:
    """Unique site names: the archetype key, then ``key_2``, ``key_3``… on repeats."""
    seen: dict[str, int] = {}
    names = []
    for key in archetype_keys:
        seen[key] = seen.get(key, 0) + 1
        names.append(key if seen[key] == 1 else f"{key}_{seen[key]}")
    return tuple(names)


def resolve_archetypes(sites: int, archetypes: tuple[str, ...] | None) -> tuple[SiteArchetype, ...]:
    """The archetype of each of ``sites`` sites, cycling through ``archetypes`` (default cycle)."""
    if sites < 1:
        raise ValueError(f"sites must be >= 1, found {sites}")
    cycle = DEFAULT_CYCLE if not archetypes else tuple(archetypes)
    unknown = [k for k in cycle if k not in ARCHETYPES]
    if unknown:
        raise ValueError(f"archetypes: unknown {unknown}; expected names from {sorted(ARCHETYPES)}")
    return tuple(ARCHETYPES[cycle[i % len(cycle)]] for i in range(sites))
