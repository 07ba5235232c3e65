"""Find a trained encoder from whatever a user has at hand: a path, an MLflow URI or a run id.

``s2v embed --checkpoint SPEC`` and the sweep call :func:`load_trained_encoder`;
``SPEC`` may be

- an encoder directory (``model_config.json`` + ``encoder.pt``),
- a pretraining checkpoint (``RUN_DIR/checkpoints/step_*``, its ``encoder/``),
- a run dir (``RUN_DIR/encoder``, else its latest checkpoint),

  each a local path or a URI (``s3://…``, read through ``pyarrow.fs``),
- ``runs:/<run_id>`` or ``runs:/<run_id>/encoder`` (the encoder directory logged
  as artifacts), ``runs:/<run_id>/model`` or ``models:/…`` (the MLflow
  pytorch model),
- a bare MLflow run id (32 hex characters), resolved as ``runs:/<id>/encoder``.

MLflow specs use ``tracking_uri`` or else ``MLFLOW_TRACKING_URI``.

Every form but the MLflow pytorch model loads weights only
(``torch.load(weights_only=True)`` into a model built from its JSON config).
The MLflow model is a pickle: loading it runs whatever code its author put
in it, so it loads only with ``allow_pickle=True`` (``--allow-pickle-model``).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from pipelines.checkpoints import latest_checkpoint
from pipelines.runtime import file_type, local_directory
from s2v_core.locations import is_uri, join, resolve
from s2v_core.model import SleepEncoder, load_encoder
from s2v_core.run_layout import ENCODER_DIR, MLFLOW_RUN_FILE, MODEL_CONFIG_FILE, TRAINING_RECORD_FILE
from s2v_core.splits import read_training_record

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
#: Artifact path of the encoder directory in a pretraining MLflow run (written by pipelines.pretrain_mlflow).
ENCODER_ARTIFACT = "encoder"


def load_trained_encoder(
    spec: str | Path, *, tracking_uri: str | None = None, allow_pickle: bool = False
) -> SleepEncoder:
    """Load a trained :class:`~s2v_core.model.SleepEncoder` (eval mode, CPU) from ``spec``.

    Parameters
    ----------
    spec : str or path
        One of the forms in the module docstring.
    tracking_uri : str, optional
        MLflow store of ``runs:/``/``models:/`` specs (default ``MLFLOW_TRACKING_URI``).
    allow_pickle : bool
        Accept an MLflow pytorch model, a pickle that runs code when loaded.

    Raises
    ------
    ValueError
        ``spec`` is none of the accepted forms (the message names it), an
        MLflow spec is given without a tracking URI, or ``spec`` is a pickled
        MLflow model and ``allow_pickle`` is false.
    """
    text = str(spec)
    if is_uri(text) or Path(text).exists():
        with local_directory(_encoder_dir(text)) as directory:
            return load_encoder(directory)
    if text.startswith("models:/"):
        return _load_mlflow_model(text, tracking_uri, allow_pickle=allow_pickle)
    if text.startswith("runs:/"):
        run_id, _, artifact = text[len("runs:/") :].partition("/")
        artifact = artifact.strip("/") or ENCODER_ARTIFACT
        if artifact == ENCODER_ARTIFACT:
            return _load_run_encoder(run_id, tracking_uri)
        return _load_mlflow_model(text, tracking_uri, allow_pickle=allow_pickle)
    if _RUN_ID.match(text):
        return _load_run_encoder(text, tracking_uri)
    raise ValueError(
        f"--checkpoint: expected an encoder/checkpoint/run directory, runs:/<run_id>[/…], models:/… "
        f"or an MLflow run id, found {text!r} (no such path)"
    )


def training_record(spec: str | Path, *, tracking_uri: str | None = None) -> dict | None:
    """Which store and subjects pretrained the encoder behind ``spec`` (``None`` when unrecorded).

    ``s2v pretrain`` writes the record (:data:`s2v_core.splits.TRAINING_RECORD_FILE`)
    beside every encoder it saves, so it travels with the encoder directory and its
    MLflow artifacts; ``models:/`` specs carry none.
    """
    text = str(spec)
    if is_uri(text) or Path(text).exists():
        return read_training_record(_encoder_dir(text))
    run_id = text[len("runs:/") :].split("/")[0] if text.startswith("runs:/") else text
    if not _RUN_ID.match(run_id):
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_tracking_uri(tracking_uri, text))
    with tempfile.TemporaryDirectory(prefix="s2v-record-") as directory:
        try:
            local = client.download_artifacts(run_id, f"{ENCODER_ARTIFACT}/{TRAINING_RECORD_FILE}", directory)
        except Exception:  # MlflowException/OSError: an encoder logged before records existed
            return None
        return json.loads(Path(local).read_text(encoding="utf-8"))


def _encoder_dir(location: str) -> str:
    """The encoder directory of an encoder dir, a checkpoint or a run dir (a path or a URI)."""
    if file_type(join(location, MODEL_CONFIG_FILE)) == pafs.FileType.File:
        return location
    # A checkpoint, or a run dir with its final encoder.
    if file_type(join(location, ENCODER_DIR, MODEL_CONFIG_FILE)) == pafs.FileType.File:
        return join(location, ENCODER_DIR)
    latest = latest_checkpoint(location)
    if latest is not None:
        return join(latest, ENCODER_DIR)
    raise ValueError(
        f"--checkpoint: {location} holds no encoder (expected {MODEL_CONFIG_FILE}, a checkpoint's "
        f"{ENCODER_DIR}/ or a run dir with {ENCODER_DIR}/ or checkpoints/)"
    )


def _tracking_uri(tracking_uri: str | None, spec: str) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError(
            f"--checkpoint {spec}: an MLflow spec needs a tracking URI; set "
            "MLFLOW_TRACKING_URI or pass --mlflow-uri (e.g. sqlite:///RUN_DIR/mlflow.db)"
        )
    return uri


def _load_run_encoder(run_id: str, tracking_uri: str | None) -> SleepEncoder:
    from mlflow.tracking import MlflowClient

    uri = _tracking_uri(tracking_uri, run_id)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except Exception as exc:  # MlflowException for unknown ids; its text names the id
        raise ValueError(f"--checkpoint: no MLflow run {run_id!r} at {uri}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="s2v-encoder-") as directory:
        local = client.download_artifacts(run_id, ENCODER_ARTIFACT, directory)
        return load_encoder(local)


def _load_mlflow_model(spec: str, tracking_uri: str | None, *, allow_pickle: bool) -> SleepEncoder:
    if not allow_pickle:
        raise ValueError(
            f"--checkpoint {spec}: an MLflow pytorch model is a pickle, and loading one runs whatever code its "
            "author put in it; use runs:/<run_id> (the weights-only encoder every pretraining run logs) or, for a "
            "model you trust, allow pickles explicitly (s2v embed --allow-pickle-model)"
        )
    import mlflow

    from pipelines.runtime import tracking_uri_scope

    with tracking_uri_scope(_tracking_uri(tracking_uri, spec)):
        model = mlflow.pytorch.load_model(spec, map_location="cpu")
    if not isinstance(model, SleepEncoder):
        raise ValueError(f"--checkpoint {spec}: expected a SleepEncoder model, found {type(model).__name__}")
    return model.eval()


def load_encoder_spec(spec: str, *, allow_pickle: bool = False):
    """Load an encoder (eval mode, CPU) from a checkpoint dir, run dir or MLflow URI / run id.

    MLflow pytorch models (pickles) load only with ``allow_pickle``.

    Returns ``(encoder, pretrain_run)`` where ``pretrain_run`` is
    ``{"run_id", "tracking_uri"}`` of the pretraining MLflow run when it can
    be found (``RUN_DIR/mlflow_run.json`` above a checkpoint path, or the run
    id of a ``runs:/`` spec), else ``None``.
    """
    encoder = load_trained_encoder(spec, allow_pickle=allow_pickle)
    return encoder.eval(), _pretrain_run(str(spec))


def _pretrain_run(spec: str) -> dict | None:
    """The pretraining MLflow run behind ``spec``, if it can be told (see load_encoder_spec)."""
    if is_uri(spec) or Path(spec).exists():
        filesystem, folder = resolve(spec)
        for _ in range(5):  # RUN_DIR/checkpoints/step_*/encoder is four levels below the run dir
            record = f"{folder.rstrip('/')}/{MLFLOW_RUN_FILE}"
            if filesystem.get_file_info(record).type == pafs.FileType.File:
                with filesystem.open_input_stream(record) as stream:
                    data = json.loads(stream.read().decode("utf-8"))
                return {"run_id": data.get("run_id"), "tracking_uri": data.get("tracking_uri")}
            folder = posixpath.dirname(folder.rstrip("/"))
            if not folder.strip("/"):
                break
        return None
    run_id = spec[len("runs:/") :].split("/")[0] if spec.startswith("runs:/") else spec
    if len(run_id) == 32 and all(c in "0123456789abcdef" for c in run_id):
        return {"run_id": run_id, "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI")}
    return None
