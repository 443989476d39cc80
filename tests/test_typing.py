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
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def test_stubtest_compiled_module_and_public_api():
    modules = ["fastxent._core", "fastxent._api", "fastxent._companions", "fastxent._sigmoid"]
    if importlib.util.find_spec("dask") is not None:  # the [dask] extra (in [test])
        modules.append("fastxent.dask")
    res = _run(["mypy.stubtest", *modules, "--ignore-missing-stub"])
    assert res.returncode == 0, res.stdout + res.stderr


def test_py_typed_is_shipped():
    import importlib.resources
    assert importlib.resources.files("fastxent").joinpath("py.typed").is_file()


def test_mypy_accepts_typical_use(tmp_path):
    user = tmp_path / "user.py"
    user.write_text(textwrap.dedent("""
        import numpy as np
        import fastxent as fx
        z = np.zeros((4, 10), np.float32)
        y = np.zeros(4, np.int64)
        loss = fx.cross_entropy(z, y, label_smoothing=0.1, num_threads=2)
        loss2, grad = fx.cross_entropy_with_grad(z, y, out=z, z_loss=1e-4)
        p = fx.softmax(z, axis=-1)
        isas: list[str] = fx.available_isas()
    """))
    res = _run(["mypy", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(user)])
    assert res.returncode == 0, res.stdout + res.stderr
