"""The study's figures (matplotlib) for TensorBoard and the static HTML report of ``lightning-dropout report``.

Everything is read from the study storage (each trial holds its plan and metrics), so a report can be made
from any machine that reaches the storage, during or after the study.

Figures: optimization history, intermediate values (pruned trials visible), parameter importances over the
per-site rates and variants, the best plan's rate per site, and the generalization gap at the best epoch
against the validation value for every trial. Each figure has one title; a figure the study cannot draw (too
few trials, a winner without dropout) is left out with the reason. Two values of a trial are shown, always
labelled: its *trial value* (``study.value``: e.g. the ``ema`` of its validation curve, what Optuna ranks and
the re-runs compare) and the *best epoch*'s value of the same curve.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt
import optuna
from matplotlib.figure import Figure
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from lightning_dropout.monitor import metric_base_name
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.tune.board import write_experiment
from lightning_dropout.tune.records import (
    BASELINE_ATTR,
    FAIL_ATTR,
    METRICS_ATTR,
    PLAN_ATTR,
    rerun_candidates,
    study_metric,
    value_rule,
    winner,
    winner_rule,
)
from lightning_dropout.tune.selection import Comparison, compare

__all__ = [
    "FigureSkipped",
    "markdown_results",
    "metric_labels",
    "output_console",
    "plan_summary",
    "study_figures",
    "write_report",
    "write_study_images",
]

log = logging.getLogger(__name__)

_LOG_WIDTH = 120  # the results' width when stdout is not a terminal

_STATE_STYLE = {
    TrialState.COMPLETE: ("tab:blue", "o", "complete"),
    TrialState.PRUNED: ("tab:orange", "x", "pruned"),
}


def _plan(trial: FrozenTrial) -> DropoutPlan | None:
    text = trial.user_attrs.get(PLAN_ATTR)
    return DropoutPlan.from_yaml(text) if text else None


class FigureSkipped(ValueError):
    """A figure the study's trials do not allow; its message says why (shown in the report)."""


def _value_label(study: optuna.Study) -> str:
    """``"trial value (ema)"``: what a trial's value is (``study.value``), as every table and axis labels it."""
    rule = value_rule(study)
    return f"trial value ({rule})" if rule else "trial value"


def metric_labels(study: optuna.Study) -> dict[str, str]:
    """The label of each HParams metric of the study's runs (``hp/value``: the trial value, ``hp/best_<metric>``:
    the best epoch's value), as TensorBoard shows them."""
    metric = study_metric(study)
    return {
        "hp/value": f"{metric}: {_value_label(study)}",
        f"hp/best_{metric}": f"{metric} at the best epoch",
        "hp/best_epoch": "the best epoch",
    }


def _title(ax: Any, text: str) -> None:
    """Give ``ax`` the one title ``text`` (Optuna's plots come with their own, centred)."""
    for loc in ("left", "right"):
        ax.set_title("", loc=loc)
    ax.set_title(text)


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return fn()


def _history(study: optuna.Study) -> Figure:
    ax = _quiet(lambda: optuna.visualization.matplotlib.plot_optimization_history(study))
    ax.set_ylabel(f"{study_metric(study)}: {_value_label(study)}")
    _title(ax, f"Optimization history ({_value_label(study)} of each trial)")
    return _fit(ax.figure)


def _fit(fig: Figure) -> Figure:
    """Optuna's figures are sized for short parameter names: widen them and keep every label inside."""
    fig.set_size_inches(9, max(4.8, fig.get_size_inches()[1]))
    fig.tight_layout()
    return fig


def _intermediate(study: optuna.Study) -> Figure:
    ax = _quiet(lambda: optuna.visualization.matplotlib.plot_intermediate_values(study))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{study_metric(study)} at each epoch")
    legend = ax.get_legend()
    if legend is not None:
        legend.remove()  # one entry per trial: unreadable beyond a few trials
    _title(ax, "Intermediate values (every trial; pruned ones stop early)")
    return _fit(ax.figure)


def _site_study(study: optuna.Study) -> optuna.Study:
    """The sampled trials re-expressed over flat per-site parameters (``<site> p`` in [0, 1], ``<site>
    variant`` including ``none``): a conditional space has almost no parameter common to every trial, which
    Optuna's importance evaluators need."""
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if BASELINE_ATTR not in t.user_attrs and _plan(t) is not None and t.value is not None
    ]
    plans = [_plan(t) for t in trials]
    keys = sorted({s.key for p in plans if p is not None for s in p})
    variants = sorted({s.variant for p in plans if p is not None for s in p} | {"none"})
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" line
    try:
        flat = optuna.create_study(direction=study.direction)
    finally:
        optuna.logging.set_verbosity(verbosity)
    for trial, plan in zip(trials, plans, strict=True):
        assert plan is not None
        sites = {s.key: s for s in plan}
        params: dict[str, Any] = {}
        dists: dict[str, Any] = {}
        for key in keys:
            site = sites.get(key)
            params[f"{key} p"] = float(site.p) if site else 0.0
            dists[f"{key} p"] = FloatDistribution(0.0, 1.0)
            if len(variants) > 2:
                params[f"{key} variant"] = site.variant if site else "none"
                dists[f"{key} variant"] = CategoricalDistribution(variants)
        flat.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=trial.value))
    return flat


def _importances(study: optuna.Study) -> Figure:
    flat = _site_study(study)
    if len(flat.trials) < 2 or not flat.trials[0].params:
        raise FigureSkipped("parameter importances need at least two completed sampled trials with sites")
    # PED-ANOVA: no scikit-learn needed (fANOVA and MDI import it), and suited to small studies
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    ax = _quiet(lambda: optuna.visualization.matplotlib.plot_param_importances(flat, evaluator=evaluator))
    _title(ax, "Importance of each site's rate and variant (PED-ANOVA)")
    return _fit(ax.figure)


def _best_rates(study: optuna.Study) -> Figure:
    plan, label = winner(study)
    if not len(plan):
        raise FigureSkipped(f"the winner, {label}, has no dropout site: no rate to draw")
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(plan), 2) + 1.2))
    names = [f"{s.key} ({s.variant})" for s in plan]
    ax.barh(names, [s.p for s in plan], color="tab:green")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("rate p")
    ax.set_title(f"Best plan: {label}")
    fig.tight_layout()
    return fig


def _gap_vs_value(study: optuna.Study) -> Figure:
    metric = study_metric(study)
    base = metric_base_name(metric)
    fig, ax = plt.subplots(figsize=(7, 5))
    plotted = 0
    for state, (color, marker, label) in _STATE_STYLE.items():
        xs, ys = [], []
        for t in study.get_trials(deepcopy=False, states=(state,)):
            m = t.user_attrs.get(METRICS_ATTR) or {}
            x, y = m.get("best_value"), m.get(f"gap_at_best/{base}")
            if x is None or y is None or math.isnan(x) or math.isnan(y):
                continue
            xs.append(x)
            ys.append(y)
            if BASELINE_ATTR in t.user_attrs:
                ax.annotate(
                    str(t.user_attrs[BASELINE_ATTR]), (x, y), textcoords="offset points", xytext=(5, 5)
                )
        if xs:
            ax.scatter(xs, ys, c=color, marker=marker, label=label)
            plotted += len(xs)
    if not plotted:
        raise FigureSkipped(f"no trial recorded `gap_at_best/{base}` (is study.gap_samples 0?)")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel(f"{metric} at the best epoch")
    ax.set_ylabel(f"gap/{base} at the best epoch (validation - clean training)")
    ax.set_title("Generalization gap vs validation value, per trial")
    ax.legend()
    fig.tight_layout()
    return fig


_FIGURES: dict[str, Callable[[optuna.Study], Figure]] = {
    "optimization_history": _history,
    "intermediate_values": _intermediate,
    "param_importances": _importances,
    "best_rates": _best_rates,
    "gap_vs_value": _gap_vs_value,
}


def study_figures(study: optuna.Study) -> tuple[dict[str, Figure], dict[str, str]]:
    """Every figure that the study's trials allow, and for the others the reason (e.g. too few trials)."""
    figures: dict[str, Figure] = {}
    skipped: dict[str, str] = {}
    for name, make in _FIGURES.items():
        try:
            figures[name] = make(study)
        except Exception as err:  # a figure needs data the study may not have yet
            skipped[name] = str(err) if isinstance(err, FigureSkipped) else f"{type(err).__name__}: {err}"
            log.debug("figure %s skipped: %s", name, err)
    return figures, skipped


def write_study_images(study: optuna.Study, log_dir: str | Path) -> list[str]:
    """Write the figures as TensorBoard images (tags ``study/<name>``) and the results as text to ``log_dir`` (the
    run ``study``), and the HParams experiment summary of the runs in its parent folder (``trials/``, ``reruns/``:
    :func:`~lightning_dropout.tune.board.write_experiment`); returns the image tags."""
    from torch.utils.tensorboard import SummaryWriter

    write_experiment(Path(log_dir).parent, log_dir, metric_labels(study))
    figures, _ = study_figures(study)
    step = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for name, fig in figures.items():
            writer.add_figure(f"study/{name}", fig, global_step=step, close=True)
        writer.add_text("study/results", markdown_results(study), global_step=step)
    finally:
        writer.close()
    return [f"study/{n}" for n in figures]


def plan_summary(plan: DropoutPlan, sep: str = "; ") -> str:
    """A plan in a few words: ``"8 sites standard 0.10"`` when every site has the same variant and rate;
    otherwise each run of consecutive sites with the same variant and rate once, the runs joined by ``sep``
    (``"fc1, fc2 standard 0.21; head gaussian 0.10"``, and ``"blocks.0.mlp ... blocks.5.mlp (6 sites) standard
    0.10"`` for a run of more than three); ``"(no sites)"`` for an empty plan."""
    runs: list[tuple[str, list[str]]] = []  # (variant and rate, the consecutive sites that have it)
    for s in plan:
        setting = f"{s.variant} {s.p:.2f}"
        name = f"{s.target or '<root>'}{'' if s.where == 'output' else ':' + s.where}"
        if runs and runs[-1][0] == setting:
            runs[-1][1].append(name)
        else:
            runs.append((setting, [name]))
    if not runs:
        return "(no sites)"
    if len(runs) == 1 and len(runs[0][1]) > 1:
        return f"{len(runs[0][1])} sites {runs[0][0]}"
    return sep.join(
        f"{', '.join(names) if len(names) <= 3 else f'{names[0]} ... {names[-1]} ({len(names)} sites)'} {setting}"
        for setting, names in runs
    )


def _comparisons(study: optuna.Study) -> list[Comparison]:
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    reruns = rerun_candidates(study)
    return compare(reruns, maximize, winner_rule(study)) if reruns else []


def output_console(stderr: bool = False) -> Console:
    """A console for what a study prints (its results on stdout; its header, trial lines and progress on stderr):
    a terminal's own width; in a log or a pipe, where Rich would assume 80 columns and wrap the results
    table's sites one word per line, tables ``$COLUMNS`` or 120 wide and lines of text never cut (a path or a
    command stays one line to copy)."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(
            stderr=stderr, width=None if os.environ.get("COLUMNS") else _LOG_WIDTH, soft_wrap=True
        )
    return console


def comparison_rows(
    comparisons: list[Comparison],
    value: str,
    *,
    per_seed: bool = False,
    sites_sep: str = "; ",
    mark: Callable[[str], str] = lambda label: f"{label} (winner)",
) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the re-run comparison, one source for the Rich table (`tune`), the Markdown one
    (TensorBoard, MLflow) and the HTML report: each candidate's label (``mark`` on the winner), trial, mean and
    std of ``value`` over seeds (``-`` for NaN), its seeds (and whether the race dropped it), optionally each
    seed's value, the paired gains over no dropout and over the best uniform rate, and its sites.

    Example:
        >>> header, rows = comparison_rows([], "trial value (best)")
        >>> header[:3], rows
        (['plan', 'trial', 'mean trial value (best)'], [])
    """
    header = ["plan", "trial", f"mean {value}", "std", "seeds"]
    header += [f"{value} per seed"] if per_seed else []
    header += ["gain vs no dropout", "gain vs best uniform", "sites"]
    rows = []
    for row in comparisons:
        c = row.candidate
        seeds = str(len(c.values)) if c.dropped_after is None else f"{len(c.values)} (dropped)"
        cells = [mark(c.label) if row.winner else c.label, str(c.trial), _fmt(c.mean), _fmt(c.std), seeds]
        cells += [", ".join(_fmt(v) for v in c.values)] if per_seed else []
        cells += [
            Comparison.format(row.vs_none),
            Comparison.format(row.vs_uniform),
            plan_summary(c.plan, sites_sep),
        ]
        rows.append(cells)
    return header, rows


def markdown_results(study: optuna.Study) -> str:
    """The winner and the re-run comparison table, as Markdown (TensorBoard's text, MLflow's ``results.md``)."""
    try:
        head = f"Winner: **{winner(study)[1]}**\n\n"
    except ValueError:  # no completed trial yet
        head = ""
    header, rows = comparison_rows(
        _comparisons(study), _value_label(study), mark=lambda label: f"**{label}** (winner)"
    )
    if not rows:
        return head + "No re-runs over seeds yet."
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return head + "\n".join(lines)


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #666; font-size: 0.9em; }
"""


def write_report(study: optuna.Study, out: str | Path, storage: str = "") -> Path:
    """Write a self-contained HTML page (figures embedded as PNG) about ``study`` to ``out``."""
    metric = study_metric(study)
    base = metric_base_name(metric)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    parts = [
        f"<h1>Dropout study <code>{html.escape(study.study_name)}</code></h1>",
        f"<p>{html.escape(metric)} ({study.direction.name.lower()}); storage {html.escape(storage) or '-'}; "
        + ", ".join(f"{n} {c}" for n, c in counts.items() if c)
        + f". Written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.</p>",
    ]
    try:
        plan, label = winner(study)
        rows: list[list[Any]] = [
            [s.key, s.variant, f"{s.p:.3f}", ", ".join(f"{k}={v}" for k, v in s.params.items()) or "-"]
            for s in plan
        ]
        parts += [
            f"<h2>Best plan: {html.escape(label)}</h2>",
            _table(["site", "variant", "p", "parameters"], rows) if rows else "<p>(no dropout sites)</p>",
            f"<pre>{html.escape(plan.to_yaml())}</pre>",
        ]
    except Exception as err:  # no completed trial yet
        parts.append(f"<h2>Best plan</h2><p class='note'>{html.escape(str(err))}</p>")
    comparisons = _comparisons(study)
    parts.append(f"<h2>Best plans and baselines over seeds ({html.escape(metric)})</h2>")
    if comparisons:
        parts.append(_table(*comparison_rows(comparisons, _value_label(study), per_seed=True)))
        parts.append(
            "<p class='note'>gain: the mean paired difference over the same seeds ± the half-width of its 95 % "
            "interval; * marks a gain beyond the noise.</p>"
        )
    else:
        parts.append(
            "<p class='note'>No re-runs over seeds (study.seeds &lt; 2, or the study is still running).</p>"
        )
    figures, skipped = study_figures(study)
    parts.append("<h2>Figures</h2>")
    for name, fig in figures.items():
        parts.append(
            f"<h3>{html.escape(name.replace('_', ' '))}</h3><img alt='{name}' src='data:image/png;base64,{_png(fig)}'>"
        )
    for name, reason in skipped.items():
        parts.append(
            f"<p class='note'>{html.escape(name.replace('_', ' '))}: not drawn ({html.escape(reason)})</p>"
        )
    rows = []
    for t in trials:
        m = t.user_attrs.get(METRICS_ATTR) or {}
        epoch = m.get("best_epoch")
        rows.append(
            [
                t.number,
                t.state.name.lower(),
                str(t.user_attrs.get(BASELINE_ATTR, "")),
                _fmt(t.value),
                _fmt(m.get("best_value")),
                "-" if epoch is None or math.isnan(epoch) else int(epoch),
                _fmt(m.get(f"gap_at_best/{base}")),
                plan_summary(_plan(t) or DropoutPlan()),
                str(t.user_attrs.get(FAIL_ATTR, "")),
            ]
        )
    value = _value_label(study)
    header = ["#", "state", "baseline", f"{metric}: {value}", f"{metric} at the best epoch", "best epoch"]
    parts += [
        "<h2>Trials</h2>",
        f"<p class='note'>{html.escape(value)}: the value Optuna ranks the trials by and the re-runs compare "
        f"(<code>study.value</code>, computed from each epoch's {html.escape(metric)}); best epoch: the single "
        "best epoch of the same run.</p>",
        _table([*header, f"gap/{base} at the best epoch", "plan", "fail reason"], rows),
    ]
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(study.study_name)}: dropout study report</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
