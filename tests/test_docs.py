"""The docs: a short README, reference pages that match the code, and a site that builds
with no broken link."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from study import config

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "docs" / "reference" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_pages_are_what_the_code_says():
    gen = _generator()
    for name, make in gen.PAGES.items():
        committed = (ROOT / "docs" / "reference" / name).read_text()
        assert committed == make(), f"docs/reference/{name} is stale: run `uv run python docs/reference/generate.py`"


def test_a_stale_reference_page_is_caught(monkeypatch):
    from study.config import EvalSpec

    gen = _generator()
    fields = dict(EvalSpec.model_fields)
    fields["a_new_key"] = fields["batch_size"]
    monkeypatch.setattr(EvalSpec, "model_fields", fields)
    assert "`a_new_key`" in gen.job_page() and "`a_new_key`" not in (ROOT / "docs/reference/job.md").read_text()


def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "guide" / "plan" / "index.html").is_file()


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for link in re.findall(r"\]\(((?:docs|jobs)/[^)#]+)", text):  # every local link and image exists
        assert (ROOT / link).exists(), link
    job = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S)[1])
    config.parse(job, check_paths=False)  # its example job is a valid job
