"""Synthetic multi-site PSG cohorts: realistic nights written in each site's own conventions.

Modules: :mod:`~s2v_core.synth.hypnogram` (stage process),
:mod:`~s2v_core.synth.night` (subject, respiratory events, arousals),
:mod:`~s2v_core.synth.physiology` (EEG/EOG/EMG),
:mod:`~s2v_core.synth.cardiorespiratory` (ECG, HR, breathing, SpO2),
:mod:`~s2v_core.synth.sites` (site archetypes), :mod:`~s2v_core.synth.writers`
(EDF/BDF, hypnograms, metadata, site.toml) and :mod:`~s2v_core.synth.cohort`
(:func:`write_cohort`).
"""

from s2v_core.synth.cohort import (
    CohortSummary,
    RecordingSummary,
    SiteSummary,
    fake_identity,
    render_channels,
    write_cohort,
    write_site,
)
from s2v_core.synth.hypnogram import NightHypnogram, simulate_hypnogram
from s2v_core.synth.night import Night, Subject, draw_subject, simulate_night
from s2v_core.synth.sites import ARCHETYPES, DEFAULT_CYCLE, ChannelSpec, SiteArchetype

__all__ = [
    "ARCHETYPES",
    "DEFAULT_CYCLE",
    "ChannelSpec",
    "CohortSummary",
    "Night",
    "NightHypnogram",
    "RecordingSummary",
    "SiteArchetype",
    "SiteSummary",
    "Subject",
    "draw_subject",
    "fake_identity",
    "render_channels",
    "simulate_hypnogram",
    "simulate_night",
    "write_cohort",
    "write_site",
]
