"""Reading PyTorch weight files with torch (training, the export, the torch modules): tensors and plain
containers only, never code, and one clear line (``FG3DError``) when a file is not a usable checkpoint.
Every torch load of the project goes here; the inference path reads the same files without torch
(``pth_reader``, with the same messages)."""

from __future__ import annotations

import os
import pickle
import warnings
from typing import Union

import torch

from .errors import FG3DError
from .pth_reader import damaged, refused


def read_checkpoint(path: Union[str, os.PathLike], what: str = "weights file") -> dict:
    """The dict a ``.pt``/``.pth`` file holds, loaded with ``weights_only=True`` on the CPU.

    A file that holds Python objects besides tensors is refused (loading those could run code), and so
    is a damaged or foreign file; the message names the file and ``what`` it was meant to be."""
    file = os.fspath(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise for a user
            warnings.simplefilter("ignore")
            ck = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FG3DError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise FG3DError(f"{path}: is a folder, not a {what}") from None
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():  # a class or function it would have to call
            raise refused(path, what) from None
        raise damaged(path, what) from None
    except Exception as exc:  # noqa: BLE001 - zip, EOF, OS errors…: all mean "not a checkpoint"
        raise damaged(path, what, exc) from None
    if not isinstance(ck, dict):
        raise FG3DError(f"{path}: not a {what} (it holds a {type(ck).__name__}, not a dict of weights)")
    return ck


def load_state(module: torch.nn.Module, state: dict, path: Union[str, os.PathLike], what: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with a mismatch reported as one line."""
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FG3DError(f"{path}: does not hold {what} weights ({first[:160]})") from None
