"""The one registration style: ``@REG.register`` factories, entries ordered by import or by
their own key, and a registry's package importing every module that registers into it."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from jas_prune.errors import InvalidArgumentError
from jas_prune.registry import Registry, import_submodules


@dataclass(frozen=True)
class Entry:
    name: str
    order: int = 0


def test_register_adds_the_factorys_entry_once_and_refuses_a_second_of_the_same_name():
    reg: Registry[Entry] = Registry("thing")

    @reg.register
    def _b() -> Entry:
        return Entry("b")

    assert reg.get("b") == Entry("b") and callable(_b)
    with pytest.raises(ValueError, match="thing 'b' is registered twice"):
        reg.register(lambda: Entry("b"))
    with pytest.raises(InvalidArgumentError, match=r"^key: unknown thing 'bb' \(did you mean 'b'\?\); choose one of b$"):
        reg.get("bb", "key")


def test_order_key_sorts_whatever_the_registration_order():
    reg: Registry[Entry] = Registry("stage", order=lambda e: e.order)
    for name, order in (("late", 30), ("early", 10), ("middle", 20)):
        reg.register(lambda name=name, order=order: Entry(name, order))
    assert reg.names() == ("early", "middle", "late") and [e.name for e in reg] == list(reg.names())


def test_import_submodules_finds_a_new_module_without_a_list(tmp_path, monkeypatch):
    pkg = tmp_path / "regpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from jas_prune.registry import Registry\nREG = Registry('thing')\n")
    for name in ("zeta", "alpha", "_private"):
        (pkg / f"{name}.py").write_text(f"from regpkg import REG\nREG.register(lambda: type('E', (), {{'name': '{name}'}})())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "regpkg", raising=False)
    import regpkg

    import_submodules("regpkg", regpkg.__path__, first=("zeta",))
    assert regpkg.REG.names() == ("zeta", "alpha")  # first ones first, then by name; _private skipped
    for name in ("regpkg", "regpkg.zeta", "regpkg.alpha"):
        sys.modules.pop(name, None)
