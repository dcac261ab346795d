"""Packaging shim: everything (metadata, the layer mapping, the kernel sources) is in pyproject.toml.

The design card names setup.py at the repository root; setuptools reads pyproject.toml, so this file
only lets `python setup.py ...` and tools that look for it work.
"""
from setuptools import setup

setup()
