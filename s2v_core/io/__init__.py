"""Readers for recordings, hypnograms, site metadata and site configs."""
