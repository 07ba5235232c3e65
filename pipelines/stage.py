"""``s2v stage``: raw EDF/EDF+/BDF files or folders → per-recording hypnogram CSV, PNG and summary JSON.

Launch::

    s2v stage night.edf --model RUN_DIR/model --out hypnograms/              # one file: no Ray
    s2v stage clinic/ more/ --model RUN_DIR/model --out hypnograms/ --site-config site.toml
    s2v stage clinic/ --model … --out … --mapping ~/private/stage-mapping.csv  # pseudonym → file, yours to keep
    s2v stage night.edf --model RUN_DIR/model --events-model EVENTS_RUN/model --out …  # + AHI in the summary

A single file is staged in this process; two or more recordings run as Ray
tasks (a local Ray started on demand, or ``--address`` / ``RAY_ADDRESS``),
one recording per task. Reading, channel mapping and preprocessing are the
ingest's (:mod:`s2v_core.staging`). Outputs are named ``rec-<keyed hash>``
(the ingest's pseudonym key), never after the input file; a recording that
cannot be staged gets one line in ``OUT/results.json`` and the others go on.
Prints one JSON line: counts and the results file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from s2v_core.io.identity import Identities, load_pseudonym_key
from s2v_core.staging import find_recordings, recording_name, stage_one, write_results

logger = logging.getLogger(__name__)


def stage_paths(
    paths: list[str],
    *,
    model: str,
    out: str,
    site_config: str | None = None,
    modalities: list[str] | None = None,
    mapping: str | None = None,
    pseudonym_key_file: str | None = None,
    address: str | None = None,
    events_model: str | None = None,
) -> list[dict]:
    """Stage every recording of ``paths`` (see the module docstring); returns one result per recording."""
    from s2v_core.finetuning import read_description
    from s2v_core.staging import load_event_detector

    read_description(model)  # a clear error before any worker starts
    if events_model is not None:
        try:
            load_event_detector(events_model)
        except FileNotFoundError as exc:
            raise FileNotFoundError(str(exc).replace("--model", "--events-model", 1)) from None
    recordings = find_recordings(paths)
    if not recordings:
        raise ValueError(f"PATH: no EDF/BDF file in {', '.join(paths)}")
    identities = Identities(load_pseudonym_key(pseudonym_key_file))
    # Names are keyed hashes computed here: the key never travels to a worker.
    names = [recording_name(path, identities=identities) for path in recordings]
    options = {
        "model": str(Path(model).resolve()),
        "out": str(Path(out).resolve()),
        "site_config": site_config,
        "modalities": modalities,
        "events_model": str(Path(events_model).resolve()) if events_model else None,
    }
    if len(recordings) == 1 and not (address or os.environ.get("RAY_ADDRESS")):
        results = [stage_one(recordings[0], name=names[0], **options)]
    else:
        results = _on_ray(recordings, names, options, address=address)
    write_results(results, out, mapping=mapping, recordings=recordings, identities=identities)
    return results


def _on_ray(recordings: list[Path], names: list[str], options: dict, *, address: str | None) -> list[dict]:
    import ray

    from pipelines.runtime import init_ray

    started = not ray.is_initialized()
    init_ray(address, num_cpus=os.cpu_count() or 1)
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(stage_one)
        # A worker that dies (out of memory) costs its recording only.
        pending = {task.remote(str(path), name=name, **options): name for path, name in zip(recordings, names)}
        results = []
        for ref, name in pending.items():
            try:
                results.append(ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - ray.exceptions.RayError: the worker died
                results.append(
                    {
                        "name": name,
                        "status": "failed",
                        "epochs": 0,
                        "files": {},
                        "reason": f"the staging worker died ({type(exc).__name__})",
                    }
                )
        return results
    finally:
        if started:
            ray.shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="EDF/EDF+/BDF files or folders (searched recursively)")
    parser.add_argument("--model", required=True, help="fine-tuned staging model (RUN_DIR/model of `s2v finetune`)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--site-config", help="site config file mapping channel labels to modalities (as for ingest)")
    parser.add_argument("--modalities", help="comma-separated subset to use (default: all the recording has)")
    parser.add_argument(
        "--events-model",
        help="respiratory-event detector (RUN_DIR/model of `s2v finetune --task events`): adds the AHI to each summary",
    )
    parser.add_argument(
        "--mapping", help="also write pseudonym → input path to this CSV (outside --out; yours to keep)"
    )
    parser.add_argument("--pseudonym-key-file", help="key of the output names (default: the ingest's key)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")


def run(args: argparse.Namespace) -> int:
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()] if args.modalities else None
    results = stage_paths(
        args.paths,
        model=args.model,
        out=args.out,
        site_config=args.site_config,
        modalities=modalities,
        mapping=args.mapping,
        pseudonym_key_file=args.pseudonym_key_file,
        address=args.address,
        events_model=args.events_model,
    )
    failed = [r for r in results if r["status"] != "ok"]
    for result in failed:
        logger.warning("%s: not staged: %s", result["name"], result["reason"])
    print(
        json.dumps(
            {
                "staged": len(results) - len(failed),
                "failed": len(failed),
                "results": str(Path(args.out) / "results.json"),
            }
        )
    )
    return 0 if not failed or len(failed) < len(results) else 1
