"""The README and docs/ as a reader uses them: every relative link leads to a file that exists, every
`python -m rrhf_fast.<command>` line in a shell block parses with that command's own parser (the flags are
spelled as the command spells them), and every flag of a `python examples/...` or `python benchmarks/...` line is
one its script defines."""

import re
import shlex
from pathlib import Path

import pytest

from rrhf_fast import config, evaluate, sample

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSERS = {"train": config.build_parser, "sample": sample.build_parser, "evaluate": evaluate.build_parser}
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def shell_commands(text: str) -> list[str]:
    """The commands of the page's ```bash blocks, continuation lines joined, comments and prompts dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                if part.strip():
                    commands.append(part.strip())
    return commands


def test_the_pages_are_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "training.md", "data-formats.md", "exactness.md", "performance.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file(page):
    missing = [
        target
        for target in LINK.findall(page.read_text())
        if not target.startswith(("http://", "https://")) and not (page.parent / target).exists()
    ]
    assert not missing, f"{page.name} links to files that are not there: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_is_spelled_as_its_parser_or_script_spells_it(page):
    checked = 0
    for command in shell_commands(page.read_text()):
        words = shlex.split(command)
        if "-m" in words and words[words.index("-m") + 1].startswith("rrhf_fast."):
            name = words[words.index("-m") + 1].split(".")[1]
            args = [w for w in words[words.index("-m") + 2 :] if w != "..."]
            try:
                PARSERS[name]().parse_args(args)
            except SystemExit as e:
                if e.code != 0:  # --help exits 0
                    pytest.fail(f"{page.name}: `{command}` does not parse")
            checked += 1
        elif len(words) > 1 and words[0] == "python" and words[1].startswith(("examples/", "benchmarks/")):
            script = (ROOT / words[1]).read_text()
            unknown = [w.split("=")[0] for w in words[2:] if w.startswith("--") and f'"{w.split("=")[0]}"' not in script]
            assert not unknown, f"{page.name}: {words[1]} has no flags {unknown}"
            checked += 1
    if page.name == "README.md":
        assert checked >= 5
