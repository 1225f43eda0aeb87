"""The CLI keeps compiled bytecode in its cache only where Python was told not to write it and the
installed packages ship none."""

import importlib.util
import os
import sys
from types import SimpleNamespace

import pytest

from isokl_tl_cli.startup import bytecode_cache, keep_freed_memory


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


def test_bytecode_goes_to_the_cache_when_none_can_be_written(no_bytecode, tmp_path, capsys):
    env = {"ISOKL_TL_CACHE": str(tmp_path / "cache")}
    where = bytecode_cache(env)
    assert where == tmp_path / "cache" / "pycache" and where.is_dir()
    assert sys.pycache_prefix == str(where) and not sys.dont_write_bytecode
    assert "PYTHONPYCACHEPREFIX" not in env         # processes the library starts keep their own settings
    assert "ISOKL_TL_BYTECODE_CACHE=0" in capsys.readouterr().err      # said once, when made
    sys.pycache_prefix, sys.dont_write_bytecode = None, True             # the next run
    assert bytecode_cache(env) == where and capsys.readouterr().err == ""


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


def test_help_makes_no_cache(tmp_path):
    """`--help` and `--version` answer without touching the cache; a command makes it (here with a
    stand-in torch package that ships no bytecode, found first on the path and never imported)."""
    import subprocess

    (tmp_path / "site" / "torch").mkdir(parents=True)
    (tmp_path / "site" / "torch" / "__init__.py").write_text("raise ImportError('the stand-in')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "ISOKL_TL_CACHE": str(tmp_path / "c"),
           "PYTHONPATH": ":".join([str(tmp_path / "site"), *sys.path])}

    def cli(*args):
        subprocess.run([sys.executable, "-m", "isokl_tl_cli.main", *args], check=True, env=env, capture_output=True)

    cli("--help")
    cli("--version")
    assert not (tmp_path / "c").exists()
    cli("run", "--help")                          # the group's callback runs before a command's help
    assert (tmp_path / "c" / "pycache").is_dir()


def test_a_command_freezes_what_the_library_import_left_alive():
    """A command's help answers without the library; the command itself imports it and puts every
    object then alive out of the collector's reach (`gc.freeze`), handing them back at exit."""
    import subprocess

    code = ("import gc, sys; from isokl_tl_cli.main import main; "
            "main(['run', '--help'], standalone_mode=False); print('isokl_tl' in sys.modules, gc.get_freeze_count()); "
            "main(['models'], standalone_mode=False); print('isokl_tl' in sys.modules, gc.get_freeze_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith(("True", "False"))]
    assert lines[0] == ["False", "0"]
    assert lines[1][0] == "True" and int(lines[1][1]) > 100_000      # torch alone leaves more
    assert "leaked" not in out.stderr                  # nanobind's complaint when objects outlive the exit


# A fresh process's allocator asked for 100 MiB and given it back: how many blocks were mapped
# apart from the heap, and whether the heap kept the 100 MiB after the free.
MALLOC_PROBE = """
import ctypes
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]
def probe():
    before = libc.mallinfo2().hblks
    p = libc.malloc(100 << 20)
    mapped = libc.mallinfo2().hblks - before
    libc.free(p)
    return mapped, libc.mallinfo2().arena >= 100 << 20
"""


def _without_malloc_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("GLIBC_TUNABLES", "MALLOC_"))}


def _glibc() -> bool:
    import ctypes

    return sys.platform == "linux" and hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not _glibc(), reason="glibc's allocator only")
@pytest.mark.parametrize("setting", ["default", "kept", "GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_"])
def test_a_command_keeps_freed_memory_unless_told_otherwise(setting):
    """`keep_freed_memory` makes glibc serve a 100 MiB block from its heap and keep it after the
    free (by default it maps the block apart and unmaps it at the free); malloc settings of the
    user's own are left alone."""
    import subprocess

    env = {"GLIBC_TUNABLES": {"GLIBC_TUNABLES": "glibc.malloc.check=0"},
           "MALLOC_TRIM_THRESHOLD_": {"MALLOC_TRIM_THRESHOLD_": "131072"}}.get(setting, {})
    call = "False" if setting == "default" else f"keep_freed_memory(env)"
    script = MALLOC_PROBE + (f"from isokl_tl_cli.startup import keep_freed_memory\nenv = {env!r}\nmade = {call}\n"
                             "print(made, *probe(), env.get('GLIBC_TUNABLES', '-'))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=_without_malloc_settings()).stdout.split()
    made = setting == "kept"
    assert out[:3] == (["True", "0", "True"] if made else ["False", "1", "False"])
    assert out[3].startswith("glibc.malloc.mmap_threshold=") if made else out[3] == env.get("GLIBC_TUNABLES", "-")


@pytest.mark.skipif(not _glibc(), reason="glibc's allocator only")
@pytest.mark.parametrize("tunables", [None, "glibc.rtld.optional_static_tls=2048"])
def test_processes_a_command_starts_keep_freed_memory_too(tunables):
    """After `keep_freed_memory` the environment carries the settings (`GLIBC_TUNABLES`, appended
    to tunables of other kinds), so a process started then, as a grid's spawned workers are,
    keeps its freed memory from its first allocation; a process started before does not."""
    import subprocess

    probe = MALLOC_PROBE + "print(*probe())"
    script = ("import subprocess, sys\n"
              "from isokl_tl_cli.startup import keep_freed_memory\n"
              f"run = lambda: subprocess.run([sys.executable, '-c', {probe!r}], capture_output=True, text=True).stdout\n"
              "before = run()\nassert keep_freed_memory()\nimport os\n"
              "print(before.strip(), '|', run().strip(), '|', os.environ['GLIBC_TUNABLES'])")
    env = _without_malloc_settings() | ({"GLIBC_TUNABLES": tunables} if tunables else {})
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    before, after, setting = (p.strip() for p in out.stdout.split("|"))
    assert (before, after) == ("1 False", "0 True")
    assert setting.startswith(f"{tunables}:" if tunables else "glibc.malloc.mmap_threshold=")
    assert setting.endswith(":glibc.malloc.trim_threshold=2147483647")


@pytest.mark.skipif(not _glibc(), reason="glibc's allocator only")
def test_a_command_process_keeps_freed_memory():
    """The CLI makes the setting when a command imports the library (here `models`, in-process)."""
    import subprocess

    script = MALLOC_PROBE + ("from isokl_tl_cli.main import main\nmain(['models'], standalone_mode=False)\n"
                             "print(*probe())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=_without_malloc_settings())
    assert out.stdout.split()[-2:] == ["0", "True"]


@pytest.mark.parametrize("code, status, err", [(None, 0, ""), (3, 3, ""), ("no such run", 1, "no such run\n")])
def test_leaving_joins_threads_runs_exit_handlers_and_flushes(code, status, err):
    """`leave` skips only the teardown: a running thread finishes, `atexit` handlers run after it,
    output still in the buffers arrives, and the status is SystemExit's."""
    import subprocess

    script = ("import atexit, sys, threading, time; from isokl_tl_cli.startup import leave; "
              "atexit.register(lambda: print('exit handler')); "
              "threading.Thread(target=lambda: (time.sleep(0.3), print('thread'))).start(); "
              f"sys.stdout.write('buffered '); leave({code!r})")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}     # output kept in buffers
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == status
    assert out.stdout == "buffered thread\nexit handler\n" and out.stderr == err


def test_the_script_leaves_with_clicks_status(tmp_path):
    """The installed script's path (pyproject's entry point, `console`): usage errors and user errors
    keep their status and message, output kept in buffers arrives, and the objects still alive at
    the end are not torn down (a `__del__` that would print stays silent; it prints when the same
    process ends the usual way)."""
    import subprocess
    import tomllib
    from pathlib import Path

    import isokl_tl_cli.main

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    module, _, name = pyproject["project"]["scripts"]["isokl-tl"].partition(":")
    assert (module, name) == ("isokl_tl_cli.main", "console")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}     # output kept in buffers

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "isokl_tl_cli.main", *args], capture_output=True, text=True,
                              env=env)

    version = cli("--version")
    assert version.returncode == 0 and version.stdout.strip().endswith(isokl_tl_cli.main._version())
    bad = cli("run", "--no-such-option")
    assert bad.returncode == 2 and "No such option" in bad.stderr
    missing = cli("plot", "--out", str(tmp_path / "none"))
    assert missing.returncode == 1 and "holds no run" in missing.stderr

    def ends(how: str) -> str:
        script = ("import sys; from isokl_tl_cli.main import console\n"
                  "class Loud:\n    def __del__(self): print('torn down')\n"
                  f"kept = Loud(); sys.argv = ['isokl-tl', '--version']; {how}")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert ends("console()").splitlines()[-1].endswith(isokl_tl_cli.main._version())
    assert "torn down" not in ends("console()")
    assert "torn down" in ends("print('the usual way')")
