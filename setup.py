"""Build the Cython twins in cyext/ as virtiofs_async._cy_* extension modules.

``pip install .`` compiles them; set VIRTIOFS_ASYNC_NO_EXT=1 to build a
pure-Python install. For development: ``python setup.py build_ext --inplace``
(the .so files land in src/virtiofs_async/).
"""
import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("VIRTIOFS_ASYNC_NO_EXT", "") in ("", "0"):
    from Cython.Build import cythonize

    # Shared C helpers (barriers, little-endian access) and their Cython
    # declarations; listed as depends so edits rebuild and sdists carry them.
    shared = ["cyext/include/vfa_hotpath.h", "cyext/vfa_hotpath.pxd"]
    ext_modules = cythonize(
        [
            Extension(
                "virtiofs_async._cy_codec",
                ["cyext/codec.pyx"],
                include_dirs=["cyext/include"],
                depends=[*shared, "cyext/codec.pyx"],
            ),
            Extension(
                "virtiofs_async._cy_iopool",
                ["cyext/iopool.pyx"],
                include_dirs=["cyext/include"],
                depends=["cyext/iopool.pyx"],
            ),
            Extension(
                "virtiofs_async._cy_responder",
                ["cyext/responder.pyx"],
                include_dirs=["cyext/include"],
                depends=[*shared, "cyext/responder.pyx"],
            ),
            Extension(
                "virtiofs_async._cy_vring",
                ["cyext/vring.pyx"],
                include_dirs=["cyext/include"],
                depends=[*shared, "cyext/include/vfa_copy_pool.h", "cyext/vring.pyx"],
            ),
        ],
        include_path=["cyext"],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        annotate=os.environ.get("VIRTIOFS_ASYNC_ANNOTATE", "") not in ("", "0"),
    )

setup(ext_modules=ext_modules)
