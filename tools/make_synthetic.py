"""Write a deterministic synthetic MVTec-style dataset (thin CLI over ``imganom.data.synth.make_dataset``).

Example: ``python tools/make_synthetic.py /tmp/synth --size 128 --channels 3 --texture weave --seed 1``
"""

from __future__ import annotations

import argparse
import json
import time

from imganom.data.synth import DEFECTS, FORMATS, TEXTURES, make_dataset


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, write the dataset, print its summary (plus the time taken) as JSON and return it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="output folder (created; existing files with the same names are overwritten)")
    p.add_argument("--n-train", type=int, default=60)
    p.add_argument("--n-test-good", type=int, default=20)
    p.add_argument("--n-test-defect", type=int, default=20, help="split round-robin across --defects")
    p.add_argument("--size", type=int, nargs="+", default=[64], metavar="PX", help="side, or height width")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1)
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8)
    p.add_argument("--texture", choices=(*TEXTURES, "mixed"), default="grain")
    p.add_argument(
        "--defects", default=",".join(DEFECTS), help=f"comma-separated subset of {','.join(DEFECTS)}"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fmt", choices=FORMATS, default="png")
    a = p.parse_args(argv)
    if len(a.size) > 2:
        p.error("--size takes one or two numbers")
    t0 = time.perf_counter()
    try:
        summary = make_dataset(
            a.root,
            n_train=a.n_train,
            n_test_good=a.n_test_good,
            n_test_defect=a.n_test_defect,
            size=a.size[0] if len(a.size) == 1 else (a.size[0], a.size[1]),
            channels=a.channels,
            bit_depth=a.bit_depth,
            texture=a.texture,
            defects=[d.strip() for d in a.defects.split(",") if d.strip()],
            seed=a.seed,
            fmt=a.fmt,
        )
    except ValueError as e:
        p.error(str(e))
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - t0, 3)}, indent=2))
    return summary


if __name__ == "__main__":
    main()
