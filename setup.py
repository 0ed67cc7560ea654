"""setuptools entry point: the cffi extension is described in setup_quiche.py."""

from setuptools import setup

setup(cffi_modules=["setup_quiche.py:ffibuilder"])
