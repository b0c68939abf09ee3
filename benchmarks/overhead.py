"""Train-step overhead of injected dropout versus the same models written by hand with ``nn.Dropout``.

Four models (MLP, 1-D CNN, GRU, Transformer encoder) are built twice: once by hand with ``nn.Dropout`` (and
the float attention dropout of ``nn.TransformerEncoderLayer``), once without dropout and then given the same
dropout sites through :func:`lightning_dropout.inject`. Both copies share their parameters (state_dict copied,
keys verified) and are checked to compute the same thing: equal outputs in eval mode, and, since the sites
draw their masks in the same order, equal outputs in training mode from the same seed.

A train step is forward + backward + ``Adam.step`` on CPU (``--device cuda``: on the GPU, the clock read after
``torch.cuda.synchronize()``). Each repeat times ``--steps`` steps of the baseline
and ``--steps`` of the injected model, alternating the two step by step (``--interleave block``: one block per
model, the block order alternating between repeats), so both see the same machine load; the per-repeat ratio
injected / baseline is summarized by its median and interquartile range.

Usage::

    python benchmarks/overhead.py                      # 15 repeats x 30 steps, one thread
    python benchmarks/overhead.py --quick --out /tmp/overhead.md   # smoke test (seconds)
    python benchmarks/overhead.py --device cuda --out /tmp/overhead_cuda.md   # on a GPU (benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from common import cpu_model, markdown_table
from torch import Tensor, nn

import lightning_dropout
from lightning_dropout import Rule, inject

TARGET = 1.02
P = 0.1
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "overhead.md"


# ----------------------------------------------------------------------------------------------------------
# Models: ``dropout=True`` is the hand-written baseline, ``dropout=False`` the one dropout is injected into.
# nn.Dropout owns no state, so both variants have the same state_dict keys.
# ----------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """3 hidden blocks Linear(512) + ReLU, dropout after each ReLU, then a Linear head."""

    def __init__(
        self, dropout: bool, d_in: int = 256, width: int = 512, depth: int = 3, n_out: int = 10
    ) -> None:
        super().__init__()
        blocks = []
        for i in range(depth):
            layers: list[nn.Module] = [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(P))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x))


class CNN(nn.Module):
    """3 x (Conv1d -> dropout -> ReLU), global average pool, Linear head."""

    def __init__(
        self, dropout: bool, c_in: int = 8, channels: int = 32, depth: int = 3, n_out: int = 10
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(c_in if i == 0 else channels, channels, kernel_size=5, padding=2) for i in range(depth)
        )
        self.drops = nn.ModuleList(nn.Dropout(P) for _ in range(depth)) if dropout else None
        self.act = nn.ReLU()
        self.head = nn.Linear(channels, n_out)

    def forward(self, x: Tensor) -> Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.drops is not None:
                x = self.drops[i](x)
            x = self.act(x)
        return self.head(x.mean(dim=-1))


class GRUNet(nn.Module):
    """GRU over the sequence, dropout on its output sequence, Linear head on the last step."""

    def __init__(self, dropout: bool, d_in: int = 32, hidden: int = 128, n_out: int = 10) -> None:
        super().__init__()
        self.gru = nn.GRU(d_in, hidden, batch_first=True)
        self.drop = nn.Dropout(P) if dropout else None
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        seq, _ = self.gru(x)
        if self.drop is not None:
            seq = self.drop(seq)
        return self.head(seq[:, -1])


class Encoder(nn.Module):
    """Linear embedding, 2 ``nn.TransformerEncoderLayer`` (4 dropout sites each), mean pool, Linear head."""

    def __init__(
        self,
        dropout: bool,
        d_in: int = 32,
        d_model: int = 64,
        nhead: int = 4,
        ff: int = 128,
        depth: int = 2,
        n_out: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=P if dropout else 0.0, batch_first=True)
            for _ in range(depth)
        )
        self.head = nn.Linear(d_model, n_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(dim=1))


@dataclass
class Case:
    name: str
    build: Callable[[bool], nn.Module]
    rules: list[Rule]
    batch: int
    input_shape: tuple[int, ...]
    n_sites: int  # dropout sites per model, checked against the injected plan


CASES = [
    Case("mlp", MLP, [Rule(match=nn.ReLU, p=P)], 64, (256,), 3),
    Case("cnn", CNN, [Rule(match=nn.Conv1d, p=P)], 32, (8, 128), 3),
    Case("gru", GRUNet, [Rule(match=nn.GRU, variant="standard", p=P)], 32, (16, 32), 1),
    Case(
        "transformer",
        Encoder,
        [Rule(replace=True, p=P), Rule(match=nn.TransformerEncoderLayer, variant="attention", p=P)],
        12,
        (32, 32),
        8,
    ),
]


# ----------------------------------------------------------------------------------------------------------
# Building and checking a pair
# ----------------------------------------------------------------------------------------------------------
def build_pair(case: Case, seed: int, device: str = "cpu") -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """The hand-written and the injected model (same parameters), a fixed input batch and its targets, on
    ``device``."""
    torch.manual_seed(seed)
    baseline = case.build(True)
    injected = case.build(False)
    base_keys, inj_keys = list(baseline.state_dict()), list(injected.state_dict())
    if base_keys != inj_keys:
        raise RuntimeError(f"{case.name}: state_dict keys differ before injection: {base_keys} vs {inj_keys}")
    injected.load_state_dict(baseline.state_dict())
    plan = inject(injected, rules=case.rules)
    after = list(injected.state_dict())
    if after != base_keys:
        raise RuntimeError(f"{case.name}: injection changed the state_dict keys: {base_keys} vs {after}")
    if len(plan) != case.n_sites:
        raise RuntimeError(
            f"{case.name}: expected {case.n_sites} dropout sites, got {len(plan)}: {[s.key for s in plan]}"
        )
    for name, tensor in baseline.state_dict().items():
        if not torch.equal(tensor, injected.state_dict()[name]):
            raise RuntimeError(f"{case.name}: parameter {name!r} differs between the two models")
    baseline.to(device)
    injected.to(device)
    x = torch.randn(case.batch, *case.input_shape, device=device)
    y = torch.randint(0, 10, (case.batch,), device=device)
    check_same_function(case.name, baseline, injected, x)
    return baseline, injected, x, y


def check_same_function(name: str, baseline: nn.Module, injected: nn.Module, x: Tensor) -> None:
    """Eval outputs must match; training outputs from the same seed too (same sites, same mask order)."""
    for training in (False, True):
        outs = []
        for model in (baseline, injected):
            model.train(training)
            torch.manual_seed(1234)
            with torch.no_grad():
                outs.append(model(x))
        # on a GPU the two models may take different kernels (cuDNN's TF32 convolutions): a looser tolerance
        tol = {"rtol": 1e-4, "atol": 1e-5} if x.is_cuda else {"rtol": 1e-5, "atol": 1e-6}
        if not torch.allclose(outs[0], outs[1], **tol):
            diff = (outs[0] - outs[1]).abs().max().item()
            mode = "train" if training else "eval"
            raise AssertionError(
                f"{name}: {mode} outputs of the baseline and the injected model differ "
                f"(max abs diff {diff:.3g})"
            )
    baseline.train()
    injected.train()


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------
class Stepper:
    def __init__(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        self.model = model.train()
        self.x, self.y = x, y
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.loss = nn.CrossEntropyLoss()

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.model(self.x), self.y).backward()
        self.opt.step()

    def timed_step(self) -> float:
        cuda = self.x.is_cuda
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def timed_repeat(
    pair: tuple[Stepper, Stepper], steps: int, first: int, interleave: str
) -> tuple[float, float]:
    """Seconds per step of the baseline and of the injected model over one repeat of ``steps`` steps each.

    ``interleave="step"`` alternates the two models step by step (who goes first flips every step), so both
    see the same load even when other processes come and go; ``"block"`` runs all steps of the model
    ``first`` and then all steps of the other.
    """
    totals = [0.0, 0.0]
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        if interleave == "step":
            for k in range(steps):
                for i in (first, 1 - first) if k % 2 == 0 else (1 - first, first):
                    totals[i] += pair[i].timed_step()
        else:
            cuda = pair[0].x.is_cuda
            for i in (first, 1 - first):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(steps):
                    pair[i].step()
                if cuda:
                    torch.cuda.synchronize()
                totals[i] = time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()
    return totals[0] / steps, totals[1] / steps


@dataclass
class Result:
    name: str
    base_ms: float
    inj_ms: float
    ratio: float
    q1: float
    q3: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def measure(
    case: Case,
    repeats: int,
    steps: int,
    warmup: int,
    seed: int,
    interleave: str = "step",
    device: str = "cpu",
) -> Result:
    baseline, injected, x, y = build_pair(case, seed, device)
    pair = (Stepper(baseline, x, y), Stepper(injected, x, y))
    for stepper in pair:
        for _ in range(warmup):
            stepper.step()
    # Move everything alive now (torch, its lazily imported modules, the models) out of the collector's
    # reach once, so the gc.collect() before each timed block is cheap.
    gc.collect()
    gc.freeze()
    base_t, inj_t, ratios = [], [], []
    for r in range(repeats):
        base, inj = timed_repeat(pair, steps, first=r % 2, interleave=interleave)  # alternate who goes first
        base_t.append(base)
        inj_t.append(inj)
        ratios.append(inj / base)
    q1, med, q3 = quartiles(ratios)
    return Result(case.name, 1e3 * statistics.median(base_t), 1e3 * statistics.median(inj_t), med, q1, q3)


# ----------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------
def table(results: list[Result]) -> list[list[str]]:
    rows = [["model", "baseline ms/step", "injected ms/step", "median ratio", "IQR (q1-q3)", f"<= {TARGET}x"]]
    for r in results:
        rows.append(
            [
                r.name,
                f"{r.base_ms:.2f}",
                f"{r.inj_ms:.2f}",
                f"{r.ratio:.3f}x",
                f"{r.iqr:.3f} ({r.q1:.3f}-{r.q3:.3f})",
                "yes" if r.ratio <= TARGET else "NO",
            ]
        )
    return rows


def format_text(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def format_markdown(rows: list[list[str]], meta: dict[str, str]) -> str:
    lines = [
        "# Injected dropout: train-step overhead",
        "",
        "Generated by `python benchmarks/overhead.py` (see `benchmarks/README.md`). Train step = forward + "
        "backward + Adam step (device below); ratio = injected / hand-written `nn.Dropout` model, per paired repeat.",
        f"Target: median ratio <= {TARGET}x.",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", *markdown_table(rows)]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15, help="paired repeats per model (default 15)")
    parser.add_argument("--steps", type=int, default=30, help="train steps per timed block (default 30)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per model first (default 10)")
    parser.add_argument(
        "--interleave",
        choices=("step", "block"),
        default="step",
        help="alternate the two models every step (default; robust to changing load) or run "
        "each repeat as one block per model, alternating which block goes first",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--models",
        default=",".join(c.name for c in CASES),
        help=f"comma-separated subset of {[c.name for c in CASES]}",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="Markdown output (default benchmarks/results/overhead.md)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 repeats of 3 steps, 1 warmup step (overrides the counts)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.warmup = 2, 3, 1
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats, --steps and --threads must be >= 1 and --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} needs a CUDA device, but torch sees none")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - {c.name for c in CASES})
    if unknown or not names:
        parser.error(f"--models must name some of {[c.name for c in CASES]}, got {args.models!r}")
    args.models = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [c for c in CASES if c.name in args.models]
    results = []
    for case in cases:
        result = measure(case, args.repeats, args.steps, args.warmup, args.seed, args.interleave, args.device)
        print(
            f"{case.name}: baseline {result.base_ms:.2f} ms, injected {result.inj_ms:.2f} ms, "
            f"ratio {result.ratio:.3f}x",
            flush=True,
        )
        results.append(result)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "lightning_dropout": lightning_dropout.__version__,
        "python": platform.python_version(),
        "CPU": cpu_model(),
        "threads": str(torch.get_num_threads()),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "repeats x steps": f"{args.repeats} x {args.steps} (warmup {args.warmup}, interleave={args.interleave})"
        + (" [--quick]" if args.quick else ""),
    }
    rows = table(results)
    print()
    print(format_text(rows))
    print(
        f"target: median ratio <= {TARGET}x; torch {meta['torch']}, {meta['threads']} thread(s), "
        f"{meta['CPU']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(format_markdown(rows, meta))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
