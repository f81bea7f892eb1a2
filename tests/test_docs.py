"""The docs' measured numbers are in the committed run files they name (``make docs-check``), and the
checker behind it reports what it should."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from experiments import docs_check

ROOT = Path(__file__).resolve().parents[1]


def test_measured_docs_pass_docs_check():
    problems = [p for doc in docs_check.MEASURED_DOCS for p in docs_check.check_doc(ROOT / doc)]
    assert not problems, "\n".join(map(str, problems))


def test_docs_check_command_exits_zero():
    out = subprocess.run([sys.executable, "-m", "experiments.docs_check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 problem(s)" in out.stdout


def _doc(tmp_path: Path, text: str) -> list[str]:
    run = tmp_path / "docs" / "runs" / "r"
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps({"test": {"mean_dq": 7.72913, "converged": 32}, "eta": [0.025],
                                                  "note": "wall 453.2 s"}))
    doc = tmp_path / "docs" / "doc.md"
    doc.write_text(text)
    return [p.message for p in docs_check.check_doc(doc, root=tmp_path)]


def test_numbers_found_rounded_as_printed_pass(tmp_path):
    text = ("# R\n\n<!-- source: docs/runs/r/results.json -->\n\n| step | Dq | converged |\n|---|---|---|\n"
            "| 0.025 | **7.729** | 32 |\n\nRatio 7.73 after 453 s.\n")
    assert _doc(tmp_path, text) == []


def test_a_number_not_in_the_source_is_reported(tmp_path):
    text = "# R\n\n<!-- source: docs/runs/r/results.json -->\n\nmean Dq 7.739, converged 32.\n"
    assert _doc(tmp_path, text) == ["7.739 is not in docs/runs/r/results.json nor listed in the marker"]
    # more decimals than the source rounds to are not accepted either
    assert len(_doc(tmp_path, "<!-- source: docs/runs/r/results.json -->\n\nDq 7.7290.\n")) == 1


def test_numbers_without_a_marker_and_after_a_heading_are_reported(tmp_path):
    text = "<!-- source: docs/runs/r/results.json -->\n\nDq 7.729.\n\n## Next\n\nDq 7.729 again.\n"
    (msg,) = _doc(tmp_path, text)
    assert msg.startswith("numbers with no source marker: 7.729")


def test_markers_list_other_numbers_with_what_they_are(tmp_path):
    ok = "<!-- source: docs/runs/r/results.json; paper: 0.51; derived: 0.87 -->\n\n7.729 (paper 0.51), 0.87x.\n"
    assert _doc(tmp_path, ok) == []
    bad = "<!-- source: docs/runs/r/results.json; guess: 0.51 -->\n\n7.729, 0.51.\n"
    assert len(_doc(tmp_path, bad)) == 2  # the unknown label and the number it did not vouch for


def test_bad_markers_are_reported(tmp_path):
    assert _doc(tmp_path, "<!-- source: docs/runs/r/missing.json -->\n\nDq 7.729.\n")[0] == (
        "source docs/runs/r/missing.json does not exist")
    assert _doc(tmp_path, "<!-- unchecked: -->\n\nDq 7.729.\n") == ["an 'unchecked' marker needs a reason"]
    assert _doc(tmp_path, "<!-- unchecked: the paper's values -->\n\nDq 2.73.\n") == []


def test_what_is_not_a_measurement_is_skipped():
    text = ("On 2026-11-25 at 23:22 UTC, commit 58e4fbc, `make run 12.5` and ```x 3.3```, --bptt_epochs=3, "
            "stop at 1e-3 Å, paper table 6 and figures 3a, 5, appendix B.2, amu^0.5 Å, si_cpu on an H200, "
            "[file](docs/runs/x1.json), Cu2SiSe3.")
    assert docs_check.numbers_in_text(text) == []
    wrapped = docs_check.numbers_in_text("run `python -m x\n--steps=3 4.5` then 7.7")
    assert [(n.text, n.line) for n in wrapped] == [("7.7", 2)]
    nums = docs_check.numbers_in_text("ratio 0.867 (84,547 parameters), 2/3 converged, 0.87x\nand 20 %.")
    assert [(n.text, n.value, n.decimals, n.line) for n in nums] == [
        ("0.867", 0.867, 3, 1), ("84,547", 84547.0, 0, 1), ("2", 2.0, 0, 1), ("3", 3.0, 0, 1), ("0.87", 0.87, 2, 1),
        ("20", 20.0, 0, 2)]


def test_code_blocks_are_skipped(tmp_path):
    assert _doc(tmp_path, "# R\n\n```bash\npython -m x --steps=0.01,0.5 3.14\n```\n") == []
