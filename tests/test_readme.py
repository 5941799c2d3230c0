"""The README's test command is the one .ci/run runs, and the README names the main-job command."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci_command() -> str:
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    return [ln for ln in lines if "pytest" in ln and not ln.startswith("#")][-1]


def test_ci_runs_readme_test_command():
    assert _ci_command() in (ROOT / "README.md").read_text()


def test_readme_has_main_job_command():
    assert "pip install torch==2.13.0 && pip install . && pyllm demo" in (ROOT / "README.md").read_text()
