"""Build the Cython twins in cyext/ as virtiofs_async._cy_* extension modules.

``pip install .`` compiles them; set VIRTIOFS_ASYNC_NO_EXT=1 to build a
pure-Python install.
"""
import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("VIRTIOFS_ASYNC_NO_EXT", "") in ("", "0"):
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
            Extension("virtiofs_async._cy_codec", ["cyext/codec.pyx"]),
            Extension("virtiofs_async._cy_vring", ["cyext/vring.pyx"]),
        ],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        annotate=os.environ.get("VIRTIOFS_ASYNC_ANNOTATE", "") not in ("", "0"),
    )

setup(ext_modules=ext_modules)
