"""The README and the documentation pages stay true of the code: every flag they name is a flag of the entry point it
appears with, every default they state is the code's default, and every command they show parses. The flags are read
from the parser each entry point builds, without starting TensorFlow (docs/gen_reference.py's entry_point_parser, which
also generates the flag reference)."""

import argparse
import dataclasses
import glob
import importlib.util
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script(path: str):
    """A script of the repository (docs/, benchmarks/) loaded as a module from its file."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load_script("docs/gen_reference.py")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?![\w-])")
SPAN = re.compile(r"`([^`]+)`")
# Commands of other programs, whose flags are theirs (pip, pytest, docker, TensorBoard, ...).
OTHER_COMMANDS = re.compile(r"^\s*((python -m )?(pip|pytest)|docker|tensorboard|curl|saved_model_cli|tfds|mkdocs|"
                            r"jupyter|flock)\b|^\s*(python )?(benchmarks|docs)/|^\s*[A-Z_]+=\S+ (?!python -m pipeline)")
# The entry points (`python -m pipeline.X`) that the repository has, as docs/gen_reference.py finds them.
NAMES = "|".join(name.split(".")[1] for name in GEN.ENTRY_POINTS)
ENTRY = re.compile(rf"\bpipeline\.({NAMES})\b")
# A command of an entry point, after any environment variables, up to a shell comment.
COMMAND = re.compile(rf"(?:^|\s)python -m pipeline\.({NAMES})\b([^#]*)")
# "`--flag ...` (default X" in prose.
INLINE_DEFAULT = re.compile(r"`(--[a-z][a-z0-9-]*)[^`]*` \(default:? `?([^`),:;]+)`?")


@pytest.fixture(scope="module")
def entry_flags():
    """{"pipeline.train": {"--batch": "32", ...}, ...}: every entry point's option strings and default texts."""
    gen = GEN
    flags = {}
    for module_name in gen.ENTRY_POINTS:
        parser = gen.entry_point_parser(module_name)
        flags[module_name] = {} if parser is None else {
            "--help": "", **{name: row["default"] for row in gen.flag_rows(parser) for name in row["flags"]}}
    return flags


def _blocks(text: str):
    """(section heading, block text, is_code) for each paragraph, table and fenced code block of a markdown text."""
    section, block, code = "", [], False
    for line in text.splitlines() + [""]:
        if line.startswith("```"):
            if code:
                yield section, "\n".join(block), True
                block, code = [], False
            else:
                if block:
                    yield section, "\n".join(block), False
                block, code = [], True
            continue
        if code:
            block.append(line)
        elif line.startswith("#"):
            if block:
                yield section, "\n".join(block), False
            section, block = line, []
        elif not line.strip():
            if block:
                yield section, "\n".join(block), False
            block = []
        else:
            block.append(line)


def _spans(block: str):
    """The inline code spans of a paragraph, a line break inside one read as a space."""
    return [" ".join(span.split()) for span in SPAN.findall(block)]


def _commands(code: str):
    """The command lines of a code block, with backslash continuations joined."""
    return [line.strip() for line in code.replace("\\\n", " ").splitlines() if line.strip()]


def readme_flags(text: str, page: str = "pipeline.train"):
    """(flag, entry points it may belong to, where) for every flag of a pipeline entry point that the text names.

    A flag in a command `python -m pipeline.X ...` belongs to X. A flag in prose belongs to one of the entry points
    named in its paragraph or table, else in its section heading, else to pipeline.train. Flags of other programs'
    commands (pip, pytest, docker, tensorboard, ...) are not the pipeline's and are left out.
    """
    found = []
    for section, block, code in _blocks(text):
        near = _near_entry_points(section, block, page)
        for item in _commands(block) if code else _spans(block):
            command = COMMAND.search(item)
            if command:  # after any environment variables: python -m pipeline.X FLAGS
                found += [(flag, {f"pipeline.{command.group(1)}"}, item) for flag in FLAG.findall(command.group(2))]
            elif not code and not OTHER_COMMANDS.match(item):  # a flag in prose
                found += [(flag, near, item) for flag in FLAG.findall(item)]
    return found


def readme_commands(text: str):
    """(entry point, arguments) of every `python -m pipeline.X ...` command in the text, in code or inline."""
    commands = []
    for _, block, code in _blocks(text):
        for command in _commands(block) if code else _spans(block):
            found = COMMAND.search(command)
            if found:
                commands.append((f"pipeline.{found.group(1)}", found.group(2).split()))
    return commands


def _near_entry_points(section: str, block: str, page: str = "pipeline.train") -> set[str]:
    """The entry points a prose flag may belong to: those named in its paragraph or table and in its section
    heading, and the page's own (pipeline.train for the README)."""
    return {f"pipeline.{name}" for name in ENTRY.findall(block) + ENTRY.findall(section)} | {page}


def readme_values(text: str, page: str = "pipeline.train"):
    """(flag, value, entry points) of every inline "`--flag VALUE`" whose value is literal (not N, PATH, a|b, <x>)."""
    values = []
    for section, block, code in _blocks(text):
        if code:
            continue
        for span in _spans(block):
            words = span.split()
            if (len(words) == 2 and FLAG.fullmatch(words[0]) and not words[1].startswith("-")
                    and not re.search(r"[|<>.]|^[A-Z_,]+$", words[1])):
                values.append((words[0], words[1], _near_entry_points(section, block, page)))
    return values


def readme_defaults(text: str, page: str = "pipeline.train"):
    """(flag, stated default, entry points) from the tables with a default column and from "`--flag ...` (default X".
    """
    stated = []
    for section, block, code in _blocks(text):
        if code:
            continue
        owners = _near_entry_points(section, block, page)
        rows = [line for line in block.splitlines() if line.startswith("|")]
        header = [cell.strip() for cell in rows[0].strip("|").split("|")] if rows else []
        if "default" in header:
            for row in rows[2:]:
                cells = [cell.strip() for cell in row.strip("|").split("|")]
                flag = FLAG.search(cells[0])
                if flag:
                    stated.append((flag.group(1), cells[header.index("default")].strip("`"), owners))
        stated += [(flag, value.strip(), owners) for flag, value in INLINE_DEFAULT.findall(block)]
    return stated


def _same_default(stated: str, code: str) -> bool:
    """Whether a default as the README writes it equals the parser's default text (repr of the value)."""
    code = code.strip()
    if len(code) >= 2 and code[0] == code[-1] and code[0] in "'\"":
        code = code[1:-1]
    if stated in ('""', "''"):
        stated = ""
    try:
        return float(stated) == float(code)
    except ValueError:
        return stated == code


# The README and the hand-written documentation pages, each with the entry point its prose is about. The changelog
# keeps past commands as they were; the reference and benchmark pages are generated.
PAGES = {"README.md": "pipeline.train", "docs/getting-started.md": "pipeline.train", "docs/training.md": "pipeline.train",
         "docs/instruments.md": "pipeline.train", "docs/study.md": "pipeline.sweep", "docs/advisor.md": "pipeline.advise",
         "docs/serving.md": "pipeline.evaluate", "docs/scaling-out.md": "pipeline.train",
         "docs/streaming.md": "pipeline.train", "docs/architecture.md": "pipeline.train", "docs/index.md": "pipeline.train",
         "docs/adaptive_batch.md": "pipeline.train"}


def _read(page: str) -> str:
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def readme():
    return _read("README.md")


def test_the_pages_checked_are_all_the_hand_written_pages():
    written = {os.path.relpath(path, REPO) for path in glob.glob(os.path.join(REPO, "docs", "*.md"))}
    assert written - {"docs/changelog.md", "docs/benchmarks.md"} == set(PAGES) - {"README.md"}


@pytest.mark.parametrize("page", PAGES)
def test_every_flag_is_a_flag_of_its_entry_point(page, entry_flags):
    found = readme_flags(_read(page), PAGES[page])
    if page == "README.md":
        assert len(found) >= 40, "the README names fewer flags than expected: is the parsing broken?"
    wrong = [(flag, sorted(owners), where) for flag, owners, where in found
             if not any(flag in entry_flags[owner] for owner in owners)]
    assert not wrong, wrong


@pytest.mark.parametrize("page", PAGES)
def test_every_default_stated_is_the_code_default(page, entry_flags):
    stated = readme_defaults(_read(page), PAGES[page])
    if page == "README.md":
        assert len(stated) >= 15, "the README's flag table was not found"
    wrong = [(flag, value, sorted(owners)) for flag, value, owners in stated
             if not any(flag in entry_flags[entry] and _same_default(value, entry_flags[entry][flag])
                        for entry in owners)]
    assert not wrong, wrong


def _accepts(gen, entry: str, flag: str, value: str) -> bool:
    """Whether the entry point's flag takes this value: its type converts it and it is one of its choices."""
    action = gen.entry_point_parser(entry)._option_string_actions[flag]  # argparse's map of option strings
    if action.nargs == 0:
        return False
    try:
        converted = action.type(value) if action.type else value
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False
    return not action.choices or converted in action.choices


def _parses(gen, entry: str, arguments: list[str]) -> bool:
    parser = gen.entry_point_parser(entry)
    if parser is None:  # pipeline.report takes one folder and no flags
        return len(arguments) == 1 and not arguments[0].startswith("-")
    try:
        parser.parse_args(arguments)
    except SystemExit:
        return False
    return True


@pytest.mark.parametrize("page", PAGES)
def test_every_command_and_flag_value_parses(page, entry_flags):
    """The commands and `--flag VALUE` examples are accepted by the parsers (types and choices), e.g. not an integer
    flag given a word."""
    gen, text = GEN, _read(page)
    rejected = []
    commands = readme_commands(text)
    if page == "README.md":
        assert len(commands) >= 10
    for entry, arguments in commands:
        if "--help" not in arguments and not _parses(gen, entry, arguments):  # --help prints and exits
            rejected.append((entry, arguments))
    for flag, value, owners in readme_values(text, PAGES[page]):
        if not any(_accepts(gen, entry, flag, value) for entry in owners if flag in entry_flags[entry]):
            rejected.append((sorted(owners), [flag, value]))
    assert not rejected, rejected


def test_readme_gives_the_set_up_commands_verbatim_and_no_history(readme):
    assert "python -m pip install -e . && python -m pipeline.train --batch 32" in readme
    assert 'python -m pip install -e ".[test]" && python -m pytest' in readme
    assert 'python -m pytest -m "not slow"' in readme
    assert len(readme.splitlines()) <= 300
    assert not re.findall(r"\b20\d\d-\d\d-\d\d\b", readme), "dates belong in docs/changelog.md"
    assert not re.findall(r"\b\d{1,2}:\d\d(?::\d\d)?\b(?![/\d])", readme.replace("localhost:", "")), \
        "clock times belong in docs/changelog.md"


def test_the_checks_catch_a_wrong_flag_and_a_wrong_default(entry_flags):
    """The parsing above finds what it should: a made-up flag, a flag of another entry point, a wrong default."""
    text = ("## Advisor\n\n`python -m pipeline.advise --no-such-flag 3`\n\nIn `pipeline.sweep`, `--probe-steps` is "
            "not a flag.\n\n| flag | default | what |\n|---|---|---|\n| `--batch` | `64` | wrong |\n")
    flags = readme_flags(text)
    bad = {flag for flag, owners, _ in flags if not any(flag in entry_flags[o] for o in owners)}
    assert bad == {"--no-such-flag", "--probe-steps"}
    (flag, value, owners), = readme_defaults(text)
    assert (flag, value) == ("--batch", "64") and not _same_default(value, entry_flags["pipeline.train"]["--batch"])
    assert readme_values("Set `--epochs many`, or `--epochs N`.") == [("--epochs", "many", {"pipeline.train"})]
    gen = GEN
    assert not _accepts(gen, "pipeline.train", "--epochs", "many")
    assert _accepts(gen, "pipeline.train", "--epochs", "3")
    assert not _accepts(gen, "pipeline.evaluate", "--split", "validation")


def test_the_benchmark_page_shows_each_figure_with_its_run_and_says_when_there_is_none(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    results, render = _load_script("benchmarks/results.py"), _load_script("benchmarks/render.py")
    recorder = results.Recorder("speed", argv=["benchmarks/speed.py", "--rounds", "1"])
    recorder.write(rounds=[{"round": 1, "epoch_s": [1.5, 0.61]}],
                   summary={"tables": {"Speed-up": [{"variant": "a vs b", "speed-up": 1.234, "met": True}]},
                            "wall_ratio": 1.5, "coverage": {"norm_sq": 0.875}},
                   directory=str(tmp_path))
    scripts = {"speed.py": "Training speed.", "streaming.py": "Streamed input."}
    page = render.render(render.read_results(str(tmp_path)), scripts)
    speed, streaming = page.split("## `benchmarks/streaming.py`")
    assert "`python benchmarks/speed.py --rounds 1`" in speed and "| a vs b | 1.234 | yes |" in speed
    assert recorder.started.isoformat(timespec="seconds") in speed and '"epoch_s": [' in speed
    assert "| wall_ratio | 1.5 |" in speed and "| norm_sq | 0.875 |" in speed  # summaries without named tables
    assert "No result file yet; run `python benchmarks/streaming.py`." in streaming
    found = set(render.benchmark_scripts())  # the scripts that write a result file, not the helpers
    assert {"advisor.py", "replica_gradient_stats.py", "speed.py", "streaming.py"} <= found
    assert not found & {"render.py", "results.py", "shapes.py"}


def test_the_flag_reference_has_a_row_for_every_config_field():
    from pipeline import config as config_lib

    page = GEN.flags_page()
    train = page.split("## `python -m pipeline.sweep`")[0]
    for field in dataclasses.fields(config_lib.Config):
        assert f"| `--{field.name.replace('_', '-')}`" in train, field.name


# [text](target) outside code: the target up to a space (a link title) or the closing parenthesis.
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _slug(heading: str) -> str:
    """The anchor GitHub (and MkDocs' toc) gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip("# ").strip().lower())
    return text.replace(" ", "-")


def broken_links(text: str, repo: str = REPO) -> list[str]:
    """The relative links of a markdown page at the repository root that do not resolve in a checkout: a file or
    folder that is missing or ignored by git (a generated page exists only where it was built), or an anchor with no
    heading of that page. Absolute URLs and mail links are not checked."""
    prose = "\n".join(block for _, block, code in _blocks(text) if not code)
    anchors = {_slug(line) for line in text.splitlines() if line.startswith("#")}
    broken = []
    for target in LINK.findall(re.sub(r"`[^`]*`", "", prose)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        if not path:
            if anchor not in anchors:
                broken.append(target)
            continue
        full = os.path.normpath(os.path.join(repo, path))
        ignored = os.path.isdir(os.path.join(repo, ".git")) and subprocess.run(
            ["git", "-C", repo, "check-ignore", "-q", os.path.relpath(full, repo)]).returncode == 0
        if not os.path.exists(full) or ignored or not full.startswith(repo):
            broken.append(target)
    return broken


def test_every_relative_link_of_the_readme_resolves_in_a_checkout(readme):
    assert len(LINK.findall(readme)) >= 10, "the README's links were not found: is the parsing broken?"
    assert broken_links(readme) == []


def test_the_link_check_catches_a_missing_file_a_generated_page_and_a_wrong_anchor(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("generated/\n")
    (tmp_path / "generated").mkdir()
    (tmp_path / "generated" / "page.md").write_text("built here, absent from a checkout")
    (tmp_path / "kept.md").write_text("committed")
    text = ("# Title\n\n## Set up\n\nSee [kept](kept.md), [kept, a section](kept.md#x), [set up](#set-up), "
            "[the site](https://example.org/a.md), [gone](missing.md), [built](generated/page.md), "
            "[no such section](#nowhere) and `[in code](missing-too.md)`.\n\n```\n[code](missing-three.md)\n```\n")
    assert broken_links(text, str(tmp_path)) == ["missing.md", "generated/page.md", "#nowhere"]
