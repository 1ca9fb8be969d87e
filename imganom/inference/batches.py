"""Device batches on their way through ``Inspector.predict_stream`` (``stream``): host views -> backend ->
results.

``host_views`` builds the model views of a batch in one (pinned, on CUDA) host tensor; ``launch`` queues
the backend's work in OOM-adaptive chunks, resamples the maps to the original sizes and, where the
post-processing runs on the device, thresholds, morphology and scores there; ``collect`` waits for what
must come back and finishes on the host (connected components, or the whole host post-processing).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from imganom.data.preprocess import Geometry, prepare, to_original
from imganom.data.readers import ImageMeta
from imganom.inference.extras import attach, image_extras
from imganom.inference.pipeline import HostCopy, Prefetcher, host_map, overlapped, pipelined, run_adaptive
from imganom.inference.result import Result
from imganom.ops.device_post import binarize_t
from imganom.ops.head import HeadOutput, image_scores
from imganom.ops.postprocess import Region, find_regions

if TYPE_CHECKING:
    from imganom.inference.inspector import Inspector

Item = tuple[str, np.ndarray, ImageMeta | None]  # (id, normalised CHW, metadata)


@dataclass
class Batch:
    """One device batch on its way through ``Inspector.predict_stream``."""

    tag: Any
    items: list[Item]
    decode_ms: list[float]
    t0: float = field(default_factory=time.perf_counter)
    geoms: list[Geometry] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # first view of each image, then the total
    blocks: list[torch.Tensor] = field(default_factory=list)  # device maps / masks / stats blocks
    refs: list[tuple[int, int | None, int, int]] = field(default_factory=list)  # per image: blocks + row
    stats: HostCopy | None = None  # stats blocks on their way back: score, finite, elbo, mask nonempty
    stat_pos: dict[int, int] = field(default_factory=dict)  # block index -> position in ``stats``
    host: HostCopy | None = None  # all blocks on their way back (maps="all")
    extras: dict[int, dict] = field(default_factory=dict)  # image -> host side outputs (inference.extras)
    error: Exception | None = None


def host_views(insp: Inspector, batch: Batch) -> torch.Tensor | None:
    """Model views of the whole batch in one host tensor (pinned on CUDA, for the async copy)."""
    views = []
    for _, chw, _ in batch.items:
        v, g = prepare(chw, insp.cfg.preprocess)
        views.append(v)
        batch.geoms.append(g)
    batch.offsets = np.cumsum([0] + [len(v) for v in views]).tolist()
    if not views:
        return None
    if insp.device.type != "cuda":
        return torch.from_numpy(np.concatenate(views))
    x = torch.empty((batch.offsets[-1], *views[0].shape[1:]), dtype=torch.float32, pin_memory=True)
    np.concatenate(views, out=x.numpy())
    return x


def _chunk_groups(insp: Inspector, batch: Batch, x: torch.Tensor, idx: list[int]) -> list[tuple]:
    """Device maps for images ``idx`` at original size, grouped by shape: [(positions, HeadOutput)]."""
    s, e = batch.offsets[idx[0]], batch.offsets[idx[-1] + 1]
    ho = insp.model_maps_scored(x[s:e])
    maps, elbo, smaps = ho.maps, ho.elbo, ho.score_maps
    ref = torch.ones_like(elbo) if ho.reference is None else ho.reference.to(elbo.dtype)
    geoms = [batch.geoms[i] for i in idx]
    g0 = geoms[0]
    if all(g.mode == "stretch" and g.original == g0.original for g in geoms):  # one view each: batched
        h, w = g0.original

        def up(m: torch.Tensor) -> torch.Tensor:
            m = m.float()
            if tuple(m.shape[-2:]) == (h, w):
                return m
            return F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]

        spans = [(p, p + 1) for p in range(len(idx))]
        batch.extras.update(zip(idx, image_extras(insp, ho, spans, lambda m, p: up(m)[0])))
        return [
            (
                list(range(len(idx))),
                HeadOutput(up(maps), elbo.double(), None if smaps is None else up(smaps), ref.double()),
            )
        ]
    spans = [(batch.offsets[i] - s, batch.offsets[i + 1] - s) for i in idx]
    batch.extras.update(zip(idx, image_extras(insp, ho, spans, lambda m, p: to_original(m, geoms[p]))))
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    amaps, elbos, refs, smaps_o = [], [], [], []
    for p, i in enumerate(idx):
        a, b = batch.offsets[i] - s, batch.offsets[i + 1] - s
        amaps.append(to_original(maps[a:b], batch.geoms[i]))
        elbos.append(elbo[a:b].mean())
        refs.append(ref[a:b].mean())
        if smaps is not None:
            smaps_o.append(to_original(smaps[a:b], batch.geoms[i]))
        by_shape[tuple(amaps[-1].shape)].append(p)
    return [
        (
            ps,
            HeadOutput(
                torch.stack([amaps[p] for p in ps]),
                torch.stack([elbos[p] for p in ps]).double(),
                torch.stack([smaps_o[p] for p in ps]) if smaps is not None else None,
                torch.stack([refs[p] for p in ps]).double(),
            ),
        )
        for ps in by_shape.values()
    ]


def _device_chunk(insp: Inspector, batch: Batch, x: torch.Tensor, idx: list[int]) -> list[tuple]:
    """Images ``idx`` on the device -> per image (maps block, masks block or None, stats block, row)."""
    pp, thr_p = insp.cfg.postprocess, insp.pixel_threshold
    post = insp.device_postprocess or insp.maps != "all"
    out: list[tuple] = [None] * len(idx)
    for ps, ho in _chunk_groups(insp, batch, x, idx):
        maps, elbo, masks = ho.maps, ho.elbo, None
        _, roi_t, n_roi = insp.roi_tensors(tuple(maps.shape[-2:]))
        if post:
            score = image_scores(ho, pp, roi_t, n_roi)
            finite = torch.isfinite(maps).flatten(1).all(1).double()
            if thr_p is not None:
                masks = binarize_t(maps, thr_p, pp, roi_t)
                nonempty = masks.flatten(1).amax(1).double()
            else:
                nonempty = torch.zeros_like(elbo)
        else:  # host post-processing; only a score from standardised maps is taken here
            score = (
                torch.full_like(elbo, float("nan"))
                if ho.score_maps is None
                else image_scores(ho, pp, roi_t, n_roi)
            )
            finite, nonempty = torch.ones_like(elbo), torch.zeros_like(elbo)
        stats = torch.stack([score, finite, elbo, nonempty, ho.reference], 1)  # reference: 1 without
        for row, p in enumerate(ps):
            out[p] = (maps, masks, stats, row)
    return out


@torch.no_grad()
def launch(insp: Inspector, batch: Batch, x: torch.Tensor | None) -> Batch:
    """Queue one batch's device work (adaptive chunks on OOM) and start copying back what is needed."""
    n = len(batch.items)
    if n == 0 or x is None:
        return batch
    with insp.backend.lock:
        per = run_adaptive(lambda idx: _device_chunk(insp, batch, x, idx), list(range(n)), n, insp.adaptive)
    blocks: dict[int, torch.Tensor] = {}  # maps, masks and stats blocks, each copied back once
    for maps, masks, stats, _ in per:
        for t in (maps, masks, stats):
            if t is not None:
                blocks.setdefault(id(t), t)
    pos = {k: j for j, k in enumerate(blocks)}
    batch.refs = [(pos[id(m)], None if k is None else pos[id(k)], pos[id(s)], r) for m, k, s, r in per]
    batch.blocks = list(blocks.values())
    stat_ids = sorted({r[2] for r in batch.refs})
    batch.stats = HostCopy([batch.blocks[j] for j in stat_ids])
    batch.stat_pos = {j: p for p, j in enumerate(stat_ids)}
    if insp.maps == "all":  # every image needs its map and mask: copy the blocks as they are
        batch.host = HostCopy(batch.blocks)
    return batch


def _fetch(
    insp: Inspector, batch: Batch, need: np.ndarray
) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """Host (map, mask or None) of the images that ``need`` them: all blocks, or row by row."""
    if insp.maps == "all":
        host = batch.host.wait()
        return {
            j: (host[b][r], None if k is None else host[k][r]) for j, (b, k, _, r) in enumerate(batch.refs)
        }
    js = np.flatnonzero(need).tolist()
    rows = []
    for j in js:
        b, k, _, r = batch.refs[j]
        rows += [batch.blocks[b][r]] + ([] if k is None else [batch.blocks[k][r]])
    flat = iter(HostCopy(rows).wait())
    return {j: (next(flat), None if batch.refs[j][1] is None else next(flat)) for j in js}


def collect(insp: Inspector, batch: Batch, keep_image: bool) -> list[Result]:
    """Wait for one batch's copies, then score/verdict, masks and regions on the host; side outputs
    (latent, explanation, uncertainty) attached."""
    results = _collect(insp, batch, keep_image)
    return [attach(insp, r, batch.extras.get(j)) for j, r in enumerate(results)]


def _collect(insp: Inspector, batch: Batch, keep_image: bool) -> list[Result]:
    """``collect`` without the side outputs."""
    n = len(batch.items)
    if n == 0:
        return []
    stat_blocks = batch.stats.wait()
    st = np.stack([stat_blocks[batch.stat_pos[s]][r] for _, _, s, r in batch.refs])  # (n, 5)
    infer_ms = (time.perf_counter() - batch.t0) * 1e3 / n
    timings = [{"decode": d, "infer": infer_ms} for d in batch.decode_ms]
    if not (insp.device_postprocess or insp.maps != "all"):  # host post-processing, as on the CPU
        host = batch.host.wait()
        given = insp.standardize_mode == "score"  # score already taken from the standardised maps
        return [
            insp.finish(
                i,
                chw,
                m,
                torch.from_numpy(host[b][r]),
                float(st[j, 2]),
                timings[j],
                keep_image,
                score=float(st[j, 0]) if given else None,
                reference=float(st[j, 4]),
            )  # fmt: skip
            for j, ((i, chw, m), (b, _, _, r)) in enumerate(zip(batch.items, batch.refs))
        ]
    pp, thr_i, thr_p = insp.cfg.postprocess, insp.image_threshold, insp.pixel_threshold
    if (pp.score != "elbo" or thr_p is not None) and not st[:, 1].all():
        raise ValueError("anomaly map contains NaN or inf values")
    scores = st[:, 0] / st[:, 4]  # relative to the nearest normals' mean (calibration.neighbours), else / 1
    bad = scores > thr_i if thr_i is not None else np.zeros(n, bool)
    need = np.ones(n, bool) if insp.maps == "all" else bad if insp.maps == "ng" else np.zeros(n, bool)
    got = _fetch(insp, batch, need)
    rois = {a.shape: insp.roi_tensors(a.shape)[0] for a, _ in got.values()}

    def regions_of(j: int) -> tuple[np.ndarray, list[Region]]:  # connected components (OpenCV)
        amap, mask = got[j]
        if mask is None:
            return np.zeros(amap.shape, np.uint8), []
        if not st[j, 3]:  # empty on the device: nothing to label
            return mask, []
        return find_regions(mask, amap, pp.min_area, rois[amap.shape])

    t0 = time.perf_counter()
    post = dict(zip(got, host_map(regions_of, list(got))))
    post_ms = (time.perf_counter() - t0) * 1e3 / n
    results = []
    for j, (item_id, chw, meta) in enumerate(batch.items):
        amap = mask = None
        regions: list[Region] = []
        if j in post:
            amap = got[j][0]
            mask, regions = post[j]
        timing = {**timings[j], "post": post_ms}
        image = chw if keep_image else None
        size = batch.geoms[j].original
        results.append(
            insp.make_result(item_id, float(scores[j]), amap, mask, regions, timing, meta, image, size)
        )
    return results


def stream(
    insp: Inspector,
    source: Iterable[tuple[Any, list[Item], list[float] | None]],
    keep_image: bool = False,
    errors: str = "raise",
) -> Iterator[tuple[Any, list[Result] | Exception]]:
    """``Inspector.predict_stream``: host views, launch and collect of each batch, pipelined on CUDA."""
    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
    catch: tuple[type[Exception], ...] = (RuntimeError, ValueError) if errors == "return" else ()

    def host() -> Iterator[tuple[Batch, torch.Tensor | None]]:
        for tag, items, dms in source:
            items = list(items)
            b = Batch(tag, items, list(dms) if dms is not None else [0.0] * len(items))
            try:
                x = host_views(insp, b)
            except catch as e:
                b.error, x = e, None
            yield b, x

    def launched(bx: tuple[Batch, torch.Tensor | None]) -> Batch:
        b, x = bx
        if b.error is None:
            try:
                launch(insp, b, x)
            except catch as e:
                b.error = e
        return b

    def collected(b: Batch) -> tuple[Any, list[Result] | Exception]:
        if b.error is not None:
            return b.tag, b.error
        try:
            return b.tag, collect(insp, b, keep_image)
        except catch as e:
            return b.tag, e

    if insp.device.type == "cuda":
        return pipelined(Prefetcher(host(), insp.device), launched, collected, 1)
    return overlapped(host(), launched, collected, 1)  # the CPU: the model on a thread, the host here
