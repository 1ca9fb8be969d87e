"""Small checks of the tools/ scripts that are not benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def test_summarize_evals_mean_spread_and_missing_values(tmp_path: Path) -> None:
    files = []
    for k, (auc, pro) in enumerate([(0.8, 0.6), (0.9, None)]):
        types = {"crack": {"image_auroc": auc}}
        m = {"image": {"auroc": auc}, "pixel": {"aupro_0.3": pro}, "per_type": types}
        f = tmp_path / f"m{k}.json"
        f.write_text(json.dumps(m))
        files.append(str(f))
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "summarize_evals.py"), "--label", "x", *files],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.splitlines()[2:]}
    assert rows["image AUROC"] == "0.850 ± 0.071 (0.800–0.900)"
    assert rows["AUPRO@0.3"] == "0.600 [1/2]"
    assert rows["crack: image AUROC"].startswith("0.850 ± 0.071")
    assert rows["pixel AUROC"] == "–"
