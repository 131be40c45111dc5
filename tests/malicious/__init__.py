"""A corpus of malicious checkpoint files, built on demand by :mod:`tests.malicious.corpus`."""
