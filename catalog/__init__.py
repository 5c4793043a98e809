"""The shipped catalog, installed as package data `residency_gate.catalog_data`.

Data only: provider and region files, wire formats, JSON Schemas (see README.md here).
Found at run time with importlib.resources, so a plain `pip install .` works.
"""
