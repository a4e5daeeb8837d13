"""FGNet training (``python -m fg3d_blender train-fgnet``): self-supervised on real photos, optionally
fine-tuned with synthetic views of known shape.

1. Cache (``cache``): every photo's coarse fit exactly as the pipeline makes it, and the loss inputs.
2. Training: the network sees exactly the inputs the pipeline gives it (``fgnet_inputs``, through
   ``Batcher``) and predicts a UV shape-difference map D (mm) added to the coarse UV position map;
   the losses are in ``losses``.
3. Synthetic views (``--views N``, usually a fine-tune with ``--init``): single photos carry no
   multi-view signal, so ``views`` renders training faces turned away from the camera, whose 3D shape
   is known, and their 3D error is added for ``--views-per-batch`` renders per step.
4. Synthetic faces beyond the 3DMM (``--synthetic N --ict DIR``): ``synthetic`` draws ICT-FaceKit
   light-stage identities on the BFM mesh, textured and lit from real photos, at poses up to ±80° yaw;
   the pipeline's own detection and coarse fit run on each render, and the 3D error against the drawn
   shape is added for ``--synthetic-per-batch`` renders per step (our FG3D).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fg3d_blender.core import threads as thread_policy
from fg3d_blender.core.assets import sha256_of, write_bundled
from fg3d_blender.core.checkpoint import load_state, read_checkpoint
from fg3d_blender.core.errors import FG3DError
from fg3d_blender.core.fgnet import FGNet, load_checkpoint
from fg3d_blender.core.fgnet_inputs import PAF_K
from fg3d_blender.core.image_io import list_photos
from fg3d_blender.core.pipeline import Reconstructor
from fg3d_blender.core.refine import FGNetRefiner

from .batches import Batcher
from .cache import build_cache, is_holdout, load_cache
from .evaluate import evaluate, evaluate_views, recalibrate_bn
from .losses import Losses
from .synthetic import build_synthetic_cache, is_held, miss_counts
from .views import build_view_cache

FGNET_LICENCE = "BSD-2-Clause (this project's own training output; see FGNET_MODEL_CARD.md)"


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """Cosine schedule from ``lr`` down to 5 % of it at ``steps``."""
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))


def save_weights(net, path: Path, meta: dict) -> str:
    """fp16 weights in our format (``state_dict`` + width/size metadata), written atomically; → sha256."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(dict(meta, state_dict=state), str(tmp))
    os.replace(tmp, path)
    return sha256_of(path)


def train(
    photos: Path,
    out: Path,
    steps: int = 2000,
    resume: bool = False,
    cache: Optional[Path] = None,
    width: int = 8,
    size: int = 128,
    batch: int = 8,
    lr: float = 1e-3,
    checkpoint_every: int = 100,
    eval_every: int = 500,
    seed: int = 0,
    target: str = "head",
    threads: int = 1,
    init: Optional[Path] = None,
    views: int = 0,
    views_per_batch: int = 4,
    view_weight: float = 0.15,
    synthetic: int = 0,
    synthetic_per_batch: int = 8,
    synthetic_weight: float = 0.3,
    ict: Optional[Path] = None,
    log=print,
) -> dict:
    """Train (or, with ``init``, fine-tune) FGNet on ``photos``; see the module docstring.

    ``views`` > 0 adds that many synthetic views of training photos (``view_one``; their geometry is the
    coarse fit plus ``init``'s refinement, or the coarse fit alone without ``init``), ``views_per_batch``
    per step, with their 3D shape error weighted by ``view_weight`` per mm.  ``synthetic`` > 0 adds that
    many synthetic faces of ICT-FaceKit identities (``synthetic``; ``ict`` is ICT's folder; 1 in 20 more
    are held out), ``synthetic_per_batch`` per step, their 3D error weighted by ``synthetic_weight``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rec = Reconstructor(threads=threads)  # one policy (core.threads) for torch and the pipeline's stages
    thread_policy.apply(threads, torch=True)  # --threads is the one setting (OMP_NUM_THREADS is not read)
    fm = rec.face_model
    cache = Path(cache or out.with_suffix(".cache"))
    if Path(photos).is_dir():
        build_cache(rec, list_photos(photos), cache, size, log=log)  # resumable: finished shards are kept
    data = load_cache(cache)
    if data["size"] != size:
        raise FG3DError(f"cache {cache} was built at UV size {data['size']}, not {size}; use another --cache")
    hold = np.array([is_holdout(str(n)) for n in data["names"]])
    train_idx, held_idx = np.flatnonzero(~hold), np.flatnonzero(hold)
    log(
        f"{len(data['names'])} cached faces: {len(train_idx)} train, {len(held_idx)} held out; "
        f"device {device}"
    )
    batcher = Batcher(fm, data, size, device, target)
    losses = Losses(fm, batcher.uvm, device, target=target)
    torch.manual_seed(seed)
    teacher, tag = None, ""
    if init is not None:
        teacher = FGNetRefiner(load_checkpoint(init), fm, size)
        tag = sha256_of(Path(init))
        width = teacher.net.width
    net = FGNet(width=width).to(device)
    net.set_bn_momentum(0.1)
    if teacher is not None:
        net.load_state_dict(teacher.net.state_dict())
    else:
        torch.nn.init.zeros_(net.output_conv[0].weight)
        torch.nn.init.zeros_(net.output_conv[0].bias)
    # renders whose shape is known: (name, batcher, train rows, held-out rows, per step, weight, 3D error)
    sets = []

    def add_known(name, kdata, khold, per_batch, weight, error):
        k_train, k_held = np.flatnonzero(~khold), np.flatnonzero(khold)
        batcher_k = Batcher(fm, kdata, size, device, "head")
        sets.append((name, batcher_k, k_train, k_held, per_batch, weight, error))
        log(
            f"{len(kdata['names'])} {name} renders of known shape: "
            f"{len(k_train)} train, {len(k_held)} held out"
        )

    if views > 0:
        pick = np.random.default_rng(seed).permutation(train_idx)[:views]
        held_pick = held_idx[: max(1, views // 20)]
        build_view_cache(
            rec, data, np.concatenate([pick, held_pick]), cache / "views", size, teacher, tag, log=log
        )
        vdata = load_cache(cache / "views", "views_*.npz")
        vhold = np.array([is_holdout(str(n)[len("view_") :]) for n in vdata["names"]])
        add_known("view", vdata, vhold, views_per_batch, view_weight, losses.shape_error_mm)
    if synthetic > 0:
        if ict is None or not Path(ict).is_dir():
            raise FG3DError("--synthetic needs --ict DIR (ICT-FaceKit's shape modes, shared/ict_facekit)")
        n_held = max(1, synthetic // 20)
        build_synthetic_cache(
            rec, data, train_idx, held_idx, synthetic, n_held, Path(ict), cache / "synthetic", size, log=log
        )
        sdata = load_cache(cache / "synthetic", "synth_*.npz")
        log(f"synthetic draws: {json.dumps(miss_counts(cache / 'synthetic'))}")
        shold = np.array([is_held(n) for n in sdata["names"]])
        add_known("synthetic", sdata, shold, synthetic_per_batch, synthetic_weight, losses.surface_error_mm)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    ckpt = out.with_name(out.name + ".ckpt")
    step, history = 0, []
    if resume and ckpt.is_file():
        ck = read_checkpoint(ckpt, "training checkpoint (--resume)")
        try:
            load_state(net, ck["state_dict"], ckpt, f"FGNet width {width}")
            opt.load_state_dict(ck["optimizer"])
            step, history = int(ck["step"]), json.loads(ck["history"])
        except (KeyError, TypeError, ValueError):
            raise FG3DError(f"{ckpt}: not a checkpoint of train-fgnet; delete it to start afresh") from None
        log(f"resumed from {ckpt} at step {step}")
    rng = np.random.default_rng(seed + step)
    t0, seen = time.perf_counter(), 0
    run = {}
    while step < steps:
        net.train()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(lr, step, steps)
        b = batcher.batch(rng.choice(train_idx, batch, replace=False))
        d = net(b["paf"], b["vis"], b["shape"])
        total, parts = losses(d, b)
        for name, kb, k_train, _, per_batch, weight, error in sets:
            bv = kb.batch(rng.choice(k_train, min(per_batch, len(k_train)), replace=False))
            dv = net(bv["paf"], bv["vis"], bv["shape"])
            tv, _ = losses(dv, bv)
            err = error(dv, bv).mean()
            total = total + tv * (len(bv["paf"]) / batch) + weight * err
            parts[f"{name}_3d_mm"] = float(err.detach())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        step += 1
        seen += 1
        for k, v in parts.items():
            run[k] = 0.9 * run.get(k, v) + 0.1 * v
        if step % 10 == 0 or step == steps:
            rate = (time.perf_counter() - t0) / seen
            bar = "#" * int(30 * step / steps)
            log(
                f"[{bar:30s}] step {step}/{steps} "
                + " ".join(f"{k} {v:.4g}" for k, v in run.items())
                + f" | {rate:.2f} s/step, ETA {rate * (steps - step) / 60:.0f} min"
            )
        if step % checkpoint_every == 0 or step == steps:
            history.append({"step": step, **run})
            tmp = ckpt.with_name(f".{ckpt.name}.tmp")
            torch.save(
                {
                    "state_dict": net.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "history": json.dumps(history),
                },
                str(tmp),
            )
            os.replace(tmp, ckpt)
            save_weights(
                net,
                out,
                {"width": width, "uv_size": size, "paf_k": PAF_K, "step": step, "landmark_target": target},
            )
        if eval_every and step % eval_every == 0 and step < steps:
            recalibrate_bn(net, batcher, train_idx, seed=step)
            ev = evaluate(net, batcher, losses, held_idx[:256])
            for name, kb, _, k_held, *_ in sets:
                ev.update(evaluate_views(net, kb, losses, k_held, prefix=name))
            log("held-out: " + json.dumps(ev))
    recalibrate_bn(net, batcher, train_idx, batches=80, seed=step)
    ev = evaluate(net, batcher, losses, held_idx)
    for name, kb, _, k_held, *_ in sets:
        ev.update(evaluate_views(net, kb, losses, k_held, prefix=name))
    sha = save_weights(
        net,
        out,
        {
            "width": width,
            "uv_size": size,
            "paf_k": PAF_K,
            "step": step,
            "landmark_target": target,
            "heldout": json.dumps(ev),
            "views": views,
            "synthetic": synthetic,
            "init_sha256": tag,
        },
    )
    log("final held-out: " + json.dumps(ev))
    return {
        "out": str(out),
        "sha256": sha,
        "steps": step,
        "heldout": ev,
        "device": str(device),
        "landmark_target": target,
        "views": views,
        "synthetic": synthetic,
        "init_sha256": tag,
    }


def install_weights(src: Path, models: Path, name: Optional[str] = None) -> dict:
    """Copy trained weights into ``models/`` and record them (role ``fgnet``: file, sha256, width, UV size,
    …) in ``models/assets.json``; returns the manifest entry."""
    ck = read_checkpoint(src, "trained FGNet file")
    name = name or f"fgnet_w{int(ck['width'])}_uv{int(ck['uv_size'])}.pt"
    dst = models / name
    if Path(src).resolve() != dst.resolve():
        shutil.copyfile(src, dst)
    meta = {
        "width": int(ck["width"]),
        "uv_size": int(ck["uv_size"]),
        "paf_k": int(ck["paf_k"]),
        "steps": int(ck["step"]),
        "landmark_target": str(ck.get("landmark_target", "dlib")),
    }
    if int(ck.get("views", 0)):
        meta.update(views=int(ck["views"]), init_sha256=str(ck["init_sha256"]))
    if int(ck.get("synthetic", 0)):
        meta.update(synthetic=int(ck["synthetic"]), init_sha256=str(ck["init_sha256"]))
    entry = {
        "role": "fgnet",
        "path": name,
        "size": dst.stat().st_size,
        "sha256": sha256_of(dst),
        "licence": FGNET_LICENCE,
        "meta": meta,
    }
    write_bundled(models, entry)
    return entry
