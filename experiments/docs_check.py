"""Check that every measured number in the docs comes from a committed run file.

    python -m experiments.docs_check                 # the measured docs (MEASURED_DOCS)
    python -m experiments.docs_check docs/results.md # one file

A measured doc marks where its numbers come from with HTML comments, each applying to the text
after it up to the next marker or heading:

* ``<!-- source: docs/runs/si_cpu/results.json, docs/runs/si_cpu/config.json -->``: every number
  in that text must appear, rounded as printed, among the numbers of those files (JSON values
  flattened, any other file read as text: every number written in it);
  Numbers that belong to the text but to no run file are listed in the marker after the files,
  each list labelled with what they are: ``; paper: 2.73, 5.32`` (the paper's values),
  ``; derived: 0.87`` (computed from the sourced numbers), ``; setting: 500`` (inputs of the run),
  ``; data: 6,046`` (properties of a shipped data set), ``; unrecorded: 18.8`` (read from a run
  whose files were not committed, which the doc must say in words);
* ``<!-- unchecked: why -->``: text whose numbers are not measurements of a committed run (settings,
  the paper's values, numbers from an earlier version that are not reproduced, said so in the
  text); the reason is required.

A number in a measured doc outside any marked text is reported, as is a number not found in its
sources and a source file that does not exist. Not numbers, here: code blocks and inline code,
dates, times, commit hashes, ``--flag=value``, scientific notation (settings such as 1e-3),
references such as "table 6", "figure 3a", "appendix B.2", "section 4", "eq. 1", exponents of
units (amu^0.5), link targets and names with digits inside (si_cpu, H200, Cu2SiSe3).
Exit status 1 when anything is reported. Uses only the standard library.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Iterable, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
LITERAL_LABELS = ("paper", "derived", "setting", "data", "unrecorded")
MEASURED_DOCS = ("docs/results.md", "docs/performance.md", "docs/example_gan.md", "docs/fire.md", "docs/data.md")

MARKER = re.compile(r"<!--\s*(source|unchecked)\s*:(.*?)-->", re.S)
NUMBER = re.compile(r"(?<![\w.^])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\w.]*\d)(?!\.\d)")
NOT_NUMBERS = [
    re.compile(p, re.I)
    for p in (
        r"`[^`]*`",  # inline code
        r"\]\([^)]*\)",  # link targets
        r"<!--.*?-->",
        r"\d{4}-\d{2}-\d{2}",  # dates
        r"\b\d{1,2}:\d{2}(:\d{2})?\b",  # times
        r"--[\w-]+(=\S+)?",  # flags
        r"\b\d+(\.\d+)?e[-+]?\d+\b",  # scientific notation
        r"\b[0-9a-f]*[a-f][0-9a-f]*\b",  # hex words (commit hashes)
        r"\b(tables?|figures?|figs?\.|sections?|appendix|app\.|eq\.|equations?|steps? of|version)\s+"
        r"[\dA-Z][\w.]*((\s*,\s*|\s+and\s+)[\dA-Z][\w.]*)*",
        r"\^[\d.½]+",  # unit exponents
        r"\b\w*[A-Za-z_]\d[\w.-]*",  # names with digits inside (si_cpu, H200, Cu2SiSe3, bf16)
    )
]


class Problem(NamedTuple):
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class Number(NamedTuple):
    text: str
    value: float
    decimals: int
    line: int


def numbers_in_text(text: str, first_line: int = 1) -> list[Number]:
    """The measured-looking numbers of markdown prose or a table, with their line numbers."""
    out = []
    # inline code may wrap onto the next line: blank it over the whole block, keeping the line breaks
    text = re.sub(r"`[^`]*`", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    for offset, line in enumerate(text.splitlines()):
        for pattern in NOT_NUMBERS:
            line = pattern.sub(lambda m: " " * len(m.group(0)), line)
        for m in NUMBER.finditer(line):
            whole, frac = m.group(1).replace(",", ""), m.group(2) or ""
            out.append(Number(m.group(0), float(whole + frac), max(len(frac) - 1, 0), first_line + offset))
    return out


def _flatten_json(obj) -> Iterable[float]:
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        if math.isfinite(obj):
            yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _flatten_json(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _flatten_json(v)
    elif isinstance(obj, str):
        yield from _numbers_of_text(obj)


def _numbers_of_text(text: str) -> Iterable[float]:
    for m in re.finditer(r"[-+]?(\d{1,3}(?:,\d{3})+|\d*\.?\d+)([eE][-+]?\d+)?", text):
        try:
            yield float(m.group(0).replace(",", ""))
        except ValueError:
            continue


def source_values(path: Path) -> list[float]:
    """Every number of a run file: JSON (and JSON lines) values flattened, other files as text."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".json", ".jsonl"):
        try:
            docs = [json.loads(text)] if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x]
            return [abs(v) for v in _flatten_json(docs)]
        except json.JSONDecodeError:
            pass
    return [abs(v) for v in _numbers_of_text(text)]


def printed_as(value: float, number: Number) -> bool:
    """Whether ``value`` prints as ``number`` at the number's decimals (round half either way)."""
    return abs(value - number.value) <= 0.5 * 10.0 ** -number.decimals * (1 + 1e-9) + 1e-12


def _blocks(text: str) -> Iterable[tuple[int, str, str]]:
    """(first line, kind, text): kind is "heading", "marker", "code" or "text"."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].lstrip().startswith("```"):
                j += 1
            yield i + 1, "code", "\n".join(lines[i:j + 1])
            i = j + 1
        elif line.startswith("#"):
            yield i + 1, "heading", line
            i += 1
        elif line.lstrip().startswith("<!--"):
            j = i
            while j < len(lines) and "-->" not in lines[j]:
                j += 1
            yield i + 1, "marker", "\n".join(lines[i:j + 1])
            i = j + 1
        elif not line.strip():
            i += 1
        else:
            j = i
            while (j < len(lines) and lines[j].strip() and not lines[j].startswith("#")
                   and not lines[j].lstrip().startswith(("```", "<!--"))):
                j += 1
            yield i + 1, "text", "\n".join(lines[i:j])
            i = j


def check_doc(path: Path, root: Path = ROOT) -> list[Problem]:
    """Problems of one measured doc (see the module docstring)."""
    rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    problems: list[Problem] = []
    mode, sources, cache = None, [], {}
    for first, kind, text in _blocks(path.read_text(encoding="utf-8")):
        if kind == "heading":
            mode, sources = None, []
        elif kind == "marker":
            m = MARKER.search(text)
            if m is None:
                continue
            mode, arg = m.group(1), m.group(2).strip()
            sources = []
            if mode == "unchecked" and not arg:
                problems.append(Problem(rel, first, "an 'unchecked' marker needs a reason"))
            if mode == "source":
                files, *extras = arg.split(";")
                literals = []
                for extra in extras:
                    label, _, listed = extra.partition(":")
                    if label.strip() not in LITERAL_LABELS or not listed.strip():
                        problems.append(Problem(rel, first, f"'{extra.strip()}' is not '<label>: numbers' with a label "
                                                f"in {LITERAL_LABELS}"))
                        continue
                    literals += list(_numbers_of_text(listed))
                for name in filter(None, (s.strip() for s in files.split(","))):
                    file = root / name
                    if not file.is_file():
                        problems.append(Problem(rel, first, f"source {name} does not exist"))
                        continue
                    if name not in cache:
                        cache[name] = source_values(file)
                    sources.append(name)
                if not sources:
                    problems.append(Problem(rel, first, "a 'source' marker names no existing file"))
                cache[("literals", first)] = literals
                sources.append(("literals", first))
        elif kind == "text":
            nums = numbers_in_text(text, first)
            if not nums or mode == "unchecked":
                continue
            if mode is None:
                problems.append(Problem(rel, first, f"numbers with no source marker: "
                                        f"{', '.join(n.text for n in nums[:8])}{' ...' if len(nums) > 8 else ''}"))
                continue
            values = [v for name in sources for v in cache[name]]
            files = ", ".join(name for name in sources if isinstance(name, str))
            for n in nums:
                if not any(printed_as(v, n) for v in values):
                    problems.append(Problem(rel, n.line, f"{n.text} is not in {files} nor listed in the marker"))
    return problems


def main(argv: list[str]) -> int:
    paths = [Path(a).resolve() for a in argv[1:]] or [ROOT / d for d in MEASURED_DOCS]
    problems = [p for path in paths for p in check_doc(path)]
    for p in problems:
        print(p)
    checked = ", ".join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in paths)
    print(f"docs-check: {len(problems)} problem(s) in {checked}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
