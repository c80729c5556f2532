"""The test suite; tests.helpers and tests.fuzz are also used by bench/ and scripts/ (run as
modules from the repository root: python -m scripts.soak)."""
