"""Train the shipped demo model (weights/demo.safetensors) with the project's own code on synthetic data.

    python tools/train_demo.py            # ~1 min on a 2-core CPU

Uses ``workflows.demo.DATA`` / ``CONFIG`` / ``TRAIN_OVERRIDES`` so `imganom demo` regenerates matching data.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from imganom.workflows.demo import WEIGHTS, make_demo_data, train_demo_model


def main() -> None:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_demo_data(Path(tmp) / "data")
        model = train_demo_model(data, Path(tmp) / "run")
        WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model, WEIGHTS)
    print(f"wrote {WEIGHTS} ({WEIGHTS.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
