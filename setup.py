"""Builds the compiled renderer: ``python setup.py build_ext --inplace``."""

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

ext = Extension(
    "fg3d_blender.render_ext._raster",
    ["fg3d_blender/render_ext/_raster.pyx"],
    include_dirs=[numpy.get_include()],
    extra_compile_args=["-O3"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)
setup(ext_modules=cythonize([ext], language_level=3, quiet=True))
