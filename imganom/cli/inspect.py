"""``imganom inspect``: a batch of images -> results tables, masks, heatmaps, overlays, summary and report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from imganom.cli.common import EXIT_NG, console, fail, progress_bar, setup
from imganom.cli.options import (
    BatchSizeOpt,
    ModelOptions,
    NoReportOpt,
    OverlaysOpt,
    RawMapsOpt,
    RecursiveOpt,
    VerboseOpt,
    WorkersOpt,
    check_overlays,
    check_raw_maps,
    with_model_options,
)

if TYPE_CHECKING:
    from imganom.inference.inspector import Inspector


@with_model_options
def inspect(
    model: ModelOptions,
    inputs: list[Path] = typer.Option(
        ..., "--input", "-i", help="Folder, image file or .txt list (repeatable)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    recursive: RecursiveOpt = True,
    batch_size: BatchSizeOpt = 16,
    workers: WorkersOpt = 2,
    decode: str = typer.Option(
        "threads", "--decode", help="Decode on --workers threads, or processes (readers that hold the GIL)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Skip inputs already in OUT/results.jsonl."),
    fail_on_ng: bool = typer.Option(False, "--fail-on-ng", help=f"Exit {EXIT_NG} if any image is NG."),
    raw_maps: RawMapsOpt = None,
    overlays: OverlaysOpt = "ng",
    no_report: NoReportOpt = False,
    engine: str = typer.Option("local", "--engine", help="local | ray (Ray Data, the [ray] extra)."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="--engine ray: auto | ray://HOST:PORT (default: a local Ray instance)."
    ),
    actors: int = typer.Option(1, "--actors", min=1, help="--engine ray: inspector actors (model copies)."),
    gpus_per_actor: float | None = typer.Option(
        None, "--gpus-per-actor", min=0, help="--engine ray: GPUs per actor (default: 1 if the cluster has)."
    ),
    volumes: bool = typer.Option(
        False, "--volumes", help="NIfTI files and DICOM series are volumes: per-volume rows, NIfTI "
        "masks/maps on the input's grid, DICOM SEG for DICOM (implied by --axis, --channels, --sequences, "
        "--per-slice).",
    ),
    axis: int | None = typer.Option(None, "--axis", min=0, max=2, help="Volumes: slice along this stored "
                                    "array axis (default 2; never reoriented)."),
    channels: bool = typer.Option(False, "--channels", help="Volumes: the --input files are one subject's "
                                  "sequences (e.g. T1, T2, FLAIR), stacked as channels in that order."),
    sequences: str | None = typer.Option(None, "--sequences", help="Volumes: stack <subject>_<seq>.nii.gz "
                                         "files of the input folders per subject, e.g. t1,t2,flair."),
    per_slice: bool = typer.Option(False, "--per-slice", help="Volumes: also one row per slice."),
    latents: bool = typer.Option(
        False, "--latents", help="Record each image's latent mean (results.jsonl 'latent', OUT/latents.npy)."
    ),
    explain: bool = typer.Option(
        False, "--explain", help="Write reconstruction and residual PNGs (explain/) for the overlaid images."
    ),
    verbose: VerboseOpt = False,
) -> None:
    """Inspect images; writes results.csv/jsonl, masks, heatmaps, overlays, summary.json and report.html."""
    setup(verbose)
    from rich.progress import TextColumn

    from imganom.reporting.writers import OutputOptions
    from imganom.workflows.inspect import InspectStats, run_inspect

    check_raw_maps(raw_maps)
    check_overlays(overlays)
    if engine not in ("local", "ray"):
        fail(f"--engine must be local or ray, got {engine!r}")
    as_volumes = volumes or axis is not None or channels or bool(sequences) or per_slice
    if latents and (as_volumes or engine != "local"):
        fail("--latents records images on --engine local (not volumes, not --engine ray)")
    if as_volumes and engine != "local":
        fail("--engine ray inspects images and slices; volumes (--volumes, --axis, --channels, --sequences, "
             "--per-slice) run on --engine local")  # fmt: skip
    if decode not in ("threads", "processes"):  # workflows.inspect.DECODE_MODES (not imported: --help)
        fail(f"--decode must be threads or processes, got {decode!r}")
    insp = model.load()
    progress = progress_bar(
        "inspect", TextColumn("{task.fields[ips]:.1f} img/s  NG {task.fields[ng]}  errors {task.fields[err]}")
    )
    t0 = [0.0]
    with progress:
        task = progress.add_task("inspect", total=None, ips=0.0, ng=0, err=0)

        def on_progress(st: InspectStats) -> None:
            if not t0[0]:
                t0[0] = time.perf_counter()
            el = max(time.perf_counter() - t0[0], 1e-6)
            ips = (st.done - st.skipped) / el
            progress.update(task, total=st.total, completed=st.done, ng=st.ng, err=st.error, ips=ips)

        common = {
            "recursive": recursive,
            "batch_size": batch_size,
            "resume": resume,
            "report": not no_report,
            "options": OutputOptions(raw_maps=raw_maps, overlays=overlays, explain=explain),
            "on_progress": on_progress,
        }
        try:
            if as_volumes:
                from imganom.workflows.volumes import VolumeOptions, run_volumes

                _, summary = run_volumes(
                    insp, [] if channels else inputs, out, recursive=recursive, batch_size=batch_size,
                    resume=resume, report=not no_report, on_progress=on_progress,
                    options=VolumeOptions(axis=2 if axis is None else axis, per_slice=per_slice),
                    channels=[inputs] if channels else (),
                    sequences=[s.strip() for s in sequences.split(",") if s.strip()] if sequences else None,
                )  # fmt: skip
            elif engine == "ray":
                ray_opts = (ray_address, actors, gpus_per_actor)
                _, summary = inspect_on_ray(model, insp, inputs, out, ray_opts, common)
            else:
                _, summary = run_inspect(
                    insp, inputs, out, workers=workers, decode=decode, latents=latents, **common
                )
        except (FileNotFoundError, ImportError) as e:
            fail(str(e))
    c, what = summary["counts"], "volumes" if "volumes" in summary else "images"
    console.print(
        f"{c['total']} {what}: {c['ok']} OK, {c['ng']} NG, "
        + (f"{c['review']} review, " if c.get("review") else "")
        + f"{c['error']} errors"
        + (f" ({c['resumed']} from a previous run)" if c["resumed"] else "")
        + (f"; {summary['throughput_img_s']:.1f} img/s" if summary["throughput_img_s"] else "")
    )
    console.print(
        f"results: {out / 'results.csv'}" + ("" if no_report else f"\nreport:  {out / 'report.html'}")
    )
    if fail_on_ng and c["ng"]:
        raise typer.Exit(EXIT_NG)


def inspect_on_ray(
    model: ModelOptions,
    insp: Inspector,
    inputs: list[Path],
    out: Path,
    ray_opts: tuple[str | None, int, float | None],
    common: dict,
) -> tuple[list[dict], dict]:
    """``--engine ray``: every actor loads the model with the command's model options; ``ray_opts``:
    (``--ray-address``, ``--actors``, ``--gpus-per-actor``)."""
    from dataclasses import asdict

    from imganom.workflows.ray_engine import RayOptions, run_inspect_ray

    load_kw = asdict(model)
    path = load_kw.pop("model")
    engine = RayOptions(*ray_opts)
    return run_inspect_ray(insp, path, load_kw, inputs, out, engine=engine, **common)
