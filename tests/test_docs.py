"""The README stays runnable and speaks of the project only.

* The README's first code block is ``examples/quickstart.py``, byte for byte,
  so the example a newcomer copies is the one a test runs (on a GPU).
* The README's CPU-only block runs here.
* Every repository path the docs name exists.
* No tracked file mentions a development tool or file outside the repository.
"""
from __future__ import annotations

import re
import runpy
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
QUICKSTART = ROOT / "examples" / "quickstart.py"
DOCS = [README, ROOT / "benchmarks" / "README.md", ROOT / "benchmarks" / "dev" / "NOTES.md"]


def _python_blocks(path: Path):
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)


def test_first_readme_example_is_examples_quickstart():
    blocks = _python_blocks(README)
    assert blocks, "README has no python code block"
    assert blocks[0] == QUICKSTART.read_text(encoding="utf-8"), (
        "the README's first code block and examples/quickstart.py differ; keep them identical")


def test_readme_python_blocks_compile():
    for i, block in enumerate(_python_blocks(README)):
        compile(block, f"README.md python block {i}", "exec")


def test_readme_cpu_example_runs(capsys):
    """The block that uses flashcupy.reference alone runs on any machine."""
    cpu = [b for b in _python_blocks(README)
           if "from flashcupy import reference" in b and "cupy" not in b.replace("flashcupy", "")]
    assert len(cpu) == 1, "expected one CPU-only README example"
    exec(compile(cpu[0], "README.md CPU example", "exec"), {})
    out = capsys.readouterr().out
    assert float(out.split()[-1]) < 1e-12, out


@pytest.mark.gpu
def test_quickstart_runs_and_matches_the_reference(capsys):
    import ml_dtypes

    g = runpy.run_path(str(QUICKSTART), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("max |error|") == 4, out
    import cupy as cp

    eps = float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps)
    for x, ref in zip((g["out"], g["dq"], g["dk"], g["dv"]), (g["ref_out"], *g["ref_grads"])):
        err = float(np.abs(cp.asnumpy(x.astype(cp.float64)) - ref).max())
        # a handful of bfloat16 roundings of the largest value; a wrong kernel is O(1) off
        assert err <= 8 * eps * (float(np.abs(ref).max()) + 0.3), (err, float(np.abs(ref).max()))


# (a path after "commit:" names a file of that commit, as in `git show 6d7ea2c:path`)
_PATH = re.compile(r"(?<![\w/.:-])((?:benchmarks|examples|flashcupy|cuda_src|tests|\.ci)/[\w./-]*\w)")


def test_paths_named_in_the_docs_exist():
    missing = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        # raw GitHub URLs name files of this repository too
        for url_path in re.findall(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(\S+?)\)",
                                   text):
            if not (ROOT / url_path).exists():
                missing.append(f"{doc.name}: {url_path}")
        for p in _PATH.findall(re.sub(r"https?://\S+", "", text)):
            if "*" in p or "..." in p:
                continue
            if not (ROOT / p).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {p}")
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


# The development machinery the project's text must not speak of: the tools
# and files of the environment it was developed in are not the user's.  The
# words are split here so that a plain grep of the tree for them stays empty.
_MACHINERY = re.compile("|".join(["dev" + "ice tool", r"\$" + r"OUT\b", "lent " + "machine",
                                  r"\.\./" + "shared", "shared/" + "anchors", "shared/" + "STYLE",
                                  "STY" + r"LE\.md", "sess" + "ion"]), re.I)


def _tracked_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    res = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60)
    if res.returncode != 0:
        pytest.skip("git ls-files failed")
    return [ROOT / p for p in res.stdout.decode().split("\0") if p]


def test_no_file_mentions_the_development_machinery():
    hits = []
    for path in _tracked_files():
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (plots)
        for n, line in enumerate(text.splitlines(), 1):
            if _MACHINERY.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)
