"""Builds the compiled renderer and landmark predictor: ``python setup.py build_ext --inplace``."""

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup


def _extension(name: str) -> Extension:
    return Extension(
        name,
        [name.replace(".", "/") + ".pyx"],
        include_dirs=[numpy.get_include()],
        # no -ffast-math, no fused multiply-adds: the landmark predictor repeats dlib's float steps
        extra_compile_args=["-O3", "-ffp-contract=off"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


extensions = [_extension("fg3d_blender.render_ext._raster"), _extension("fg3d_blender.landmark_ext._ert")]
setup(ext_modules=cythonize(extensions, language_level=3, quiet=True))
