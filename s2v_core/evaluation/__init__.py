"""Downstream evaluation maths: metrics, subject-grouped folds, probes and plots.

Pure numpy / scikit-learn / torch / matplotlib; no Ray, no MLflow (the
pipelines in ``pipelines/evaluate.py`` orchestrate these pieces).
"""
