"""The documentation stays true to the code and to itself.

docs/configuration.md lists exactly the fields of the config structs, with their
defaults; README.md stays a short front door; every relative link in README.md and
docs/ reaches an existing file (and heading). Pure file reads: no processes, no Redis.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from llm_broker.shared.config import Config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIG_DOC = DOCS / "configuration.md"

README_MAX_LINES = 300
#: The first two code blocks of README.md, as CI and newcomers run them.
README_COMMANDS = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && llm-broker dev",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' "
    "&& python -m pytest -q -m 'not chaos and not fuzz and not scale'",
)

#: How a path continues into a field that holds structs: the struct itself, a mapping
#: of them (``providers.<name>.type``) or a list of them (``auth.keys[].tenant``).
ONE, MAPPING, LIST = "", ".<name>", "[]"

HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
#: A heading that names a config section: ``## `providers.<name>` ``.
SECTION = re.compile(r"`([a-z_][a-z0-9_]*(?:\.<name>|\[\]|\.[a-z_][a-z0-9_]*)*)`")
#: A table row that documents a field: ``| `field` | type | default | meaning |``.
ROW = re.compile(r"^\|\s*`([a-z_][a-z0-9_]*)`\s*\|")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _lines_outside_code(text: str) -> Iterator[str]:
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield line


def _nested(tp: Any) -> tuple[str, type[msgspec.Struct]] | None:
    """How the path goes on into a field of type ``tp``, if it holds structs."""

    def is_struct(t: Any) -> bool:
        return isinstance(t, type) and issubclass(t, msgspec.Struct)

    if is_struct(tp):
        return ONE, tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict and is_struct(args[1]):
        return MAPPING, args[1]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and is_struct(args[0]):
        return LIST, args[0]
    return None


def config_fields(
    cls: type[msgspec.Struct] = Config, prefix: str = ""
) -> dict[str, msgspec.structs.FieldInfo]:
    """Every field of the config, nested ones too, by its documented path."""
    found: dict[str, msgspec.structs.FieldInfo] = {}
    for field in msgspec.structs.fields(cls):
        path = prefix + field.encode_name
        found[path] = field
        nested = _nested(field.type)
        if nested is not None:
            way, inner = nested
            found.update(config_fields(inner, path + way + "."))
    return found


def documented_fields(text: str) -> dict[str, str]:
    """Field path -> its default cell, from the section headings and field tables.

    A heading naming a section (``## `redis` ``, ``### `providers.<name>.retry` ``)
    documents that field and starts its table; ``## Top level`` starts the table of
    top-level fields; any other heading ends the section (its tables are not fields).
    """
    found: dict[str, str] = {}
    prefix: str | None = None
    for line in _lines_outside_code(text):
        heading = HEADING.match(line)
        if heading:
            title = heading.group(2)
            section = SECTION.fullmatch(title)
            if title == "Top level":
                prefix = ""
            elif section:
                path = section.group(1)
                found.setdefault(path.removesuffix(LIST).removesuffix(MAPPING), "")
                prefix = path + "."
            else:
                prefix = None
            continue
        row = ROW.match(line)
        if row and prefix is not None:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            found[prefix + row.group(1)] = cells[2] if len(cells) > 2 else ""
    return found


def _yaml_block(text: str) -> str:
    match = re.search(r"^```yaml\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert match, "docs/configuration.md: no YAML block with every field"
    return match.group(1)


def yaml_paths(data: Any, cls: type[msgspec.Struct] = Config, prefix: str = "") -> set[str]:
    """The field paths a config document sets, read with the structs' types."""
    found: set[str] = set()
    for field in msgspec.structs.fields(cls):
        if field.encode_name not in data:
            continue
        path = prefix + field.encode_name
        found.add(path)
        nested = _nested(field.type)
        if nested is None:
            continue
        way, inner = nested
        value = data[field.encode_name]
        items = [value] if way == ONE else list(value.values()) if way == MAPPING else value
        for item in items:
            found |= yaml_paths(item, inner, path + way + ".")
    return found


def _default(field: msgspec.structs.FieldInfo) -> Any:
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return field.default


def _read(value: str, field: msgspec.structs.FieldInfo) -> Any:
    """A documented value (YAML) as the field's type, or the text if it is not one."""
    try:
        return msgspec.convert(yaml.safe_load(value), field.type)
    except (yaml.YAMLError, msgspec.ValidationError):
        return value


def test_every_config_field_is_documented_and_nothing_else() -> None:
    fields = set(config_fields())
    documented = set(documented_fields(CONFIG_DOC.read_text()))
    assert sorted(fields - documented) == [], "config fields missing from docs/configuration.md"
    assert sorted(documented - fields) == [], "docs/configuration.md lists fields that do not exist"


def test_documented_defaults_are_the_structs_defaults() -> None:
    fields = config_fields()
    wrong = []
    for path, cell in documented_fields(CONFIG_DOC.read_text()).items():
        field = fields.get(path)
        if field is None or (_nested(field.type) is not None and cell != "required"):
            continue  # unknown fields fail the test above; sections have no one default
        default = _default(field)
        if cell == "required":
            if default is not msgspec.NODEFAULT:
                wrong.append(f"{path}: documented as required, default is {default!r}")
            continue
        value = re.match(r"`([^`]*)`", cell)
        if value is None:
            wrong.append(f"{path}: default {cell!r} is neither `required` nor a `value`")
        elif default is msgspec.NODEFAULT or _read(value.group(1), field) != default:
            wrong.append(f"{path}: documented default {value.group(1)}, the struct's {default!r}")
    assert wrong == []


def test_the_full_example_is_a_valid_config_with_every_field() -> None:
    data = yaml.safe_load(_yaml_block(CONFIG_DOC.read_text()))
    msgspec.convert(data, Config)  # valid, and no unknown field anywhere
    missing = set(config_fields()) - yaml_paths(data)
    assert sorted(missing) == [], "fields missing from the YAML of docs/configuration.md"


def test_readme_is_a_short_front_door_that_starts_with_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    blocks = re.findall(r"^```sh\n(.*?)\n```", text, re.DOTALL | re.MULTILINE)
    assert tuple(blocks[:2]) == README_COMMANDS


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for line in _lines_outside_code(path.read_text()):
        heading = HEADING.match(line)
        if heading:
            slug = base = _slug(heading.group(2))
            n = 0
            while slug in found:
                n += 1
                slug = f"{base}-{n}"
            found.add(slug)
    return found


PAGES = [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_reach_a_file_and_heading(page: Path) -> None:
    broken = []
    for line in _lines_outside_code(page.read_text()):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            file, _, fragment = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{target}: no such file")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                broken.append(f"{target}: no such heading")
    assert broken == []


def test_the_module_table_lists_every_module() -> None:
    table = (DOCS / "development.md").read_text()
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", table, re.MULTILINE))
    modules = {
        path.relative_to(ROOT).as_posix()
        for folder in ("ingress", "workers", "shared", "llm_broker")
        for path in (ROOT / folder).rglob("*.py")
    }
    assert sorted(modules - listed) == []
    assert sorted(listed - modules) == []
