"""The documentation stays in step across languages and quotes only commands that exist.

(a) Every English document has its Japanese counterpart and vice versa: ``README.md`` ↔
``README.ja.md``, ``docs/X.md`` ↔ ``docs/ja/X.md``.
(b) Every command quoted in a document (fenced code blocks and inline code) exists in this
repository: ``make <target>`` is a Makefile target, ``ansible-playbook <file>`` a playbook,
``molecule … -s <scenario>`` a Molecule scenario, ``homeiot-gateway|publisher|archive
[<subcommand>]`` a console script of ``homeiot_py/pyproject.toml`` (with a subcommand its
argument parser knows), ``python -m <module>`` an importable module.

Everything is read from the working tree, so documents added later are checked too.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import re
import shlex
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DOCS = REPO / "docs"
JA = DOCS / "ja"
PACKAGE_SRC = REPO / "homeiot_py" / "src"

# ansible-playbook options that take a value (the value is not the playbook).
PLAYBOOK_VALUE_OPTIONS = frozenset({
    "-i", "--inventory", "-l", "--limit", "-t", "--tags", "--skip-tags", "-e", "--extra-vars",
    "-u", "--user", "--vault-password-file", "--vault-id", "--start-at-task", "-f", "--forks",
    "-c", "--connection", "-M", "--module-path", "--private-key", "--become-user", "-T",
    "--timeout",
})
WORD = re.compile(r"[a-z][a-z0-9-]*")
CONSOLE_SCRIPT = re.compile(r"(?<![\w./-])(homeiot-(?:gateway|publisher|archive))(?![\w.-])")
PYTHON_M = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)")
ASSIGNMENT = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")
MAKE_TARGET = re.compile(r"[A-Za-z0-9_./-]+")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"(`+)(.+?)\1")


@dataclass(frozen=True)
class Quote:
    doc: str
    line: int
    text: str

    def where(self) -> str:
        return f"{self.doc}:{self.line}: {self.text.strip()!r}"


def english_docs() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def japanese_docs() -> list[Path]:
    return sorted(JA.glob("*.md"))


def all_docs() -> list[Path]:
    readmes = [path for path in (REPO / "README.md", REPO / "README.ja.md") if path.exists()]
    return readmes + english_docs() + japanese_docs()


def quotes(path: Path) -> list[Quote]:
    """Every line of a fenced code block and every inline code span of a Markdown file."""
    found: list[Quote] = []
    name = str(path.relative_to(REPO))
    in_fence = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            found.append(Quote(name, number, line))
        else:
            found.extend(Quote(name, number, match.group(2)) for match in INLINE.finditer(line))
    return found


def _split_words(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose: plain whitespace split
        return text.split()


def commands(text: str) -> list[list[str]]:
    """The simple commands of a shell line, each as words without leading sudo or VAR=value."""
    result = []
    for part in re.split(r"&&|\|\||[;|]", text):
        words = _split_words(part)
        while words and (words[0] in {"$", "sudo", "exec"} or ASSIGNMENT.fullmatch(words[0])):
            words = words[1:]
        if words:
            result.append(words)
    return result


@cache
def make_targets() -> frozenset[str]:
    targets: set[str] = set()
    for line in (REPO / "Makefile").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_./%-]+(?:[ \t]+[A-Za-z0-9_./%-]+)*)[ \t]*:(?![:=])", line)
        if match:
            targets.update(match.group(1).split())
    return frozenset(targets)


@cache
def console_scripts() -> dict[str, str]:
    pyproject = tomllib.loads((REPO / "homeiot_py" / "pyproject.toml").read_text(encoding="utf-8"))
    scripts: dict[str, str] = pyproject["project"]["scripts"]
    return scripts


@cache
def subcommands(script: str) -> frozenset[str]:
    """Subcommands the script's argument parsing knows: ``add_parser("x")`` and
    ``argv[:1] == ["x"]`` / ``argv[0] == "x"`` dispatches, read from its module's source."""
    module = console_scripts()[script].split(":")[0]
    source = PACKAGE_SRC.joinpath(*module.split(".")).with_suffix(".py")
    tree = ast.parse(source.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_parser" and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
        if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Subscript)
                and isinstance(node.left.value, ast.Name) and "argv" in node.left.value.id):
            for comparator in node.comparators:
                for constant in ast.walk(comparator):
                    if isinstance(constant, ast.Constant) and isinstance(constant.value, str):
                        names.add(constant.value)
    return frozenset(names)


@cache
def importable(module: str) -> bool:
    """A module of the package must exist in its source tree (not merely in the installed copy);
    any other (``venv``, ``pytest``) must be importable here."""
    parts = module.split(".")
    if (PACKAGE_SRC / parts[0]).is_dir():
        path = PACKAGE_SRC.joinpath(*parts)
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def problems_of(quote: Quote) -> list[str]:  # noqa: PLR0912 - one branch per command family
    problems: list[str] = []
    for module in PYTHON_M.findall(quote.text):
        if not importable(module):
            problems.append(f"{quote.where()}: `python -m {module}`: no such module")
    for match in CONSOLE_SCRIPT.finditer(quote.text):
        script = match.group(1)
        if script not in console_scripts():
            problems.append(f"{quote.where()}: `{script}` is not a console script in pyproject.toml")
            continue
        rest = _split_words(quote.text[match.end():])
        if not quote.text[match.end():][:1].isspace() or not rest or not WORD.fullmatch(rest[0]):
            continue
        known = subcommands(script)
        if rest[0] not in known:
            problems.append(f"{quote.where()}: `{script} {rest[0]}`: no such subcommand"
                            f" (known: {', '.join(sorted(known)) or 'none'})")
    for words in commands(quote.text):
        program, arguments = words[0], words[1:]
        if program == "make":
            problems.extend(f"{quote.where()}: `make {target}`: no such Makefile target"
                            for target in _make_targets(arguments) if target not in make_targets())
        elif program == "ansible-playbook":
            playbook = _playbook(arguments)
            if playbook is not None and not (REPO / playbook).is_file():
                problems.append(f"{quote.where()}: `ansible-playbook {playbook}`: no such playbook")
        elif program == "molecule":
            for option, value in itertools.pairwise(arguments):
                scenario = REPO / "molecule" / value / "molecule.yml"
                if option in {"-s", "--scenario-name"} and not scenario.is_file():
                    problems.append(f"{quote.where()}: molecule scenario {value!r} does not exist")
    return problems


def _make_targets(arguments: list[str]) -> list[str]:
    """The targets of a make command line: its words up to the first that is not one (prose)."""
    targets = []
    for word in arguments:
        if word.startswith("-") or "=" in word:
            continue
        if not MAKE_TARGET.fullmatch(word):
            break
        targets.append(word)
    return targets


def _playbook(arguments: list[str]) -> str | None:
    skip = False
    for word in arguments:
        if skip:
            skip = False
        elif word in PLAYBOOK_VALUE_OPTIONS:
            skip = True
        elif not word.startswith("-"):
            return word if word.endswith((".yml", ".yaml")) else None
    return None


# --- (a) both languages ---------------------------------------------------------------------


def test_readme_exists_in_both_languages() -> None:
    missing = [name for name in ("README.md", "README.ja.md") if not (REPO / name).is_file()]
    assert not missing, f"missing: {', '.join(missing)} (README.md and README.ja.md go together)"


def test_every_english_document_has_a_japanese_counterpart() -> None:
    missing = [str((JA / path.name).relative_to(REPO)) for path in english_docs()
               if not (JA / path.name).is_file()]
    assert not missing, ("English documents without their Japanese counterpart; write "
                         + ", ".join(missing))


def test_every_japanese_document_has_an_english_counterpart() -> None:
    missing = [str((DOCS / path.name).relative_to(REPO)) for path in japanese_docs()
               if not (DOCS / path.name).is_file()]
    assert not missing, ("Japanese documents without their English counterpart; write "
                         + ", ".join(missing))


def test_each_readme_links_the_other() -> None:
    english = (REPO / "README.md").read_text(encoding="utf-8").splitlines()[:5]
    japanese = (REPO / "README.ja.md").read_text(encoding="utf-8").splitlines()[:5]
    assert any("(README.ja.md)" in line for line in english), "README.md: no link to README.ja.md at the top"
    assert any("(README.md)" in line for line in japanese), "README.ja.md: no link to README.md at the top"


# --- (b) quoted commands exist --------------------------------------------------------------


@pytest.mark.parametrize("path", all_docs(), ids=lambda path: str(path.relative_to(REPO)))
def test_every_quoted_command_exists(path: Path) -> None:
    problems = [problem for quote in quotes(path) for problem in problems_of(quote)]
    assert not problems, "\n".join(problems)


# --- the checker itself catches typos and leaves prose alone ---------------------------------


@pytest.mark.parametrize("text", [
    "make tset-python",
    "cd /opt/homeiot && make lint-pyhton",
    "ansible-playbook sites.yml --limit raspi",
    "ansible-playbook --limit homeserver playbooks/raspberry.yml",
    "molecule test -s nosuchscenario",
    "docker compose exec app homeiot-gateway dead-leters --limit 20",
    "docker compose run --rm batch python -m homeiot_batch.run_archiv",
])
def test_a_typo_is_caught(text: str) -> None:
    assert problems_of(Quote("example.md", 1, text)), text


@pytest.mark.parametrize("text", [
    "make test",
    "make wheelhouse PI_ARCH=armv7l",
    "sudo make setup  # pinned tools",
    "ansible-playbook site.yml --limit raspi --tags homeiot_publisher --ask-vault-pass",
    "ansible-playbook -i inventory/home/hosts.yml site.yml",
    "docker compose exec app homeiot-gateway replay-dead-letters --dry-run",
    "docker compose run --rm batch python -m homeiot_batch.run_archive",
    "journalctl -u homeiot-publisher -f",
    "systemd-analyze security homeiot-publisher.service",
    "│ homeiot-publisher (systemd) │──── 8883 ────▶│",
    "the command lines (homeiot-gateway, homeiot-publisher,",
    "make を実行する前に",
    "make setup の後で",
    "ansible-playbook",
])
def test_prose_and_real_commands_pass(text: str) -> None:
    assert not problems_of(Quote("example.md", 1, text)), text
