"""The README runs as written: every shell and Python block, in order, in a fresh folder.

Blocks are run one after another in one working directory (later blocks use what earlier
ones wrote) and one Python namespace (later Python blocks use earlier variables). A block
preceded by `<!-- readme-test: skip (reason) -->` is not run: that is for commands that
download hub models or need hardware this machine lacks, and for `make` itself.

Budgets shrink so that `make test` stays fast: `--max-tokens`, `--max-steps`, `--epochs` and
`shapes:N` sizes are cut (`small_budgets`) unless VLMSCOPE_README_FULL=1, which runs every
block verbatim (about ten minutes on a 2-core CPU). The commands are otherwise the README's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b")


@dataclass
class Block:
    lang: str
    code: str
    line: int
    skip: bool


def readme_blocks(text: str) -> list[Block]:
    """Fenced ```bash / ```python blocks with their first line number and skip marks."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\w+)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        blocks.append(
            Block(fence.group(1), "\n".join(body) + "\n", start + 1, bool(SKIP.search(prev)))
        )
        i += 1
    return blocks


def _scaled(match: re.Match[str], divide: int, floor: int) -> str:
    n = int(match.group(2).replace("_", ""))
    return f"{match.group(1)}{n if n == 0 else max(floor, n // divide)}"


def small_budgets(code: str) -> str:
    """The block with its training and evaluation budgets cut (tokens and steps by 10, the
    shapes world to a fifth, one epoch), everything else as written."""
    code = re.sub(r"(--max-tokens[ =]|max_tokens=)([\d_]+)", lambda m: _scaled(m, 10, 1000), code)
    code = re.sub(r"(--max-steps[ =])(\d+)", lambda m: _scaled(m, 10, 2), code)
    code = re.sub(r"(--epochs[ =])(\d+)", lambda m: _scaled(m, 1000, 1), code)
    return re.sub(r"(shapes:)(\d+)", lambda m: _scaled(m, 5, 32), code)


_DRIVER = """
import json, resource, subprocess, sys, time
blocks = json.loads(sys.stdin.read())
ns = {"__name__": "__readme__"}

def cpu():
    use = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in use)

for b in blocks:
    print(f"--- README.md line {b['line']} ({b['lang']})", flush=True)
    t0, c0 = time.perf_counter(), cpu()
    if b["lang"] == "python":
        exec(compile(b["code"], f"README.md:{b['line']}", "exec"), ns)
    else:
        subprocess.run(["bash", "-euo", "pipefail", "-c", b["code"]], check=True)
    print(f"--- took {time.perf_counter() - t0:.1f} s, {cpu() - c0:.1f} s CPU", flush=True)
print("--- all blocks ran", flush=True)
"""


def test_the_parser_finds_blocks_and_skip_marks() -> None:
    text = "intro\n```bash\necho a\n```\n<!-- readme-test: skip (hub) -->\n\n```python\nx=1\n```\n"
    got = readme_blocks(text)
    assert [(b.lang, b.code, b.line, b.skip) for b in got] == [
        ("bash", "echo a\n", 2, False),
        ("python", "x=1\n", 7, True),
    ]


def test_the_readme_points_only_inside_the_repository() -> None:
    text = README.read_text()
    assert "../shared" not in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, not in the repository"


def test_small_budgets_cut_only_budgets() -> None:
    code = (
        "vlmscope train toy shapes:200 --max-tokens 50000 --max-steps 30 --epochs 5 --sae.k 8\n"
        "vlmscope capture toy shapes --max-tokens 0 --batch-size 16\n"
        "evaluate(vlm, d, records, max_tokens=5_000)\n"
    )
    assert small_budgets(code) == (
        "vlmscope train toy shapes:40 --max-tokens 5000 --max-steps 3 --epochs 1 --sae.k 8\n"
        "vlmscope capture toy shapes --max-tokens 0 --batch-size 16\n"
        "evaluate(vlm, d, records, max_tokens=1000)\n"
    )


def test_every_readme_block_runs(tmp_path: Path) -> None:
    blocks = [b for b in readme_blocks(README.read_text()) if b.lang in ("bash", "python")]
    assert any(not b.skip for b in blocks)
    langs = {b.lang for b in blocks}
    assert langs <= {"bash", "python"}
    full = os.environ.get("VLMSCOPE_README_FULL") == "1"
    run = [
        {"lang": b.lang, "code": b.code if full else small_budgets(b.code), "line": b.line}
        for b in blocks
        if not b.skip
    ]
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["VLMSCOPE_PROGRESS_SECONDS"] = "60"
    # torchrun's agent makes a torchelastic_* log folder per run in the temp dir: keep those
    # inside pytest's tmp_path instead of leaving them in /tmp
    (tmp_path / "tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmp")
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER],
        input=json.dumps(run),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if proc.returncode != 0:
        ran = [line for line in proc.stdout.splitlines() if line.startswith("--- README.md")]
        where = ran[-1] if ran else "before the first block"
        pytest.fail(
            f"README block failed at {where}:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
        )
    assert "--- all blocks ran" in proc.stdout
