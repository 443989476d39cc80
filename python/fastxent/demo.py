"""Demo: train two softmax classifiers on scikit-learn's handwritten digits with fastxent.

``python -m fastxent demo`` fits softmax regression (64 -> 10) and a one-hidden-layer MLP
(64 -> 128 ReLU -> 10), both written in NumPy, on ``sklearn.datasets.load_digits`` (bundled
with scikit-learn, no download). Every minibatch step computes the loss and d(loss)/d(logits)
twice on the same logits, with fastxent's fused kernel and with a plain NumPy log-softmax,
timing both (in alternating order) and checking that they agree; the update (Adam) starts
its backward pass from fastxent's gradient. Needs the ``[demo]`` extra (scikit-learn, tqdm;
matplotlib for ``--plot``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ._api import cross_entropy_with_grad

INSTALL_HINT = 'the demo needs scikit-learn and tqdm: pip install "fastxent[demo]"'
MODELS: Dict[str, Tuple[int, ...]] = {  # name -> hidden layer sizes
    "softmax regression (64->10)": (),
    "MLP (64->128 ReLU->10)": (128,),
}


class MissingDependency(ImportError):
    """An optional package of the ``[demo]`` extra is not installed."""


def numpy_loss_grad(logits: np.ndarray, target: np.ndarray) -> Tuple[np.floating, np.ndarray]:
    """Mean cross-entropy and its gradient the straightforward NumPy way (log-softmax)."""
    rows = np.arange(len(target))
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    grad = np.exp(logp)
    grad[rows, target] -= 1
    return -logp[rows, target].mean(), grad / len(target)


def load_data(seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits (8x8 pixels -> 64 features), 75/25 stratified split, standardized with the
    training set's statistics; float32 features, int64 labels."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise MissingDependency(INSTALL_HINT) from e
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(
        x, y.astype(np.int64), test_size=0.25, stratify=y, random_state=seed
    )
    mean, std = xtr.mean(axis=0), xtr.std(axis=0)
    std[std == 0] = 1.0  # constant (always blank) border pixels
    return (
        ((xtr - mean) / std).astype(np.float32),
        ytr,
        ((xte - mean) / std).astype(np.float32),
        yte,
    )


class Net:
    """Dense layers with ReLU between them (no hidden layer: softmax regression), He init."""

    def __init__(self, sizes: Sequence[int], rng: np.random.Generator):
        self.params: List[np.ndarray] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            self.params += [
                (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32),
                np.zeros(n_out, np.float32),
            ]
        self._acts: List[np.ndarray] = []

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits; keeps each layer's input for :meth:`backward`."""
        self._acts = []
        for k in range(0, len(self.params), 2):
            if k:
                x = np.maximum(x, 0)
            self._acts.append(x)
            x = x @ self.params[k] + self.params[k + 1]
        return x

    def backward(self, g: np.ndarray) -> List[np.ndarray]:
        """Gradients of the parameters, from g = d(loss)/d(logits) of the last forward."""
        grads: List[Any] = [None] * len(self.params)
        for k in range(len(self.params) - 2, -1, -2):
            a = self._acts[k // 2]
            grads[k], grads[k + 1] = a.T @ g, g.sum(axis=0)
            if k:
                g = (g @ self.params[k].T) * (a > 0)
        return grads


class Adam:
    """Adam on a list of arrays, updated in place (float32 throughout)."""

    def __init__(
        self,
        params: List[np.ndarray],
        lr: float,
        b1: float = 0.9,
        b2: float = 0.999,
        eps: float = 1e-8,
    ):
        self.params, self.lr, self.b1, self.b2, self.eps, self.t = params, lr, b1, b2, eps, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, grads: List[np.ndarray]) -> None:
        self.t += 1
        lr = self.lr * np.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m += (1 - self.b1) * (g - m)
            v += (1 - self.b2) * (g * g - v)
            p -= lr * m / (np.sqrt(v) + self.eps)


@dataclass
class History:
    """Per-epoch curves of one model."""

    train_loss: List[float] = field(default_factory=list)
    test_acc: List[float] = field(default_factory=list)


@dataclass
class DemoResult:
    """What run_demo measured: curves per model, loss timings, fastxent-vs-NumPy differences."""

    n_train: int
    n_test: int
    batch_size: int
    steps: int = 0  # loss evaluations per implementation
    history: Dict[str, History] = field(default_factory=dict)
    fused_s: float = 0.0  # time in fastxent's fused loss + grad
    numpy_s: float = 0.0  # time in numpy_loss_grad
    max_loss_diff: float = 0.0  # largest |fused - NumPy| seen
    max_grad_diff: float = 0.0  # largest |fused - NumPy| gradient entry
    max_grad: float = 0.0  # largest |gradient entry|, for scale
    train_s: float = 0.0  # wall time of the training loops

    @property
    def agree(self) -> bool:
        """Do fastxent and NumPy agree to float32 rounding on every step?"""
        return self.max_grad_diff <= 1e-5 * self.max_grad and self.max_loss_diff <= 1e-5


def _both_losses(res: DemoResult, logits: np.ndarray, y: np.ndarray) -> Tuple[Any, np.ndarray]:
    """fastxent's fused loss + gradient and numpy_loss_grad on the same logits, each timed
    (who goes first alternates), their difference recorded in res; returns fastxent's."""
    fns = (lambda: cross_entropy_with_grad(logits, y), lambda: numpy_loss_grad(logits, y))
    outs: List[Any] = [None, None]
    secs = [0.0, 0.0]
    for j in (0, 1) if res.steps % 2 == 0 else (1, 0):
        t0 = time.perf_counter()
        outs[j] = fns[j]()
        secs[j] = time.perf_counter() - t0
    (loss, grad), (np_loss, np_grad) = outs
    res.steps += 1
    res.fused_s += secs[0]
    res.numpy_s += secs[1]
    res.max_loss_diff = max(res.max_loss_diff, abs(float(loss) - float(np_loss)))
    res.max_grad_diff = max(res.max_grad_diff, float(np.abs(grad - np_grad).max()))
    res.max_grad = max(res.max_grad, float(np.abs(grad).max()))
    return loss, grad


def run_demo(
    epochs: int = 20,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    lrs: Sequence[float] = (1e-2, 3e-3),
) -> DemoResult:
    """Train both models of ``MODELS`` (learning rates ``lrs``); deterministic given seed.

    BLAS is held to one thread meanwhile: its matrices here are tiny, and its thread pool
    only adds waiting (many times the whole run on a busy machine)."""
    try:
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
        from tqdm import tqdm
    except ImportError as e:
        raise MissingDependency(INSTALL_HINT) from e
    xtr, ytr, xte, yte = load_data(seed)
    res = DemoResult(len(ytr), len(yte), batch_size)
    steps, t0 = epochs * -(-len(ytr) // batch_size), time.perf_counter()
    with threadpool_limits(1, user_api="blas"):
        for (name, hidden), lr in zip(MODELS.items(), lrs):
            rng = np.random.default_rng(seed)
            net, hist = Net((xtr.shape[1], *hidden, 10), rng), History()
            opt = Adam(net.params, lr)
            with tqdm(
                total=steps, desc=name, unit="step", disable=not progress, leave=False
            ) as bar:
                for _ in range(epochs):
                    order, total = rng.permutation(len(ytr)), 0.0
                    for i in range(0, len(ytr), batch_size):
                        idx = order[i : i + batch_size]
                        loss, grad = _both_losses(res, net.forward(xtr[idx]), ytr[idx])
                        opt.step(net.backward(grad))  # backprop from fastxent's grad
                        total += float(loss) * len(idx)
                        bar.update()
                    hist.train_loss.append(total / len(ytr))
                    hist.test_acc.append(float((net.forward(xte).argmax(1) == yte).mean()))
                    bar.set_postfix(
                        loss=f"{hist.train_loss[-1]:.3f}", acc=f"{hist.test_acc[-1]:.3f}"
                    )
            res.history[name] = hist
    res.train_s = time.perf_counter() - t0
    return res


def format_report(res: DemoResult, wall_s: float) -> str:
    """The text ``python -m fastxent demo`` prints."""
    w = max(map(len, res.history))
    lines = [
        f"digits (sklearn): {res.n_train} train / {res.n_test} test images, 64 features, "
        f"10 classes, float32, batch {res.batch_size}, "
        f"{len(next(iter(res.history.values())).test_acc)} epochs, Adam",
        f"{'model':<{w}}  test accuracy  final train loss",
    ]
    for name, h in res.history.items():
        lines.append(f"{name:<{w}}  {100 * h.test_acc[-1]:12.1f}%  {h.train_loss[-1]:16.4f}")
    per = 1e6 / max(res.steps, 1)
    lines += [
        f"loss + d(loss)/d(logits), {res.steps} steps "
        f"({res.batch_size}x10 logits), same logits for both:",
        f"  fastxent fused  {1e3 * res.fused_s:8.1f} ms  ({per * res.fused_s:5.1f} us/step)",
        f"  NumPy           {1e3 * res.numpy_s:8.1f} ms  ({per * res.numpy_s:5.1f} us/step)"
        f"  = {res.numpy_s / max(res.fused_s, 1e-12):.1f}x fastxent",
        f"  max |fastxent - NumPy|: loss {res.max_loss_diff:.1e}, gradient "
        f"{res.max_grad_diff:.1e} (largest gradient entry {res.max_grad:.2f}): "
        + ("agree" if res.agree else "DISAGREE"),
        f"training {res.train_s:.1f} s, total {wall_s:.1f} s (with loading scikit-learn)",
    ]
    return "\n".join(lines)


def check_plot_deps() -> None:
    """Raise MissingDependency early if ``--plot`` cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise MissingDependency('--plot needs matplotlib: pip install "fastxent[demo]"') from e


def plot(res: DemoResult, path: str) -> None:
    """Train loss and test accuracy per epoch, both models, saved to ``path`` (Agg)."""
    check_plot_deps()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for name, h in res.history.items():
        ep = np.arange(1, len(h.train_loss) + 1)
        ax_loss.plot(ep, h.train_loss, marker="o", ms=3, label=name)
        ax_acc.plot(ep, 100 * np.asarray(h.test_acc), marker="o", ms=3, label=name)
    ax_loss.set(
        yscale="log", xlabel="epoch", ylabel="train loss (mean cross-entropy)", title="train loss"
    )
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.suptitle("fastxent demo: sklearn digits, NumPy models, fastxent loss + gradient")
    fig.savefig(path, dpi=110)
