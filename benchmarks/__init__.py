"""Benchmarks that print numbers (``python -m fg3d_blender bench …`` from a checkout; never in the
add-on zip): AFLW2000-3D landmark NME, cross-view consistency, speed, peak memory, FGNet held-out, the
renderer against its numpy reference, and the FGNet figure."""
