"""sleep2vec core library: modalities, IO, store schema, model, losses, metrics.

Free of Ray, DeepSpeed and MLflow so that it can be unit-tested in
milliseconds and used from a notebook.
"""

__version__ = "0.1.0"
