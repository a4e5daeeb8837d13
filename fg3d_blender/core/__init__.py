"""Blender-free pipeline: image → detections → 3DMM → renders → refinement → textured mesh → outputs."""
