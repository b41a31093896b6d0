"""The shell blocks of README.md and docs/*.md run as written, after the README's set-up.

Each document's ```bash blocks run in order, with bash (`set -e`), in one fresh folder that links
the repository's examples/ and docs/ (relative paths work; outputs stay out of the checkout),
with this environment's bin/ first on PATH (the README tells users to activate .venv). A
```text block right after a bash block (with at most one line of prose between them) is what
it prints: each of its lines must appear in the output. Blocks after a
`<!-- docs-test: skip, REASON -->` line are skipped: they need downloaded weights or install
packages.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(
    r"(?P<skip><!-- docs-test: skip, [^>]+-->\s*\n)?[ \t]*```bash\n(?P<code>.*?)^[ \t]*```\n"
    r"(?:(?:\n[^\n`]*\n)?\n```text\n(?P<prints>.*?)^```)?", re.S | re.M)


def blocks(doc: Path) -> list[tuple[str, str, bool]]:
    """(code, expected output, skipped) of each bash block."""
    return [(m["code"], m["prints"] or "", bool(m["skip"]))
            for m in FENCE.finditer(doc.read_text())]


def test_every_bash_block_is_found():
    text = "".join(doc.read_text() for doc in DOCS)
    assert sum(len(blocks(doc)) for doc in DOCS) == len(re.findall(r"```bash\n", text))


RUNNABLE = [doc for doc in DOCS if any(not skipped for _, _, skipped in blocks(doc))]


@pytest.mark.parametrize("doc", RUNNABLE, ids=[d.name for d in RUNNABLE])
def test_doc_shell_blocks_run(doc, tmp_path):
    for name in ("examples", "docs"):
        (tmp_path / name).symlink_to(ROOT / name)
    runnable = [(code, prints) for code, prints, skipped in blocks(doc) if not skipped]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = "set -euo pipefail\n" + "\n".join(code for code, _ in runnable)
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for _, prints in runnable:
        for line in prints.splitlines():
            assert line in result.stdout, (line, result.stdout)
