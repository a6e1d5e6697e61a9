"""The docs as a newcomer reads them: the README's quick shell commands run as written, and every
relative link in README.md and docs/*.md points to a file (and a heading) that exists."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import vidtok

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# The README commands this test runs: each takes seconds on the shipped toy models.
QUICK = ("vidtok run", "vidtok synth")
# Left out on purpose, with the reason (anything matching neither list fails the selection test,
# so a new command in the README has to be placed in one of them).
SLOW = {
    "pip install": "the setup line (.ci/run runs it)",
    "python -m pytest": "the test command (this is it)",
    "vidtok eval": "minutes: 37 configurations x 200 questions",
}
# `vidtok run --model DIR` with a real checkpoint folder that this checkout does not hold.
CHECKPOINT_FLAGS = ("--model", "--assistant")
TIMEOUT = 120


def bash_blocks(path: Path) -> list[list[str]]:
    """The ```bash blocks of a Markdown file, each as its commands (continuation lines joined)."""
    blocks, current = [], None
    for line in path.read_text().splitlines():
        if current is None:
            if line.strip() == "```bash":
                current = []
        elif line.strip() == "```":
            blocks.append(current)
            current = None
        else:
            current.append(line)
    commands = []
    for block in blocks:
        joined, pending = [], ""
        for line in block:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            text = (pending + line).strip()
            pending = ""
            if text:
                joined.append(text)
        commands.append(joined)
    return commands


def _missing_checkpoint(command: str) -> bool:
    words = shlex.split(command, comments=True)
    for flag, value in zip(words, words[1:]):
        if flag in CHECKPOINT_FLAGS and not value.startswith("toy") and not (ROOT / value).exists():
            return True
    return False


def select(command: str) -> str | None:
    """'run' for a quick command, else the reason it is left out; None when it is in neither list."""
    if command.startswith(QUICK):
        return "needs a checkpoint folder this checkout does not hold" if _missing_checkpoint(command) else "run"
    for prefix, reason in SLOW.items():
        if command.startswith(prefix):
            return reason
    return None


def _quick_blocks():
    """The README's bash blocks that hold quick commands, each with those commands only."""
    blocks = [[c for c in block if select(c) == "run"] for block in bash_blocks(README)]
    return [block for block in blocks if block]


def test_every_readme_command_is_selected_or_skipped_with_a_reason():
    commands = [c for block in bash_blocks(README) for c in block]
    assert commands, "no ```bash block found in README.md"
    unplaced = [c for c in commands if select(c) is None]
    assert not unplaced, f"README commands neither in QUICK nor in SLOW: {unplaced}"
    quick = [c for block in _quick_blocks() for c in block]
    assert len(quick) >= 4, f"too few quick README commands selected: {quick}"
    assert any(c.split("#")[0].strip() == "vidtok run" for c in quick), "the main job is not among the tested commands"


def test_readme_setup_and_test_commands_are_the_ci_ones():
    # .ci/run runs the README's setup and test commands: they must stay exactly as written there
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    setup = [c for block in bash_blocks(README) for c in block if c.startswith("pip install")]
    tests = [c for block in bash_blocks(README) for c in block if c.startswith("python -m pytest")]
    assert setup and tests
    assert setup[0].split("#")[0].strip() in ci
    assert tests[0].split("#")[0].strip() in ci


@pytest.mark.parametrize("index", range(len(_quick_blocks())))
def test_readme_quick_commands_run_as_written(index, tmp_path):
    block = _quick_blocks()[index]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for command in block:  # in order, in one folder: a block may build on its earlier commands
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, f"{command!r} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        if command.split("#")[0].strip() == "vidtok run":
            # the output the README shows for the main job is what it prints
            shown = re.search(r"answers the sample question.*?```\n(.*?)```", README.read_text(), re.S)
            assert shown, "the README no longer shows the main job's output"
            for line in shown.group(1).splitlines():
                assert line in done.stdout.splitlines(), f"README shows {line!r}; vidtok run printed:\n{done.stdout}"


def _slug(heading: str) -> str:
    # GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def test_relative_links_point_to_existing_files():
    link = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
    checked, broken = 0, []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in link.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            checked += 1
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert checked >= 20, f"only {checked} relative links found"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_figure_in_the_docs_has_its_command_next_to_it():
    # a figure's reproduction command is within a few lines above it
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", line):
                near = "\n".join(lines[max(0, i - 6): i + 1])
                assert re.search(r"vidtok (eval|calibrate|bench|viz)|guide_curve\.py|testbed\.sh|bases(\.sh|_figure\.py)|vllm_bench\.py|eval_batch\.py", near), \
                    f"{page.relative_to(ROOT)}: no command next to {image}"


def test_the_api_index_is_current_and_every_public_name_says_what_it_is():
    import importlib.util
    import inspect

    spec = importlib.util.spec_from_file_location("api_doc", ROOT / "scripts" / "api_doc.py")
    api_doc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(api_doc)
    assert (ROOT / "docs" / "api.md").read_text() == api_doc.page(), "docs/api.md is stale: python scripts/api_doc.py > docs/api.md"
    for name in vidtok.__all__:
        obj = getattr(vidtok, name)
        own = obj.__doc__ if not inspect.isclass(obj) else vars(obj).get("__doc__")
        # its own docstring: not a dataclass's generated signature, nor a base class's (ValueError's)
        assert own and not own.startswith(f"{name}("), f"{name} has no docstring of its own"
