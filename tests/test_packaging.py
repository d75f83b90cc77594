"""The packaging metadata ships what the code needs (no build, no network).

A wheel must carry every Python package and every kernel source (``cuda_src``
is mapped into the package as ``flashcupy/cuda_src``); the sdist must carry
what the tests import, so that an unpacked sdist passes ``pytest``.  These
tests read setup.cfg and MANIFEST.in and expand their globs the way
setuptools does (``glob(..., recursive=True)``), so a new kernel folder or a
new subpackage that the metadata would leave out fails here.
"""
from __future__ import annotations

import configparser
import glob
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    return cfg


def _list(value: str):
    return [x.strip() for x in value.replace(",", "\n").splitlines() if x.strip()]


def _package_dirs(cfg):
    """{package: source folder} from setup.cfg's packages and package_dir."""
    mapping = {}
    for line in cfg["options"]["package_dir"].splitlines():
        if "=" in line:
            name, path = (x.strip() for x in line.split("=", 1))
            mapping[name] = path
    dirs = {}
    for pkg in _list(cfg["options"]["packages"]):
        parts = pkg.split(".")
        for i in range(len(parts), 0, -1):  # the longest mapped prefix wins
            prefix = ".".join(parts[:i])
            if prefix in mapping:
                dirs[pkg] = ROOT / mapping[prefix] / Path(*parts[i:])
                break
        else:
            dirs[pkg] = ROOT / Path(*parts)
    return dirs


def test_every_python_package_is_listed():
    dirs = _package_dirs(_cfg())
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "flashcupy").rglob("__init__.py")}
    assert found <= set(dirs), f"packages missing from setup.cfg: {sorted(found - set(dirs))}"
    for pkg, d in dirs.items():
        assert d.is_dir(), f"{pkg} maps to {d}, which does not exist"


def test_every_kernel_source_goes_into_the_wheel():
    cfg = _cfg()
    dirs = _package_dirs(cfg)
    data = {k: _list(v) for k, v in cfg["options.package_data"].items()}
    shipped = set()
    for pkg, patterns in data.items():
        assert pkg in dirs, f"package_data names {pkg}, which is not in packages"
        for pat in patterns:
            shipped |= {(dirs[pkg] / f).resolve()
                        for f in glob.glob(pat, root_dir=dirs[pkg], recursive=True)}
    sources = {p.resolve() for p in (ROOT / "cuda_src").rglob("*.cuh")}
    assert sources, "no kernel sources found"
    missing = sorted(str(p.relative_to(ROOT)) for p in sources - shipped)
    assert not missing, f"kernel sources the wheel would leave out: {missing}"
    # every folder of kernel sources, including ones added later (cuda_src/sm90, ...)
    folders = {p.parent for p in sources}
    assert {ROOT / "cuda_src" / "sm80", ROOT / "cuda_src" / "sm90"} <= folders


def test_sdist_manifest_carries_tests_license_examples_and_kernels():
    lines = [ln.split("#")[0].split() for ln in
             (ROOT / "MANIFEST.in").read_text(encoding="utf-8").splitlines()]
    grafts = {ln[1] for ln in lines if len(ln) == 2 and ln[0] == "graft"}
    includes = {x for ln in lines if ln and ln[0] == "include" for x in ln[1:]}
    assert {"tests", "cuda_src", "examples"} <= grafts
    assert "LICENSE" in includes
    # the helpers the test modules import live beside them, so `graft tests` takes them
    for helper in ("conftest.py", "_grid.py", "_assert.py", "_naive.py"):
        assert (ROOT / "tests" / helper).is_file(), helper


def test_license_and_metadata():
    cfg = _cfg()
    meta = cfg["metadata"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2026, the flashcupy developers" in text
    assert meta["license"] == "BSD-3-Clause"
    classifiers = [c.strip() for c in meta["classifiers"].splitlines() if c.strip()]
    for c in ("Operating System :: POSIX :: Linux",
              "Programming Language :: Python :: 3.10", "Programming Language :: Python :: 3.13",
              "Environment :: GPU :: NVIDIA CUDA"):
        assert c in classifiers, c
    url = meta["url"]
    assert url.startswith("https://") and url in meta["project_urls"]
    assert cfg["options"]["python_requires"].strip() == ">=3.10"
    # the long description is the README: its images must load off the repository
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme):
        assert target.startswith("https://"), f"relative image path in the README: {target}"
