"""The benchmark runs end to end (a smoke test: it measures nothing, timings are never
asserted), with the floors on several threads and the looped timing of tiny calls."""

import subprocess
import sys

from fastxent import bench


def test_run_bench_rows():
    rows = bench.run_bench(
        shapes=[(300, 300), (4, 5)], threads=(1, 2), repeats=3, peers=("numpy",), log=lambda s: None
    )
    base = {
        "copy (floor)",
        "read (floor)",
        "fastxent fused",
        "fastxent fused out=",
        "fastxent in-place",
        "fastxent forward",
        "numpy",
    }
    for shape in ((300, 300), (4, 5)):
        for nt in (1, 2):
            names = {
                r["contestant"] for r in rows if (r["N"], r["C"]) == shape and r["threads"] == nt
            }
            # The floors also run on 2 threads where the array is large enough to split.
            threaded = {"copy (2 threads)", "read (2 threads)"}
            assert names == (base | threaded if nt == 2 and shape == (300, 300) else base)
    for r in rows:
        assert r["median_s"] > 0 and r["repeats"] == 3
        # Ratios divide by the faster floor: no floor is below 1.
        if r["contestant"].startswith("copy ("):
            assert r["ratio_copy"] >= 1.0
    # Calls of microseconds are timed in loops (the note says how many per timing).
    tiny = [r for r in rows if (r["N"], r["C"]) == (4, 5)]
    assert tiny and any("loops of" in r["note"] for r in tiny)


def test_cli_quick():
    r = subprocess.run(
        [sys.executable, "-m", "fastxent", "bench", "--quick", "--peers", "", "--threads", "1,2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "copy (floor)" in r.stdout and "fastxent fused out=" in r.stdout


def test_runs_without_threadpoolctl():
    """`pip install . && python -m fastxent bench` (the README's command) brings numpy only:
    the bench must run without threadpoolctl, saying so."""
    code = (
        "import sys; sys.modules['threadpoolctl'] = None\n"
        "from fastxent.__main__ import main\n"
        "sys.exit(main(['bench', '--quick', '--peers', '', '--threads', '1']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "threadpoolctl is not installed" in r.stdout and "fastxent fused out=" in r.stdout


def test_info_names_the_stream_threshold():
    """`python -m fastxent info` says whether (and from what size) gradients are streamed."""
    import os

    env = dict(os.environ, FASTXENT_STREAM_BYTES=str(3 << 20))
    r = subprocess.run(
        [sys.executable, "-m", "fastxent", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "non-temporal gradient stores from 3 MiB" in r.stdout, r.stdout
    env["FASTXENT_STREAM_BYTES"] = "0"
    r = subprocess.run(
        [sys.executable, "-m", "fastxent", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0 and "no non-temporal stores" in r.stdout, r.stdout
    assert bench._stream_text(1000) == (
        "non-temporal gradient stores from 1000 bytes (out=, not in place)"
    )


def test_rounds_rotate_the_order():
    """Round r runs the contestants rotated by r: a peer whose threads are still busy after
    its call slows a different contestant each round, which the median then discards."""
    order = []  # one entry per timing (prepare runs once before each)
    cs = [
        bench.Contestant(name, lambda: None, prepare=(lambda n=name: order.append(n)), kind=kind)
        for name, kind in (("floor", "floor"), ("fastxent", "fastxent"), ("peer", "peer"))
    ]
    active, skipped, rounds, _ = bench._measure(cs, repeats=4, budget_s=1.0, max_call_s=10.0)
    assert rounds == 4 and not skipped and len(active) == 3
    assert all(len(c.times) == 4 for c in cs)
    assert order[-12:] == [
        "floor",
        "fastxent",
        "peer",
        "fastxent",
        "peer",
        "floor",
        "peer",
        "floor",
        "fastxent",
        "floor",
        "fastxent",
        "peer",
    ]


def test_training_loop_section_rows():
    """The training-loop section (needs PyTorch) times F.cross_entropy and fastxent.torch's
    default path on every case at each thread count, quick shapes here."""
    import pytest

    pytest.importorskip("torch")
    from fastxent import bench_training

    lines = []
    rows = bench_training.run_training((1,), repeats=2, quick=True, log=lines.append)
    cases = {r["case"] for r in rows}
    assert len(cases) == len(bench_training.CASES)
    assert {r["contestant"] for r in rows} == {"torch F.cross_entropy", "fastxent.torch default"}
    for r in rows:
        assert r["median_s"] > 0 and r["threads"] == 1
    assert any("torch / fastxent" in ln for ln in lines)


def test_distill_section_rows():
    """The distillation section times the floor and fastxent's KL / JSD at every shape and
    thread count (quick shape here), and the peers it is given."""
    from fastxent import bench_distill

    lines = []
    rows = bench_distill.run_distill((1,), repeats=2, quick=True, log=lines.append, peers=())
    names = {r["contestant"] for r in rows}
    assert "add a+b->c (floor, 1 thread)" in names
    assert {"fastxent KL fwd+grad out=", "fastxent JSD fwd+grad out=", "fastxent KL loss only"} <= (
        names
    )
    assert "fastxent top-64 KL fwd+grad out=" in names
    for r in rows:
        assert r["median_s"] > 0 and r["threads"] == 1 and r["vs_floor"] > 0
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    rows = bench_distill.run_distill(
        (1,), repeats=2, quick=True, log=lines.append, peers=("torch",)
    )
    names = {r["contestant"] for r in rows}
    assert {"add a+b->c (floor)", "torch F.kl_div fwd+bwd", "torch JSD (ops) fwd+bwd"} <= names
    assert any("torch F.kl_div fwd+bwd / fastxent KL fwd+grad out=" in ln for ln in lines)
    assert "torch top-64 KL (scatter) fwd+bwd" in names
    assert any(
        "torch top-64 KL (scatter) fwd+bwd / fastxent top-64 KL fwd+grad out=" in ln for ln in lines
    )


def test_training_loop_section_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from fastxent import bench_training\n"
        "out = []\n"
        "assert bench_training.run_training((1,), repeats=1, log=out.append) == []\n"
        "print(out[0])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "skipped: PyTorch is not installed" in r.stdout
