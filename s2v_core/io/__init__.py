"""Readers for recordings, hypnograms, site metadata and site configs.

One module per format behind one typed contract (:mod:`s2v_core.io.base`),
dispatched by tables:

========================  ==============================================  ==========================
what                      module                                          entry point
========================  ==============================================  ==========================
EDF/EDF+C/BDF/BDF+C       :mod:`~s2v_core.io.edf` (numpy, pyedflib)        ``open_signal(path)``
EDF+ annotations          :mod:`~s2v_core.io.hypnogram_edf`               ``read_hypnogram(path)``
NSRR XML                  :mod:`~s2v_core.io.hypnogram_xml`               ``read_hypnogram(path)``
CSV/TSV, DREAMS text      :mod:`~s2v_core.io.hypnogram_csv`               ``read_hypnogram(path)``
stage conventions         :mod:`~s2v_core.io.stages`                      ``epoch_stages``, ``align_stages``
site metadata table       :mod:`~s2v_core.io.metadata`                    ``read_site_metadata``
site.toml                 :mod:`~s2v_core.io.site_config`                 ``load_site_config``
sites and recordings      :mod:`~s2v_core.io.discovery`                   ``find_sites``, ``discover_site``
========================  ==============================================  ==========================
"""
