"""``imganom inspect --volumes``: NIfTI volumes and DICOM series in, one row and NIfTI / DICOM SEG files per
volume out, on the input's own grid (no reorientation, no resampling).

Inputs (``list_volumes``): every ``.nii``/``.nii.gz`` is a volume (3-D, or 4-D with the sequences as
channels); ``.dcm`` files, and files without an extension that carry the DICOM signature, are grouped by
SeriesInstanceUID into series (a multi-frame file is a volume by itself); ``--channels`` stacks one
subject's sequences; ``--sequences t1,t2,flair`` stacks ``<subject>_t1.nii.gz`` ... (or
``<subject>/t1.nii.gz`` ...) found in the input folders. Anything else, and any volume that cannot be read
or inspected, gets an error row: every input has a row.

Per volume (``volume_row``): verdict, score (the highest slice score) and its slice, the 3-D lesions (mm^3,
voxel and patient bounding boxes, peak score) and the geometry; files under ``volumes/<stem>/``:
``mask.nii.gz`` (uint8), ``anomaly_map.nii.gz`` (float32), both with the input's affine and header, and
``seg.dcm`` (DICOM SEG) for DICOM input. ``per_slice`` adds one row per slice (``ID#slice=NNNN``).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imganom.data.discovery import expand_inputs, relative_id
from imganom.data.names import printable
from imganom.data.readers import ImageReadError
from imganom.data.volumes import (
    Volume,
    check_axis,
    find_dicom_without_extension,
    group_dicom_series,
    is_dicom,
    is_nifti,
    read_dicom_volume,
    read_nifti,
    stack_channels,
)
from imganom.inference.inspector import Inspector
from imganom.inference.volume import VolumeResult, inspect_volume
from imganom.reporting.medical import write_dicom_seg, write_nifti_like
from imganom.reporting.results import CSV_COLUMNS, ResultsWriter
from imganom.reporting.writers import output_stem
from imganom.utils.files import write_json_atomic
from imganom.workflows.inspect import InspectStats, Item, build_summary, result_row

log = logging.getLogger(__name__)
VOLUME_COLUMNS = (
    *CSV_COLUMNS, "kind", "volume", "slice_index", "n_lesions", "lesion_volume_mm3", "orientation",
    "spacing_mm",
)  # fmt: skip
_EXTS = (".nii.gz", ".nii", ".dcm", ".dicom")


@dataclass
class VolumeOptions:
    """How volumes are inspected and what is written for each."""

    axis: int = 2  # slice along this axis of the stored array
    per_slice: bool = False  # also one row per slice
    connectivity: int = 3  # 3-D lesions: 1 faces, 2 + edges, 3 + corners (26-neighbourhood)
    nifti: bool = True  # mask.nii.gz and anomaly_map.nii.gz
    seg: bool = True  # seg.dcm for DICOM input

    def __post_init__(self) -> None:
        check_axis(self.axis)
        if self.connectivity not in (1, 2, 3):
            raise ValueError(f"connectivity must be 1, 2 or 3, got {self.connectivity}")


@dataclass
class VolumeSource:
    """One volume to inspect: its id, files and how to read them, or why it cannot be."""

    id: str
    paths: list[Path]
    kind: str  # 'nifti' | 'dicom' | 'channels' | 'error'
    error: str | None = None

    def load(self) -> Volume:
        if self.kind == "error":
            name = str(self.paths[0]) if self.paths else self.id
            raise ImageReadError(name, self.error or "cannot be read")
        if self.kind == "dicom":
            return read_dicom_volume(self.paths, self.id)
        if self.kind == "channels":
            return stack_channels([read_nifti(p) for p in self.paths], self.id)
        return read_nifti(self.paths[0], self.id)


def _strip(name: str) -> str:
    low = name.lower()
    return next((name[: -len(e)] for e in _EXTS if low.endswith(e)), name)


def _folder(item_id: str, path: Path) -> str:
    """The id of an item's folder (``a/b/x.dcm`` -> ``a/b``; a top-level file: its folder's name)."""
    return item_id.rsplit("/", 1)[0] if "/" in item_id else printable(path.resolve().parent.name or "root")


def _by_sequence(pairs: list[tuple[Path, str]], sequences: Sequence[str]) -> list[VolumeSource]:
    """NIfTI files stacked per subject in ``sequences`` order: ``<subject>_<seq>.nii.gz`` or
    ``<subject>/<seq>.nii.gz``; a file naming no sequence, or a subject missing one, is an error row."""
    seqs = [s.lower() for s in sequences]
    subjects: dict[str, dict[str, Path]] = {}
    out: list[VolumeSource] = []
    for p, item_id in pairs:
        stem = _strip(p.name).lower()
        seq = next((s for s in seqs if stem == s or stem.endswith("_" + s)), None)
        if seq is None:
            why = f"names no sequence of {', '.join(sequences)} (expected <subject>_<seq>.nii.gz)"
            out.append(VolumeSource(item_id, [p], "error", why))
            continue
        subject = _folder(item_id, p) if stem == seq else _strip(item_id)[: -len(seq) - 1]
        subjects.setdefault(subject, {})[seq] = p
    for subject, files in subjects.items():
        missing = [s for s in seqs if s not in files]
        if missing:
            why = f"subject {subject!r} lacks sequence(s) {', '.join(missing)}"
            out.append(VolumeSource(subject, list(files.values()), "error", why))
        else:
            out.append(VolumeSource(subject, [files[s] for s in seqs], "channels"))
    return out


def list_volumes(
    inputs: Sequence[str | Path],
    *,
    recursive: bool = True,
    channels: Sequence[Sequence[str | Path]] = (),
    sequences: Sequence[str] | None = None,
) -> list[VolumeSource]:
    """The volumes of the inputs (see the module docstring), in input order; ``channels``: one list of
    sequence files per subject."""
    pairs = expand_inputs(inputs, recursive=recursive) if inputs else []
    for item in inputs:  # DICOM files without an extension (PACS exports), which 2-D discovery does not list
        folder = Path(item)
        if folder.is_dir():
            prefix = printable(folder.resolve().name or "root") if len(inputs) > 1 else ""
            for p in find_dicom_without_extension(folder, recursive):
                rel = relative_id(p, folder)
                pairs.append((p, f"{prefix}/{rel}" if prefix else rel))
    out: list[VolumeSource] = []
    for group in channels:
        paths = [Path(p) for p in group]
        missing = [str(p) for p in paths if not p.is_file()]
        vid = "+".join(printable(p.name) for p in paths)
        if missing:
            out.append(VolumeSource(vid, paths, "error", f"sequence file(s) not found: {', '.join(missing)}"))
        else:
            out.append(VolumeSource(vid, paths, "channels"))
    nifti = [(p, i) for p, i in pairs if is_nifti(p)]
    if sequences:
        out += _by_sequence(nifti, sequences)
    else:
        out += [VolumeSource(i, [p], "nifti") for p, i in nifti]
    dicom = [(p, i) for p, i in pairs if is_dicom(p)]
    ids = {p: i for p, i in dicom}
    groups, bad = group_dicom_series([p for p, _ in dicom])
    folders: dict[str, int] = {}
    for key, paths in groups.items():
        if key.startswith("file:"):  # a multi-frame file
            out.append(VolumeSource(ids[paths[0]], paths, "dicom"))
            continue
        folder = _folder(ids[paths[0]], paths[0])
        folders[folder] = folders.get(folder, 0) + 1
        vid = folder if folders[folder] == 1 else f"{folder}#series={folders[folder]}"
        out.append(VolumeSource(vid, paths, "dicom"))
    out += [VolumeSource(ids[p], [p], "error", why) for p, why in bad.items()]
    for p, i in pairs:
        if not (is_nifti(p) or is_dicom(p)):
            why = "not a volume (NIfTI .nii/.nii.gz or DICOM .dcm); inspect 2-D images without --volumes"
            out.append(VolumeSource(i, [p], "error", why))
    return out


# -------------------------------------------------------------------------------------------------- outputs


def write_volume_outputs(out: Path, vol: Volume, vr: VolumeResult, options: VolumeOptions) -> dict[str, str]:
    """The files of one volume under ``out/volumes/<stem>/``; returns ``{kind: path relative to out}``."""
    stem = output_stem(vol.id if vol.id.lower().endswith(_EXTS) else vol.id + ".dcm")
    written: dict[str, str] = {}
    if options.nifti:
        for kind, rel, data in (
            ("mask", f"volumes/{stem}/mask.nii.gz", vr.mask),
            ("anomaly_map", f"volumes/{stem}/anomaly_map.nii.gz", vr.anomaly_map),
        ):
            write_nifti_like(out / rel, data, vol)
            written[kind] = rel
    if options.seg and vol.fmt == "dicom":
        rel = f"volumes/{stem}/seg.dcm"
        try:
            write_dicom_seg(out / rel, vr.mask, vol)
            written["seg"] = rel
        except ImportError:
            written["seg_error"] = "DICOM SEG needs highdicom: pip install 'imganom[medical]'"
        except Exception as e:  # noqa: BLE001 - the NIfTI outputs and the row stay valid
            log.error("DICOM SEG of %s failed: %s", vol.id, e)
            written["seg_error"] = f"DICOM SEG not written: {type(e).__name__}: {e}"
    return written


def volume_row(
    insp: Inspector, src: VolumeSource, vol: Volume | None, vr: VolumeResult | None, error: str | None,
    outputs: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    """The results row of one volume (``kind`` volume): its result, or its error."""
    row = result_row(insp, Item(src.paths[0] if src.paths else Path(src.id), src.id), None, error, {})
    row.update(kind="volume", volume=src.id, sources=[printable(str(p)) for p in src.paths])
    if vr is None or vol is None:
        return row
    lesions = [les.to_dict() for les in vr.lesions]
    row.update(
        status="ok", verdict=vr.verdict, score=vr.score, error=None,
        norm_score=None if vr.norm_score != vr.norm_score else vr.norm_score,
        slice_index=vr.slice_index, n_lesions=len(lesions), n_regions=len(lesions),
        max_region_area=max((les.voxels for les in vr.lesions), default=0),
        lesion_volume_mm3=round(sum(les.volume_mm3 for les in vr.lesions), 4),
        lesions=lesions, geometry=vol.geometry(vr.axis), orientation=vol.orientation,
        spacing_mm=[round(v, 6) for v in vol.spacing], size=list(vol.shape),
        slice_scores=[round(r.score, 6) for r in vr.slices],
        time_ms=round(vr.seconds * 1e3, 3), outputs=outputs,
    )  # fmt: skip
    return row


def slice_rows(insp: Inspector, src: VolumeSource, vr: VolumeResult) -> list[dict[str, Any]]:
    """One row per slice (``kind`` slice), as a 2-D image's row; no per-slice files."""
    rows = []
    for k, r in enumerate(vr.slices):
        row = result_row(insp, Item(src.paths[0], r.id, k), r, None, {})
        row.update(kind="slice", volume=src.id, slice_index=k)
        rows.append(row)
    return rows


def run_volumes(
    insp: Inspector,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    options: VolumeOptions | None = None,
    channels: Sequence[Sequence[str | Path]] = (),
    sequences: Sequence[str] | None = None,
    recursive: bool = True,
    batch_size: int = 16,
    resume: bool = False,
    report: bool = True,
    on_progress: Callable[[InspectStats], None] | None = None,
) -> tuple[list[dict], dict]:
    """Inspect every volume of the inputs into ``out``; returns (rows in input order, summary)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = options or VolumeOptions()
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    sources = list_volumes(inputs, recursive=recursive, channels=channels, sequences=sequences)
    st = InspectStats(total=len(sources))
    order: list[str] = []
    with ResultsWriter(out, resume=resume, columns=VOLUME_COLUMNS) as writer:
        done = set(writer.done_ids)
        for src in sources:
            order.append(src.id)
            if src.id in done:
                order += sorted(i for i in done if i.startswith(f"{src.id}#slice="))
                st.skipped += 1
                st.done += 1
                continue
            vol = vr = None
            error, outputs = None, {}
            try:
                vol = src.load()
                vr = inspect_volume(insp, vol, options.axis, batch_size=batch_size,
                                    connectivity=options.connectivity)  # fmt: skip
                outputs = write_volume_outputs(out, vol, vr, options)
            except ImageReadError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 - one bad volume never ends the run
                log.error("volume %s failed: %s", src.id, e)
                error = f"{src.id}: {type(e).__name__}: {e}"
            if error is not None:
                vr = None
            writer.write(volume_row(insp, src, vol, vr, error, outputs))
            if vr is not None and options.per_slice:
                for row in slice_rows(insp, src, vr):
                    writer.write(row)
                    order.append(row["id"])
            st.count(None if vr is None else vr.score, vr is not None and vr.is_anomalous)
            if on_progress:
                on_progress(st)
        rows = writer.finalize(order)
    st.seconds = time.perf_counter() - t0
    volumes = [r for r in rows if r.get("kind") != "slice"]
    summary = build_summary(insp, volumes, st, started)
    summary["volumes"] = {
        "axis": options.axis,
        "per_slice": options.per_slice,
        "lesions": sum(r.get("n_lesions") or 0 for r in volumes),
        "slices": sum(len(r.get("slice_scores") or []) for r in volumes),
    }
    write_json_atomic(out / "summary.json", summary)
    if report:
        from imganom.reporting.html import write_report

        write_report(out, volumes, summary)
    return rows, summary
