"""sleep2vec core library: modalities, IO, store schema, model, losses, metrics.

Free of Ray, DeepSpeed and MLflow so that it can be unit-tested in
milliseconds and used from a notebook.
"""

__version__ = "0.1.0"

#: Public API re-exported lazily (``from s2v_core import stage``), so ``import s2v_core`` stays light.
_LAZY = {"stage": "s2v_core.staging", "stage_recording": "s2v_core.staging", "embed_recording": "s2v_core.staging"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 's2v_core' has no attribute {name!r}")
