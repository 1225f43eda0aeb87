"""The CLI keeps compiled bytecode in its cache only where Python was told not to write it and the
installed packages ship none."""

import importlib.util
import sys
from types import SimpleNamespace

import pytest

from isokl_tl_cli.startup import bytecode_cache


@pytest.fixture
def no_bytecode(monkeypatch, tmp_path):
    """An interpreter told not to write bytecode, with a torch installed without any."""
    torch_dir = tmp_path / "site" / "torch"
    torch_dir.mkdir(parents=True)
    (torch_dir / "__init__.py").write_text("")
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.setattr(sys, "pycache_prefix", None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: SimpleNamespace(origin=str(torch_dir / "__init__.py")) if name == "torch"
                        else real(name, *a))
    return torch_dir


def test_bytecode_goes_to_the_cache_when_none_can_be_written(no_bytecode, tmp_path):
    env = {"ISOKL_TL_CACHE": str(tmp_path / "cache")}
    where = bytecode_cache(env)
    assert where == tmp_path / "cache" / "pycache" and where.is_dir()
    assert sys.pycache_prefix == str(where) and not sys.dont_write_bytecode
    assert env["PYTHONPYCACHEPREFIX"] == str(where)


@pytest.mark.parametrize("case", ["opted out", "packages ship bytecode", "writing allowed", "prefix set"])
def test_bytecode_settings_left_alone(no_bytecode, tmp_path, monkeypatch, case):
    env = {"ISOKL_TL_CACHE": str(tmp_path / "cache")}
    if case == "opted out":
        env["ISOKL_TL_BYTECODE_CACHE"] = "0"
    elif case == "packages ship bytecode":
        (no_bytecode / "__pycache__").mkdir()
    elif case == "writing allowed":
        monkeypatch.setattr(sys, "dont_write_bytecode", False)
    else:
        monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "theirs"))
    before = (sys.dont_write_bytecode, sys.pycache_prefix)
    assert bytecode_cache(env) is None
    assert (sys.dont_write_bytecode, sys.pycache_prefix) == before and "PYTHONPYCACHEPREFIX" not in env
    assert not (tmp_path / "cache").exists()
