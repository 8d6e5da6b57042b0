"""Method adapters are found by their ``@register_method`` registration, nothing else (timm style)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import methods
from methods.base import METHODS, get_method, list_methods, register_method

ADAPTERS = ["admm", "atmc", "hydra", "mad", "pwoa", "structured"]


def _fresh(code: str):
    """Run ``code`` in a new interpreter (the registry starts empty there) and return what it prints as JSON."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_importing_the_package_registers_every_adapter():
    assert list_methods() == ADAPTERS
    # A fresh process that imports only the registry's module finds them too: no discovery step to call.
    assert _fresh("import json; from methods.base import list_methods; print(json.dumps(list_methods()))") == ADAPTERS


def test_every_registering_module_is_imported_by_the_package():
    # An adapter whose module is missing from methods/__init__.py would only appear once something imported it.
    code = (
        "import importlib, json, pkgutil, methods\n"
        "from methods.base import METHODS\n"
        "before = METHODS.list()\n"
        "for info in pkgutil.iter_modules(methods.__path__):\n"
        "    importlib.import_module(f'methods.{info.name}')\n"
        "print(json.dumps([before, METHODS.list()]))\n"
    )
    before, after = _fresh(code)
    assert before == after == ADAPTERS


@pytest.mark.parametrize("key", ADAPTERS)
def test_registered_class_lives_in_an_imported_adapter_module(key):
    cls = METHODS.get(key)
    assert cls.__module__.removeprefix("methods.") in methods.__all__
    assert type(get_method(key)) is cls and cls.card.key == key


def test_registering_a_name_twice_or_under_another_key_is_an_error():
    hydra = METHODS.get("hydra")
    with pytest.raises(ValueError, match="already registered"):
        register_method("hydra")(hydra)
    with pytest.raises(ValueError, match="its card says 'hydra'"):
        register_method("hydra2")(hydra)
    assert list_methods() == ADAPTERS


def test_unknown_method_names_the_closest_one():
    with pytest.raises(KeyError, match="did you mean 'hydra'"):
        get_method("hydar")
