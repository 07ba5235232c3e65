"""The modality registry: the one place that names the nine modalities.

Every other module asks this registry for names, store rates, samples per
epoch and channel aliases; nothing else hard-codes them.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: Length of one scoring epoch in seconds (AASM and R&K both score 30-s epochs).
EPOCH_SECONDS = 30


@dataclass(frozen=True)
class Modality:
    """One modality of the store.

    Parameters
    ----------
    key : str
        Short name used in the store, the CLI and the model (``"eeg"``).
    store_rate_hz : int
        Sampling rate in Hz that every recording is resampled to at ingest: a
        positive whole number, so that a 30-s epoch is a whole number of samples.
    unit : str
        Physical unit of the raw signal before normalisation (µV, bpm, %, a.u.).
    aliases : tuple of str
        Typical channel labels (matched case-insensitively after whitespace
        normalisation). Sites add their own through the site config.
    plausible : tuple of (low, high)
        Ranges of raw values, in ``unit``, that a connected sensor of this
        modality reports; ingest treats a window with most of its samples
        outside all of them as absent (a disconnected probe reading 0, an
        AC-coupled channel centred on 0). Empty: any value (signals whose
        scale depends on the amplifier).
    """

    key: str
    store_rate_hz: int
    unit: str
    aliases: tuple[str, ...]
    plausible: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        rate = self.store_rate_hz
        # A window stores (epochs, samples_per_epoch) arrays: a fractional epoch has no shape.
        if isinstance(rate, bool) or not isinstance(rate, numbers.Integral):
            raise ValueError(
                f"modality {self.key!r}: store_rate_hz must be a whole number of Hz (so that a "
                f"{EPOCH_SECONDS}-s epoch is a whole number of samples), found {rate!r} ({type(rate).__name__})"
            )
        if rate <= 0:
            raise ValueError(f"modality {self.key!r}: store_rate_hz must be positive, found {rate}")

    @property
    def samples_per_epoch(self) -> int:
        """Samples in one 30-s epoch at the store rate."""
        return self.store_rate_hz * EPOCH_SECONDS


MODALITIES: tuple[Modality, ...] = (
    # Electrophysiology: 128 Hz keeps sleep spindles (11-16 Hz), alpha and the
    # EMG band below Nyquist (64 Hz) while halving typical PSG storage.
    Modality("eeg", 128, "uV", ("C3-M2", "C4-M1", "EEG", "EEG(sec)", "EEG Fpz-Cz", "EEG1", "F4-M1", "O2-M1")),
    Modality("eog", 128, "uV", ("E1-M2", "EOG(L)", "EOG-L", "EOG horizontal", "LOC", "ROC")),
    Modality("emg", 128, "uV", ("Chin1-Chin2", "EMG", "EMG submental", "CHIN")),
    Modality("ecg", 128, "uV", ("ECG", "EKG", "ECG1", "ECG II")),
    # Slow physiological series: heart rate and SpO2 change over seconds.
    # Asleep, adults and children stay within 20-250 bpm; SpO2 below 40 % for
    # most of a window is a probe off the finger, and some oximeters write a
    # fraction of 1 instead of a percentage.
    Modality("hr", 4, "bpm", ("H.R.", "HR", "Pulse", "PR"), plausible=((20.0, 250.0),)),
    Modality("spo2", 4, "%", ("SpO2", "SaO2", "SAO2", "Oxygen Saturation"), plausible=((40.0, 101.0), (0.4, 1.01))),
    # Respiration (0.1-1 Hz) with room for snoring envelopes and flow shape.
    Modality(
        "airflow",
        16,
        "a.u.",
        ("Airflow", "Flow", "NASAL PRES", "Nasal Pressure", "Resp oro-nasal", "NEW AIR", "Thermistor"),
    ),
    Modality("thorax", 16, "a.u.", ("THOR RES", "Thor", "Chest", "Thoracic", "RIP Thora")),
    Modality("abdomen", 16, "a.u.", ("ABDO RES", "Abdo", "Abdomen", "Abdominal", "RIP Abdom")),
)

MODALITY_KEYS: tuple[str, ...] = tuple(m.key for m in MODALITIES)
_BY_KEY: dict[str, Modality] = {m.key: m for m in MODALITIES}


def get_modality(key: str) -> Modality:
    """Return the registry entry for ``key`` or raise a ``KeyError`` naming the valid keys."""
    try:
        return _BY_KEY[key]
    except KeyError:
        raise KeyError(f"unknown modality {key!r}; expected one of {', '.join(MODALITY_KEYS)}") from None


def modality_index(key: str) -> int:
    """Position of ``key`` in registry order (the order of the store's ``present`` mask)."""
    get_modality(key)
    return MODALITY_KEYS.index(key)


def parse_modalities(spec: str | Iterable[str] | None, *, option: str = "--modalities") -> tuple[str, ...]:
    """Parse ``"eeg,ecg"`` (or an iterable) into registry-ordered modality keys.

    ``None`` or an empty string means all nine. Unknown or duplicate names
    raise ``ValueError`` naming ``option``.
    """
    if spec is None:
        return MODALITY_KEYS
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    if not names:
        return MODALITY_KEYS
    unknown = [n for n in names if n not in _BY_KEY]
    if unknown:
        raise ValueError(
            f"{option}: unknown modality {', '.join(map(repr, unknown))}; "
            f"expected a comma-separated subset of {','.join(MODALITY_KEYS)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{option}: modality listed twice in {spec!r}")
    return tuple(k for k in MODALITY_KEYS if k in names)


def normalise_label(label: str) -> str:
    """Case-fold a channel label and collapse whitespace, for alias matching."""
    return " ".join(label.strip().split()).casefold()


def match_channel(label: str, extra_aliases: Mapping[str, str] | None = None) -> str | None:
    """Map a channel label to a modality key, or ``None`` if it is unknown.

    Parameters
    ----------
    label : str
        Channel label as written in the recording header.
    extra_aliases : mapping of str to str, optional
        Site-specific ``{channel label: modality key}`` entries; they take
        precedence over the registry's aliases.

    Unknown labels are returned as ``None`` so the caller can report them;
    nothing is guessed from substrings.
    """
    wanted = normalise_label(label)
    if extra_aliases:
        for alias, key in extra_aliases.items():
            if normalise_label(alias) == wanted:
                return get_modality(key).key
    for modality in MODALITIES:
        if any(normalise_label(a) == wanted for a in modality.aliases):
            return modality.key
    return None
