"""Griffe extensions of the docs build (``mkdocs.yml``, ``make docs``). They change what
the API reference shows, never the package.

* :class:`SphinxRoles` -- the docstrings cross-reference in Sphinx's syntax
  (``:func:`~smallchains.init_state```), which Markdown would show as written; each role
  becomes inline code of what Sphinx would display (``init_state``).
* :class:`DataclassInitFalse` -- a ``@dataclass(init=False)`` class keeps the ``__init__``
  it inherits. Griffe's built-in dataclasses extension (griffe 2.4) gives every dataclass
  without an ``__init__`` of its own a generated one, even under ``init=False``, where
  Python generates none. Without this, ``GRU`` and ``LSTM`` (``__init__`` from
  ``_Recurrent``) would be documented as ``GRU()``. Runs after the built-in extension
  (``mkdocs.yml`` lists ``dataclasses`` first).
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`([^`]+)`")


def _shown(target: str) -> str:
    """The text Sphinx displays for a role's target."""
    m = re.fullmatch(r"(.+?)\s*<[^>]+>", target)  # :func:`title <target>`
    if m:
        return m.group(1)
    if target.startswith("~"):
        return target[1:].rsplit(".", 1)[-1]
    return target


def _objects(obj):
    for member in list(obj.members.values()):
        if not member.is_alias:
            yield member
            if member.is_module or member.is_class:
                yield from _objects(member)


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for obj in [pkg, *_objects(pkg)]:
            if obj.docstring is not None:
                obj.docstring.value = _ROLE.sub(lambda m: f"`{_shown(m.group(1))}`", obj.docstring.value)


def _init_false(cls: griffe.Class) -> bool:
    for dec in cls.decorators:
        value = dec.value
        if isinstance(value, griffe.ExprCall) and value.canonical_path == "dataclasses.dataclass":
            return any(isinstance(a, griffe.ExprKeyword) and a.name == "init" and str(a.value) == "False"
                       for a in value.arguments)
    return False


class DataclassInitFalse(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for obj in _objects(pkg):
            if obj.is_class and _init_false(obj):
                init = obj.members.get("__init__")
                # the generated one has no source lines
                if init is not None and not init.is_alias and init.lineno == 0:
                    obj.del_member("__init__")
