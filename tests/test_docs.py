"""The documentation: the README's snippet runs as written on 4 CPU ranks, and every link in the
repository's Markdown points to a file inside the repository."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, wherever its script is
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def tracked_files(*patterns) -> list:
    """Files git tracks (or, outside a git checkout, every file below the root), relative to the root."""
    try:
        out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
        return [line for line in out.stdout.splitlines() if line and os.path.isfile(os.path.join(REPO, line))]
    except (OSError, subprocess.CalledProcessError):
        import fnmatch

        found = []
        for folder, dirs, files in os.walk(REPO):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "build")]
            for name in files:
                rel = os.path.relpath(os.path.join(folder, name), REPO)
                if not patterns or any(fnmatch.fnmatch(rel, p) for p in patterns):
                    found.append(rel)
        return found


def readme_snippet() -> str:
    text = open(os.path.join(REPO, "README.md")).read()
    section = text[text.index("## A fusion definition"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("\n```", section.index("```python"))]


def test_the_readme_snippet_runs_as_written_on_4_cpu_ranks(tmp_path):
    script = tmp_path / "moe_example.py"
    script.write_text(readme_snippet())
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = subprocess.run([*TORCHRUN, "--nproc-per-node", "4", str(script)], capture_output=True, text=True,
                         timeout=240, env=env, cwd=str(tmp_path))
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "terminate called" not in text, text
    assert "= MoeDispatch[num_experts=16, backend=auto]" in out.stdout, text
    assert "trace of rank 0: 3 events" in out.stdout and out.stdout.count("HostIrContainer") == 1, text


def test_the_readme_shows_what_its_snippet_prints():
    """The IR printed in the README is the snippet's own (built here, on one rank, without running it)."""
    text = open(os.path.join(REPO, "README.md")).read()
    snippet = readme_snippet()
    build = snippet[:snippet.index("# This rank's tokens")]
    scope: dict = {}
    exec(compile(build, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    assert str(scope["fd"]) in text


@pytest.mark.parametrize("path", tracked_files("*.md"))
def test_markdown_links_stay_inside_the_repository(path):
    folder = os.path.dirname(os.path.join(REPO, path))
    for target in LINK.findall(open(os.path.join(REPO, path)).read()):
        if target.startswith("#") or target.startswith("%"):  # an anchor, or IR text such as Size[dim=0](%x)
            continue
        assert "://" not in target and not target.startswith(("/", "mailto:")), f"{path}: links outside: {target}"
        resolved = os.path.realpath(os.path.join(folder, target.split("#")[0]))
        assert resolved.startswith(os.path.realpath(REPO) + os.sep), f"{path}: {target} is outside the repository"
        assert os.path.exists(resolved), f"{path}: {target} does not exist"


SHARED_CONTRACT = "SP" + "EC"  # spelled in two parts so that this file does not cite it itself


def test_no_tracked_file_cites_the_shared_contract_or_a_path_outside():
    """The contract lives in docs/contract.md: docstrings, errors, help texts and docs cite its sections."""
    cites = re.compile(r"\b" + SHARED_CONTRACT + r"(\.md|\b)")
    outside = re.compile(r"\.\./" + "shared|/work" + "/shared")
    found = []
    for path in tracked_files():
        if path.endswith((".png", ".json", ".whl")):
            continue
        try:
            text = open(os.path.join(REPO, path), encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if cites.search(line) or outside.search(line):
                found.append(f"{path}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_contract_has_every_section():
    text = open(os.path.join(REPO, "docs", "contract.md")).read()
    titles = ["Layout", "Notation", "MoeDispatch", "MoeCombine", "Capacity mode", "Python frontend",
              "Evaluator and traces", "Backends", "Errors", "Benchmarks", "Autograd", "FP8 dispatch"]
    for n, title in enumerate(titles, 1):
        assert f"\n## {n}. {title}" in text, title


def test_the_license_and_the_changelog_are_there():
    license_text = open(os.path.join(REPO, "LICENSE")).read()
    assert license_text.startswith("MIT License") and "the fuser_moe authors" in license_text
    changelog = open(os.path.join(REPO, "CHANGELOG.md")).read()
    assert changelog.startswith("# Changelog") and "## 0.1.0" in changelog
