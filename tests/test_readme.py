"""The README's and docs/ pages' examples run as written (on the tiny stand-in for the built-in
model), their recipes parse, and their links lead somewhere."""

import re
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _blocks(path: Path, lang: str) -> list[str]:
    """The ``lang`` code blocks of a markdown page (also those indented inside a list). A fragment
    that cannot run alone is marked ``py`` instead of ``python``."""
    return [textwrap.dedent(b) for b in
            re.findall(rf"^[ \t]*```{lang}\n(.*?)^[ \t]*```", path.read_text(encoding="utf-8"), flags=re.S | re.M)]


def _run_blocks(path: Path) -> int:
    blocks = _blocks(path, "python")
    for code in blocks:
        exec(compile(code, str(path), "exec"), {"__name__": "__readme__"})
    return len(blocks)


def test_readme_python_example_runs(tmp_path, tiny_builtin, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run_blocks(README), "README has no python example"
    assert (tmp_path / "pruned.safetensors").is_file()


def test_docs_python_examples_run(tmp_path, tiny_builtin, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = {path.name: _run_blocks(path) for path in DOCS}
    assert ran.get("torch-pruning.md", 0) >= 2, ran
    assert (tmp_path / "pruned-heads.safetensors").is_file()


def test_readme_commands_match_ci():
    text = README.read_text(encoding="utf-8")
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    test_cmd = ".venv/bin/python -m pytest tests"
    assert f"```bash\n{test_cmd}\n```" in text
    assert test_cmd in ci
    assert 'pip install -e ".[dev]"' in text and "recipes/quickstart.yaml" in text


def _unspelled(spelled: dict, parsed, where: str) -> list[str]:
    """Schema keys of ``parsed`` that the documented mapping ``spelled`` leaves out, recursively."""
    missing = []
    for name, field in type(parsed).model_fields.items():
        key = field.alias or name
        if key not in spelled:
            missing.append(f"{where}{key}")
            continue
        value = getattr(parsed, name)
        if isinstance(spelled[key], dict) and hasattr(type(value), "model_fields"):
            missing += _unspelled(spelled[key], value, f"{where}{key}.")
    return missing


def test_documented_recipes_parse_and_reference_is_complete():
    from jas_prune.recipe import parse_recipe

    recipes = [(path, block) for path in [README, *DOCS] for block in _blocks(path, "yaml")
               if block.startswith("version:")]
    assert {path.name for path, _ in recipes} >= {"README.md", "recipes.md"}
    for path, block in recipes:
        parse_recipe(yaml.safe_load(block), path.name)
    reference = yaml.safe_load(_blocks(ROOT / "docs" / "recipes.md", "yaml")[0])
    missing = _unspelled(reference, parse_recipe(reference, "docs/recipes.md"), "")
    assert not missing, f"docs/recipes.md: add {', '.join(missing)} to the reference recipe and the key table"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.is_file(), f"{page.name}: link to missing {target}"
        if anchor and dest.suffix == ".md":
            body = re.sub(r"```.*?```", "", dest.read_text(encoding="utf-8"), flags=re.S)
            headings = re.findall(r"^#+ (.*)$", body, flags=re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{page.name}: no heading for {target}"
