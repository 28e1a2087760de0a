"""The README runs as pasted: every bash and python block, top to bottom, in a fresh folder (with
TOOLKIT_BUDGET=small, so training and sampling take seconds), and every CLI option and plugin kind is
documented. A block that cannot run here says why in a `<!-- readme-test: skip: REASON -->` line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SKIP = re.compile(r"<!-- readme-test: skip: (.+?) -->\s*$")


def blocks() -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, skip reason) of every fenced block, in order."""
    out, lines, i = [], README.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        prev = lines[start - 1] if start else ""
        reason = SKIP.match(prev)
        out.append((start + 1, lang, "\n".join(lines[i + 1:j]), reason.group(1) if reason else None))
        i = j + 1
    return out


def test_every_skipped_block_says_why_and_most_blocks_run():
    runnable = [b for b in blocks() if b[1] in ("bash", "python")]
    skipped = [b for b in runnable if b[3]]
    assert all(len(reason) > 10 for *_, reason in skipped)
    assert len(runnable) - len(skipped) > len(skipped), "most of the README's blocks must run"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A fresh folder with the repository's example programs and scripts where the README expects them."""
    folder = tmp_path_factory.mktemp("readme")
    for name in ("examples", "bench", "scripts"):
        (folder / name).symlink_to(ROOT / name)
    return folder


@pytest.mark.slow
def test_readme_blocks_run_as_pasted(workdir):
    """Each block runs in order in one folder (later blocks use what earlier ones made); any error fails."""
    env = {**os.environ, "TOOLKIT_BUDGET": "small", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "TOOLKIT_CACHE_DIR": str(workdir / ".cache")}
    ran = 0
    for line, lang, code, reason in blocks():
        if lang not in ("bash", "python") or reason:
            continue
        if lang == "bash":
            cmd = ["bash", "-euo", "pipefail", "-c", code]
        else:
            cmd = [sys.executable, "-c", code]
        r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"README block at line {line} failed:\n{code}\n--- stdout\n{r.stdout[-3000:]}" \
                                  f"\n--- stderr\n{r.stderr[-3000:]}"
        ran += 1
    assert ran >= 8


def _sections() -> dict[str, str]:
    """The README's text of each `### \\`toolkit COMMAND ...\\`` section, up to the next heading."""
    out = {}
    heads = list(re.finditer(r"^#{2,3} .*$", README, re.M))
    for k, m in enumerate(heads):
        name = re.match(r"^### `toolkit ([a-z][a-z -]*?)(?: \[.*\])?`", m.group(0))
        if name:
            end = heads[k + 1].start() if k + 1 < len(heads) else len(README)
            out[name.group(1)] = README[m.start():end]
    return out


def _commands():
    from toolkit.cli import cli

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from walk(cmd, [*prefix, name])
            else:
                yield " ".join([*prefix, name]), cmd

    return list(walk(cli, []))


def test_every_command_and_option_is_documented():
    """Each command has its section, and each option appears there, or in the section of the command
    whose options it says it shares ("the options of `toolkit train`")."""
    sections = _sections()
    missing = []
    for name, cmd in _commands():
        text = sections.get(name)
        if text is None:
            missing.append(f"no README section for `toolkit {name}`")
            continue
        shared = [sections.get(m, "") for m in re.findall(r"options of `toolkit ([a-z -]+?)`", text)]
        for param in cmd.params:
            if isinstance(param, click.Option) and not any(o in t for o in param.opts for t in (text, *shared)):
                missing.append(f"`toolkit {name}` {param.opts[0]}")
    assert not missing, "undocumented: " + "; ".join(missing)


def test_every_plugin_kind_is_documented():
    import toolkit.registry

    text = _sections()["plugins"]
    kinds = toolkit.registry.get_registry().entries.keys() | set(toolkit.registry.KINDS)
    assert [k for k in sorted(kinds) if f"`{k}`" not in text] == []


def test_documented_options_exist():
    """Every `--option` a command's section names is an option of that command (or of one whose
    options the section says it shares, or of `toolkit compose` for the pipeline options it cites)."""
    sections = _sections()
    options = {name: {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts}
               for name, cmd in _commands()}
    stale = []
    for name, text in sections.items():
        if name not in options:
            stale.append(f"README section for a command that does not exist: `toolkit {name}`")
            continue
        known = set(options[name])
        for other in re.findall(r"options of `toolkit ([a-z -]+?)`", text) + re.findall(r"as in (compose|train)", text):
            known |= options.get(other, set())
        prose = re.sub(r"```.*?```", "", text, flags=re.S)  # command blocks may run other commands
        for code in re.findall(r"`([^`]+)`", prose):
            for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", code):
                cites = code.split()[0] in {n.split()[0] for n in options} | {"toolkit", "torchrun", "python"}
                if opt not in known and not cites:
                    stale.append(f"`toolkit {name}` section names {opt}")
    assert not stale, "; ".join(sorted(set(stale)))


def test_the_docs_stay_inside_the_repository():
    """Every relative link of the README and every module docs/design.md names exists in this repository."""
    for target in re.findall(r"\]\(([^)#:]+)\)", README):
        path = (ROOT / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), target
    design = (ROOT / "docs" / "design.md").read_text()
    assert "docs/design.md" in README
    for module in set(re.findall(r"\b([a-z_]+\.py)\b", design)):
        assert list(ROOT.glob(f"*/**/{module}")), module
