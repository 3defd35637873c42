"""README's worked example of an imported nnU-Net model, run as written there (``runs/`` moved to a
temporary folder)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- example: imported nnU-Net model -->"


def example_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(re.escape(MARKER) + r"\s*```bash\n(.*?)```", readme, re.S)
    assert block is not None, f"README.md has no bash block after {MARKER}"
    return [line for line in block[1].replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.skipif(
    not (ROOT / "tests" / "nnunet" / "fixtures" / "manifest.json").is_file(), reason="nnU-Net fixtures not made"
)
def test_the_readme_example_imports_predicts_and_matches_nnunet(tmp_path):
    commands = example_commands()
    assert [c.split()[:2] for c in commands] == [
        ["medseg-jax", "import-nnunet"],
        ["medseg-jax", "predict"],
        ["medseg-jax", "evaluate"],
    ]
    for command in commands:
        args = [arg.replace("runs/", f"{tmp_path}/runs/") for arg in shlex.split(command)[1:]]
        result = subprocess.run(
            [sys.executable, "-m", "medseg_jax.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    predictions = tmp_path / "runs" / "nnunet_example" / "predictions"
    assert sorted(p.name for p in predictions.glob("*.nii.gz")) == ["synth_008.nii.gz", "synth_009.nii.gz"]
    assert sorted(p.name for p in (predictions / "report").glob("*.png")) == ["synth_008.png", "synth_009.png"]
    summary = json.loads((tmp_path / "runs" / "nnunet_example" / "against_nnunet" / "summary.json").read_text())
    # the README states the Dice against nnUNetv2_predict's own masks: keep it true
    stated = re.search(
        r"liver Dice\s+([0-9.]+) against them; neither predicts a tumour", (ROOT / "README.md").read_text()
    )
    assert stated is not None
    assert round(summary["classes"]["liver"]["dice"]["mean"], 3) == float(stated[1])
    tumour = summary["classes"]["tumour"]
    assert tumour["dice"]["count_nan"] == 2 and tumour["volume_pred"]["mean"] == tumour["volume_ref"]["mean"] == 0
