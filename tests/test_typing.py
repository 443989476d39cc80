"""The stubs cannot drift: mypy's stubtest compares python/fastxent/_core.pyi (and the inline
annotations of the pure-Python modules) with the installed package, and mypy type-checks the
public API as a user's code would use it."""

import importlib.util
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("mypy")


def _run(args, **kw):
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, **kw
    )


def _mypy_config(request) -> str:
    """The project's pyproject.toml (its [tool.mypy] section lets the optional imports, torch,
    jax and dask, be absent). stubtest reads no configuration unless it is named, and the
    wheel round trip runs the suite from a copy of tests/ and pyproject.toml."""
    path = request.config.inipath
    if path is None or path.name != "pyproject.toml" or "tool.mypy" not in path.read_text():
        pytest.fail(
            f"the project's pyproject.toml with its [tool.mypy] section is not the "
            f"pytest configuration file here ({path})"
        )
    return str(path)


def test_stubtest_compiled_module_and_public_api(request):
    modules = ["fastxent._core", "fastxent._api", "fastxent._companions", "fastxent._sigmoid"]
    if importlib.util.find_spec("dask") is not None:  # the [dask] extra (in [test])
        modules.append("fastxent.dask")
    res = _run(
        [
            "mypy.stubtest",
            *modules,
            "--ignore-missing-stub",
            "--mypy-config-file",
            _mypy_config(request),
        ]
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_py_typed_is_shipped():
    import importlib.resources

    assert importlib.resources.files("fastxent").joinpath("py.typed").is_file()


def test_mypy_accepts_typical_use(tmp_path):
    user = tmp_path / "user.py"
    user.write_text(
        textwrap.dedent("""
        import numpy as np
        import fastxent as fx
        z = np.zeros((4, 10), np.float32)
        y = np.zeros(4, np.int64)
        loss = fx.cross_entropy(z, y, label_smoothing=0.1, num_threads=2)
        loss2, grad = fx.cross_entropy_with_grad(z, y, out=z, z_loss=1e-4)
        p = fx.softmax(z, axis=-1)
        isas: list[str] = fx.available_isas()
    """)
    )
    # As a user's project would: its own directory, no configuration of fastxent's.
    res = _run(
        ["mypy", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(user)],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_checks_the_loss_keywords(tmp_path):
    """The keywords are written once (fastxent._keywords, ``**kw: Unpack[...]``), and a type
    checker still sees each by name and type: a misspelt keyword and a wrong type are errors."""
    user = tmp_path / "user.py"
    user.write_text(
        textwrap.dedent("""
        import numpy as np
        import fastxent as fx
        z = np.zeros((4, 10), np.float32)
        y = np.zeros(4, np.int64)
        fx.cross_entropy(z, y, zloss=1e-4)
        fx.shard_stats(z, y, offset=0, num_classes=10, label_smoothing="0.1")
    """)
    )
    res = _run(
        ["mypy", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(user)],
        cwd=tmp_path,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert 'Unexpected keyword argument "zloss"' in out, out
    assert '"label_smoothing"' in out and "incompatible type" in out, out
