"""Lazy package exports: every listed name resolves to its home module's object; others fail."""

import importlib

import pytest


@pytest.mark.parametrize("package", ["patch_megatron.data", "patch_megatron.model", "patch_megatron.est"])
def test_every_export_resolves_and_unknown_names_fail(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        home = importlib.import_module(f"{package}.{module._HOMES[name]}")
        assert getattr(module, name) is getattr(home, name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        module.no_such_name
