"""The README's Python example runs as written (on the tiny stand-in for the built-in model)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, tiny_builtin, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "pruned.safetensors").is_file()


def test_readme_commands_match_ci():
    text = README.read_text(encoding="utf-8")
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    test_cmd = ".venv/bin/python -m pytest tests"
    assert f"```bash\n{test_cmd}\n```" in text
    assert test_cmd in ci
    assert 'pip install -e ".[dev]"' in text and "recipes/quickstart.yaml" in text
