"""Modality scenarios of the any-subset robustness matrix.

Each scenario is a named subset of the registry: every single modality, all
but one, and the device set-ups a model is meant to serve from the same
store (a full PSG, a home sleep test, a wearable, an EEG headband).
"""

from __future__ import annotations

from collections.abc import Sequence

from s2v_core.modalities import MODALITY_KEYS, parse_modalities

#: Named device scenarios (what such a device records), in registry keys.
DEVICE_SCENARIOS: dict[str, tuple[str, ...]] = {
    "psg": MODALITY_KEYS,  # full in-lab polysomnography
    "home_sleep_test": ("hr", "spo2", "airflow", "thorax", "abdomen"),  # type-3 HST
    "wearable": ("hr", "spo2", "thorax"),  # ring/watch PPG + SpO2 + a chest band
    "eeg_headband": ("eeg", "eog"),  # forehead EEG/EOG headband
}


def robustness_scenarios(available: Sequence[str], *, names: Sequence[str] | None = None) -> dict[str, tuple[str, ...]]:
    """Scenario name -> modality subset, restricted to the ``available`` modalities.

    Names are ``only:<key>`` (single modality), ``without:<key>`` (all but
    one) and the device names of :data:`DEVICE_SCENARIOS`. A device scenario
    keeps the modalities it lists that are available and is left out when
    none is. ``names`` selects some scenarios (unknown names raise
    ``ValueError`` listing the valid ones).
    """
    available = parse_modalities(list(available))
    scenarios: dict[str, tuple[str, ...]] = {}
    for key in available:
        scenarios[f"only:{key}"] = (key,)
    if len(available) > 1:
        for key in available:
            scenarios[f"without:{key}"] = tuple(k for k in available if k != key)
    for name, keys in DEVICE_SCENARIOS.items():
        subset = tuple(k for k in keys if k in available)
        if subset:
            scenarios[name] = subset
    if names is None:
        return scenarios
    unknown = [n for n in names if n not in scenarios]
    if unknown:
        raise ValueError(
            f"--scenarios: unknown scenario {', '.join(map(repr, unknown))}; expected some of {', '.join(scenarios)}"
        )
    return {n: scenarios[n] for n in names}
