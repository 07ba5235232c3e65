"""Stage raw recordings with a fine-tuned model: EDF/EDF+/BDF in, hypnogram CSV/PNG and a summary out.

Three lines for a clinician::

    from s2v_core import stage
    result = stage("night.edf", model="runs/ft/model", out="hypnograms/")
    print(result.summary["total_sleep_time_min"], result.csv)

A recording is read with the ingest's own code
(:func:`s2v_core.recording.decode_recording`: the EDF/BDF readers, the
channel mapping of the registry and of an optional site config, resampling
to the store rates and per-recording robust normalisation), one store row per
30-s epoch; epochs at the ragged end are dropped, as in the store. Whatever
modalities the recording has and the model reads are used; the gated fusion
ignores the others. Consecutive epochs are grouped into windows of the
model's training length (the last one may be shorter) and staged.

When the model directory holds a whole-night head (``s2v finetune
--night-context``, :func:`s2v_core.night_context.load_night_head`), the
recording is taken as one night: the head reads the features of all its
staged epochs in time order at once, and the probabilities and stages are
its (stage 2); otherwise they are the fine-tuned model's head's, window by
window. The summary says which (``"night_context": true/false``).

With an event detector (``events_model=``, ``s2v stage --events-model``: a
model fine-tuned with ``--task events``), the same decoded recording is
embedded under it too, and the summary's ``ahi`` counts the epochs whose
event probability exceeds the detector's threshold within the *predicted*
sleep, each run of ``k`` of them as ``max(1, k x events_per_epoch)`` events
(both fitted on val nights by ``s2v finetune``), per hour of predicted sleep
(:func:`event_index`), with its AASM severity class.

Privacy: a file name may be a patient's name, so nothing derived from it or
from the EDF header reaches an output. Each recording is named by a keyed
hash of its path (:class:`s2v_core.io.identity.Identities`, the ingest's
pseudonym key): ``rec-<16 hex>``; whoever holds the key can recompute the
mapping, and :func:`stage` writes one only where it is asked to
(``mapping=``). Reasons for recordings that cannot be staged name the
recording by that pseudonym, never by its path.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from s2v_core.evaluation.events import DEFAULT_THRESHOLD, EventCounting, count_events, counts_ahi
from s2v_core.evaluation.tasks import AHI_SEVERITY_NAMES, severity_classes
from s2v_core.finetuning import (
    EVENT_THRESHOLD_FROM_KEY,
    EVENT_THRESHOLD_KEY,
    EVENTS_PER_EPOCH_KEY,
    FineTunedModel,
    load_finetuned,
    read_description,
)
from s2v_core.io.identity import Identities, load_pseudonym_key
from s2v_core.io.site_config import SiteConfig, load_site_config
from s2v_core.modalities import EPOCH_SECONDS, MODALITY_KEYS, parse_modalities
from s2v_core.model import batch_to_tensors
from s2v_core.night_context import NightContextHead, load_night_head
from s2v_core.recording import decode_recording
from s2v_core.store import table_to_batch

logger = logging.getLogger(__name__)

#: File suffixes (lower case) of the signal files a folder is searched for.
SIGNAL_SUFFIXES = (".edf", ".bdf", ".rec")
#: Site name under which pseudonyms of staged recordings are keyed (distinct from any ingest site).
PSEUDONYM_SITE = "s2v-stage"
SUMMARY_FORMAT = 1


@dataclass(frozen=True)
class RecordingEmbedding:
    """The fused epoch features of one recording (what the task head reads).

    Attributes
    ----------
    features : ndarray ``(epochs, width)`` float32
        One row per 30-s epoch from the start of the recording.
    present : ndarray ``(epochs, 9)`` bool
        Modalities (registry order) that went into each epoch's features.
    windows : list of (int, int)
        ``[start, stop)`` epoch ranges encoded together (the model's window length).
    modalities : tuple of str
        Modalities of the recording the model used.
    channels : dict of str to str
        Modality → channel label it was read from.
    """

    features: np.ndarray
    present: np.ndarray
    windows: list[tuple[int, int]]
    modalities: tuple[str, ...]
    channels: dict[str, str]


@dataclass(frozen=True)
class StagingResult:
    """What :func:`stage_recording` returns for one recording."""

    name: str
    stages: np.ndarray  # int64 (epochs,): class index of the model's task
    probabilities: np.ndarray  # float32 (epochs, classes)
    classes: tuple[str, ...]
    summary: dict
    files: dict[str, str] = field(default_factory=dict)


def recording_name(path: str | Path, *, identities: Identities) -> str:
    """The pseudonymous output name of an input file: ``rec-`` + keyed hash of its resolved path."""
    return "rec-" + identities.file_id(PSEUDONYM_SITE, str(Path(path).resolve()))


def _scrub(text: str, path: Path, name: str) -> str:
    """``text`` with every spelling of ``path`` replaced by the recording's pseudonym."""
    for spelling in sorted({str(path), str(path.resolve()), path.name, path.stem}, key=len, reverse=True):
        if spelling:
            text = text.replace(spelling, name)
    return text


def _as_model(model: FineTunedModel | str | Path) -> FineTunedModel:
    return model if isinstance(model, FineTunedModel) else load_finetuned(model)


def _night_head(model: FineTunedModel | str | Path, night_head: NightContextHead | None) -> NightContextHead | None:
    """The night head to use: the one given, else the one of the model directory (a path), else none."""
    if night_head is not None or isinstance(model, FineTunedModel):
        return night_head
    return load_night_head(model)


@dataclass(frozen=True)
class EventDetector:
    """A respiratory-event model (``s2v finetune --task events``) and how its epochs become an index.

    :func:`load_event_detector` reads the counting ``s2v finetune`` fitted on
    the val nights (the threshold and events per positive epoch whose AHI came
    closest to the scored AHI); a detector built by hand counts each run of
    epochs above 0.5 as one event unless told otherwise.
    """

    model: FineTunedModel
    threshold: float = DEFAULT_THRESHOLD
    threshold_from: str = "default (0.5)"
    events_per_epoch: float = 0.0

    def __post_init__(self) -> None:
        if not counts_ahi(self.model.task):
            raise ValueError(
                "--events-model: expected a respiratory-event detector (task events, or events:apnea/"
                f"events:hypopnea), found task {self.model.task.name!r}"
            )
        try:
            EventCounting(self.threshold, self.events_per_epoch)
        except ValueError as error:
            raise ValueError(f"--events-model: {error}") from None

    @property
    def counting(self) -> EventCounting:
        return EventCounting(self.threshold, self.events_per_epoch)


def load_event_detector(directory: str | Path) -> EventDetector:
    """The event detector of a fine-tuned model directory, with the counting kept in its ``finetuned.json``."""
    description = read_description(directory)
    model = load_finetuned(directory)
    threshold = description.get(EVENT_THRESHOLD_KEY)
    if threshold is None:
        return EventDetector(model)
    return EventDetector(
        model,
        float(threshold),
        str(description.get(EVENT_THRESHOLD_FROM_KEY, "finetuned.json")),
        float(description.get(EVENTS_PER_EPOCH_KEY, 0.0)),  # models fine-tuned before it count runs
    )


def _as_detector(detector: EventDetector | str | Path | None) -> EventDetector | None:
    return detector if detector is None or isinstance(detector, EventDetector) else load_event_detector(detector)


def event_index(
    probability: np.ndarray, stages: np.ndarray, *, detector: EventDetector, modalities: Sequence[str]
) -> dict:
    """The summary's ``ahi``: events detected in predicted sleep per hour of predicted sleep.

    ``probability`` is the detector's P(event) per epoch (NaN where it read
    nothing); ``stages`` the staging model's classes (0 wake, −1 unstaged).
    Counting is the detector's :class:`s2v_core.evaluation.events.EventCounting`,
    as in ``s2v finetune``'s report, but over the *predicted* total sleep time.
    """
    asleep = np.asarray(stages) > 0
    detected = np.nan_to_num(np.asarray(probability, dtype=np.float64), nan=0.0) > detector.threshold
    index = detector.counting.index(probability, asleep)
    return {
        "events_per_hour": index,
        "events": round(count_events(detected & asleep, events_per_epoch=detector.events_per_epoch), 1),
        "severity": None if index is None else AHI_SEVERITY_NAMES[int(severity_classes(np.array([index]))[0])],
        "event_epochs": int((detected & asleep).sum()),
        "threshold": detector.threshold,
        "events_per_epoch": detector.events_per_epoch,
        "threshold_from": detector.threshold_from,
        "sleep": "the predicted hypnogram's sleep epochs",
        "task": detector.model.task.name,
        "modalities": list(modalities),
        "reason": None,
    }


def _event_probabilities(decoded, detector: EventDetector, *, modalities: Sequence[str] | None, name: str):
    """P(event) per epoch under the detector (NaN where it read nothing) and the modalities it read."""
    embedding = _embed_decoded(decoded, detector.model, modalities=modalities, name=name)
    probability = np.full(len(embedding.features), np.nan)
    with torch.no_grad():
        for start, stop in embedding.windows:
            if embedding.present[start:stop].any():
                logits = detector.model.head(torch.from_numpy(embedding.features[start:stop])[None])[0, :, 0]
                probability[start:stop] = torch.sigmoid(logits.float()).numpy()
    return probability, embedding.modalities


def embed_recording(
    path: str | Path,
    *,
    model: FineTunedModel | str | Path,
    site_config: SiteConfig | str | Path | None = None,
    modalities: Sequence[str] | None = None,
    name: str = "recording",
    device: str = "cpu",
) -> RecordingEmbedding:
    """Read one EDF/EDF+/BDF file and return its fused epoch features under ``model``.

    Parameters
    ----------
    path : str or Path
        A local signal file (EDF, EDF+C, BDF).
    model : FineTunedModel or path
        A fine-tuned model or its directory (``s2v finetune``'s ``RUN_DIR/model``).
    site_config : SiteConfig or path, optional
        Channel labels → modalities beyond the registry aliases, ignored channels
        (the ingest's site config file).
    modalities : sequence of str, optional
        Use only these (default: every modality the recording and the model share).
    name : str
        How messages name the recording (never the file name).

    Raises
    ------
    s2v_core.io.base.UnreadableRecording
        The file cannot be read, has no usable channel or is shorter than one epoch.
    ValueError
        No modality of the recording is one the model reads.
    """
    model = _as_model(model)
    return _embed_decoded(
        _decode(path, site_config=site_config, name=name), model, modalities=modalities, name=name, device=device
    )


def _decode(path: str | Path, *, site_config: SiteConfig | str | Path | None, name: str):
    """The recording read as the ingest reads it: one store row per 30-s epoch."""
    site = load_site_config(site_config) if isinstance(site_config, (str, Path)) else site_config
    return decode_recording(
        str(path), recording_id=name, site=site or SiteConfig(name=PSEUDONYM_SITE), epochs_per_window=1
    )


@torch.no_grad()  # LoRA and full models enable grad in features(); inference never needs it
def _embed_decoded(
    decoded, model: FineTunedModel, *, modalities: Sequence[str] | None, name: str, device: str = "cpu"
) -> RecordingEmbedding:
    wanted = set(parse_modalities(list(modalities), option="--modalities")) if modalities else set(MODALITY_KEYS)
    usable = tuple(k for k in model.spec.modalities if k in decoded.modalities and k in wanted)
    if not usable:
        raise ValueError(
            f"{name}: the recording has {', '.join(decoded.modalities)}; the model reads "
            f"{', '.join(model.spec.modalities)}"
            + (f" (--modalities {', '.join(sorted(wanted))})" if modalities else "")
            + ": nothing in common to stage from"
        )
    batch = table_to_batch(decoded.table, modalities=usable, epochs_per_window=1)
    epochs = decoded.windows
    length = model.window_epochs  # the window length the head was trained on
    windows = [(start, min(start + length, epochs)) for start in range(0, epochs, length)]
    features = np.zeros((epochs, model.base_config.width), dtype=np.float32)
    present = np.zeros((epochs, len(MODALITY_KEYS)), dtype=bool)
    model.eval().to(device)
    for start, stop in windows:
        # A modality counts for a window only when every epoch of it is good (absent rows are zeros).
        window_present = batch["present"][start:stop].all(axis=0)
        window = {k: batch[k][start:stop][:, 0][None] for k in usable}
        window["present"] = window_present[None]
        if not window_present.any():
            continue  # every modality broken here: no features, the epochs are left unstaged
        features[start:stop] = model.features(batch_to_tensors(window, device))[0].float().cpu().numpy()
        present[start:stop] = window_present
    return RecordingEmbedding(
        features=features,
        present=present,
        windows=windows,
        modalities=usable,
        channels={k: decoded.channels[k] for k in usable},
    )


def sleep_summary(stages: np.ndarray, classes: Sequence[str], *, staged: np.ndarray | None = None) -> dict:
    """Sleep figures of a 30-s hypnogram whose class 0 is wake.

    Time in bed is the staged recording (lights-off/on are not known from the
    signal file). Sleep onset is the first sleep epoch; WASO counts wake from
    sleep onset to the last sleep epoch.

    Returns
    -------
    dict
        ``time_in_bed_min``, ``total_sleep_time_min`` (TST), ``sleep_efficiency_percent``
        (TST / time in bed), ``sleep_onset_latency_min`` and ``waso_min`` (``None``
        without sleep), ``stage_minutes`` and ``stage_percent_of_tst`` per class.
    """
    stages = np.asarray(stages)
    staged = np.ones(len(stages), bool) if staged is None else np.asarray(staged, bool)
    minutes = EPOCH_SECONDS / 60.0
    sleep = staged & (stages != 0)
    in_bed = int(staged.sum()) * minutes
    tst = int(sleep.sum()) * minutes
    asleep = np.flatnonzero(sleep)
    onset = None if asleep.size == 0 else float(staged[: asleep[0]].sum() * minutes)
    waso = None
    if asleep.size:
        between = slice(asleep[0], asleep[-1] + 1)
        waso = float((staged[between] & (stages[between] == 0)).sum() * minutes)
    counts = {name: float((staged & (stages == i)).sum() * minutes) for i, name in enumerate(classes)}
    return {
        "epochs": int(len(stages)),
        "staged_epochs": int(staged.sum()),
        "epoch_seconds": EPOCH_SECONDS,
        "time_in_bed_min": in_bed,
        "total_sleep_time_min": tst,
        "sleep_efficiency_percent": (100.0 * tst / in_bed) if in_bed else None,
        "sleep_onset_latency_min": onset,
        "waso_min": waso,
        "stage_minutes": counts,
        "stage_percent_of_tst": {
            name: (100.0 * value / tst if tst else None) for name, value in counts.items() if name != classes[0]
        },
    }


def stage_recording(
    path: str | Path,
    *,
    model: FineTunedModel | str | Path,
    out: str | Path | None = None,
    name: str | None = None,
    identities: Identities | None = None,
    site_config: SiteConfig | str | Path | None = None,
    modalities: Sequence[str] | None = None,
    night_head: NightContextHead | None = None,
    events_model: EventDetector | str | Path | None = None,
) -> StagingResult:
    """Stage one recording; with ``out``, write ``NAME_hypnogram.csv``, ``NAME_hypnogram.png``, ``NAME_summary.json``.

    ``name`` defaults to the pseudonym of the path (:func:`recording_name`).
    ``night_head`` (stage 2 over the whole recording) defaults to the one kept
    in the model directory when ``model`` is a path; with a loaded ``model``
    and no ``night_head``, the model's own head stages the epochs.
    ``events_model`` (an :class:`EventDetector` or the directory of an
    ``s2v finetune --task events`` model) adds the AHI from detected events
    to the summary (:func:`event_index`), a ``p_event`` column to the CSV and
    the detected events to the PNG; a recording without the modalities it
    reads is still staged, its ``ahi`` says why it has no value. The
    summary's ``notes`` say what the reader and the channel checks left out
    (a channel too slow, windows NaN, flat or implausible), the path replaced
    by ``name``.
    Errors (:class:`~s2v_core.io.base.UnreadableRecording`, ``ValueError``) carry a
    one-line reason naming the recording by ``name``, never by its path.
    """
    from s2v_core.evaluation.plots import plot_predicted_hypnogram

    night_head = _night_head(model, night_head)
    model = _as_model(model)
    detector = _as_detector(events_model)
    task = model.task
    if task.level != "epoch" or task.kind != "classification" or task.stage_map[0] != 0:
        raise ValueError(
            f"--model: a staging model is needed (task staging/staging4/staging3), found task {task.name!r}"
        )
    path = Path(path)
    name = name or recording_name(path, identities=identities or Identities(load_pseudonym_key()))
    try:
        decoded = _decode(path, site_config=site_config, name=name)
        embedding = _embed_decoded(decoded, model, modalities=modalities, name=name)
    except (ValueError, OSError) as exc:  # UnreadableRecording is a ValueError
        raise type(exc)(_scrub(str(exc), path, name)) from None
    staged = embedding.present.any(axis=1)
    with torch.no_grad():
        logits = torch.cat(
            [model.head(torch.from_numpy(embedding.features[start:stop])[None])[0] for start, stop in embedding.windows]
        )
        if night_head is not None and staged.any():
            # One night, in epoch order; unstaged epochs are left out (as the store leaves out unusable windows).
            mask = torch.from_numpy(staged)
            logits[mask] = night_head.eval()(torch.from_numpy(embedding.features[staged]), logits[mask]).to(
                logits.dtype
            )
    probabilities = torch.softmax(logits.float(), dim=-1).numpy()
    stages = np.where(staged, probabilities.argmax(axis=1), -1)
    event_probability, ahi = None, None
    if detector is not None:
        try:
            event_probability, read = _event_probabilities(decoded, detector, modalities=modalities, name=name)
        except ValueError:  # nothing the detector reads: staged all the same
            reads = ", ".join(detector.model.spec.modalities)
            has = ", ".join(k for k in decoded.modalities if not modalities or k in modalities)
            ahi = {"events_per_hour": None, "reason": f"the events model reads {reads}; the recording gives {has}"}
        else:
            ahi = event_index(event_probability, stages, detector=detector, modalities=read)
    summary = {
        "format": SUMMARY_FORMAT,
        "recording": name,
        "task": task.name,
        "classes": list(task.classes),
        "modalities": list(embedding.modalities),
        "channels": embedding.channels,
        "night_context": night_head is not None,
        **sleep_summary(stages, task.classes, staged=staged),
        **({"ahi": ahi} if detector is not None else {}),
        "notes": [_scrub(note, path, name) for note in decoded.notes],
    }
    files: dict[str, str] = {}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files["csv"] = str(
            _write_csv(out / f"{name}_hypnogram.csv", stages, probabilities, task.classes, staged, event_probability)
        )
        detected = None
        if ahi is not None and ahi["events_per_hour"] is not None:
            detected = (np.nan_to_num(event_probability, nan=0.0) > detector.threshold) & (stages > 0)
        files["png"] = str(
            plot_predicted_hypnogram(
                stages, probabilities, task.classes, out / f"{name}_hypnogram.png", title=name, events=detected
            )
        )
        files["summary"] = str(out / f"{name}_summary.json")
        Path(files["summary"]).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return StagingResult(
        name=name, stages=stages, probabilities=probabilities, classes=task.classes, summary=summary, files=files
    )


def _write_csv(
    path: Path,
    stages: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    staged: np.ndarray,
    event_probability: np.ndarray | None = None,
) -> Path:
    """One row per 30-s epoch: index, onset (s from the recording start), stage name, class probabilities.

    With ``event_probability`` a last column ``p_event`` (empty where the detector read nothing).
    """
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "epoch",
                "onset_s",
                "stage",
                *(f"p_{c}" for c in classes),
                *(["p_event"] if event_probability is not None else []),
            ]
        )
        for i, (stage, row) in enumerate(zip(stages, probabilities)):
            label = classes[stage] if staged[i] else "unscored"
            values = [f"{p:.4f}" for p in row] if staged[i] else [""] * len(classes)
            if event_probability is not None:
                values.append("" if np.isnan(event_probability[i]) else f"{event_probability[i]:.4f}")
            writer.writerow([i, i * EPOCH_SECONDS, label, *values])
    return path


def find_recordings(paths: Sequence[str | Path]) -> list[Path]:
    """Signal files of ``paths``: files as given, folders searched recursively (sorted, no duplicates)."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in SIGNAL_SUFFIXES)
        elif item.exists():
            found.append(item)
        else:
            raise FileNotFoundError(f"PATH {item}: no such file or folder")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def stage(
    paths: str | Path | Sequence[str | Path],
    *,
    model: FineTunedModel | str | Path,
    out: str | Path,
    site_config: SiteConfig | str | Path | None = None,
    modalities: Sequence[str] | None = None,
    mapping: str | Path | None = None,
    identities: Identities | None = None,
    events_model: EventDetector | str | Path | None = None,
) -> list[dict]:
    """Stage files and folders one after the other, in this process (``s2v stage`` spreads folders over Ray).

    Parameters
    ----------
    paths : path or sequence of paths
        EDF/EDF+/BDF files, or folders searched recursively for them.
    model : FineTunedModel or path
        A fine-tuned staging model (``RUN_DIR/model`` of ``s2v finetune``).
    out : path
        Output folder: per recording ``rec-<id>_hypnogram.csv`` / ``.png`` / ``_summary.json``,
        and ``results.json`` (one line per recording: name, status, reason).
    site_config : SiteConfig or path, optional
        Channel mapping of the site (as for ingest).
    modalities : sequence of str, optional
        Restrict to these modalities.
    mapping : path, optional
        Also write a CSV of pseudonym → input path here (a file the user keeps; it
        holds the file names, so it is never written by default, nor under ``out``).
    identities : Identities, optional
        Pseudonym key (default: the ingest's key, :func:`load_pseudonym_key`).
    events_model : EventDetector or path, optional
        A respiratory-event detector (``s2v finetune --task events``): adds the AHI
        (events per hour of predicted sleep) to each summary.

    Returns
    -------
    list of dict
        Per recording: ``name``, ``status`` (``ok`` / ``failed``), ``reason``, ``epochs``, ``files``.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    identities = identities or Identities(load_pseudonym_key())
    night_head = _night_head(model, None)
    loaded = _as_model(model)
    detector = _as_detector(events_model)
    recordings = find_recordings(paths)
    results = [
        stage_one(
            path,
            name=recording_name(path, identities=identities),
            model=loaded,
            out=out,
            site_config=site_config,
            modalities=modalities,
            night_head=night_head,
            events_model=detector,
        )
        for path in recordings
    ]
    write_results(results, out, mapping=mapping, recordings=recordings, identities=identities)
    return results


def stage_one(
    path: str | Path,
    *,
    name: str,
    model: FineTunedModel | str | Path,
    out: str | Path,
    site_config: SiteConfig | str | Path | None = None,
    modalities: Sequence[str] | None = None,
    night_head: NightContextHead | None = None,
    events_model: EventDetector | str | Path | None = None,
) -> dict:
    """Stage one file as ``name`` and never raise for a bad recording: its result line says why (one line)."""
    try:
        result = stage_recording(
            path,
            model=model,
            out=out,
            name=name,
            site_config=site_config,
            modalities=modalities,
            night_head=night_head,
            events_model=events_model,
        )
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
        reason = _scrub(
            str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}", Path(path), name
        )
        logger.warning("%s: not staged: %s", name, reason)
        return {"name": name, "status": "failed", "reason": " ".join(reason.split()), "epochs": 0, "files": {}}
    return {
        "name": name,
        "status": "ok",
        "reason": None,
        "epochs": result.summary["epochs"],
        "modalities": result.summary["modalities"],
        "night_context": result.summary["night_context"],
        **({"ahi": result.summary["ahi"]["events_per_hour"]} if "ahi" in result.summary else {}),
        "files": {k: Path(v).name for k, v in result.files.items()},
    }


def write_results(
    results: list[dict],
    out: str | Path,
    *,
    mapping: str | Path | None,
    recordings: Sequence[Path],
    identities: Identities,
) -> None:
    """``OUT/results.json`` (no file names) and, when asked, the user's pseudonym → path mapping."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if mapping is not None:
        mapping = Path(mapping)
        if out.resolve() in mapping.resolve().parents:
            raise ValueError(
                f"--mapping {mapping}: expected a file outside --out {out} (it holds the input "
                "file names, which --out never does)"
            )
        with open(mapping, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["name", "path"])
            writer.writerows((recording_name(p, identities=identities), str(p)) for p in recordings)
