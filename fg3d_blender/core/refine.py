"""FGNet refinement stage (issue: FGNet).  Until trained weights ship, it returns None (no change)."""
from __future__ import annotations

from typing import Optional

import numpy as np


def refine(image: np.ndarray, fit) -> Optional[np.ndarray]:
    """Refined vertices (N,3) mm for a 3DMM fit, or None when no FGNet weights are installed."""
    return None
