"""What users see, through the real viewers: a `tensorboard` server started on a study's run directory (read
through the HTTP data API its dashboards draw from: the HParams table, the scalar tags, the study's images),
and the HTML report of `lightning-dropout report` opened in headless Chromium driven by Playwright.

The browser test needs a Chromium executable (the ``chromium`` fixture in ``conftest.py``: it skips locally
without one and fails under CI, whose ``.ci/run`` installs Debian's ``chromium``)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from studies import load, sqlite_url, tune, write_config

from lightning_dropout.cli import main
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.scalars import site_name
from lightning_dropout.tune.board import column_name, display_name

pytestmark = pytest.mark.usefixtures("one_thread")

GROUP = {
    "name": "hidden",
    "select": {"match": "Linear"},
    "variants": ["standard", "gaussian"],
    "p": [0.05, 0.5],
    "per_layer": True,
    "params": {"standard": {"scaling": ["inverted", "inference"]}},
}
SITES = ("linear1.output", "linear2.output")  # as logged: `<target>.<where>`
METRICS = ["hp/best_val_acc", "hp/best_epoch", "hp/value", "hp/gap_at_best/acc", "hp/gap_at_best/loss"]
FIGURES = ["optimization_history", "intermediate_values", "param_importances", "best_rates", "gap_vs_value"]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A baseline and 2 sampled trials, the best and the baseline re-run on 2 seeds: 7 TensorBoard runs."""
    tmp = tmp_path_factory.mktemp("viewers")
    config = write_config(
        tmp, dropout={"groups": [GROUP]}, study={"n_trials": 3, "seeds": 2, "top_k": 1, "gap_samples": 64}
    )
    assert tune(config, tmp, data_dir) == 0
    return tmp


def run_names(study_dir: Path) -> list[str]:
    """The TensorBoard run name of every trial and re-run (relative to the study's log dir): re-runs have their
    own folder."""
    root = study_dir / "runs" / "s"
    return sorted(f"{folder}/{p.name}" for folder in ("trials", "reruns") for p in (root / folder).iterdir())


def hparams(group: dict[str, Any]) -> dict[str, Any]:
    """A session group's values by column key (the dashboard's display names: `trial`, not `1 trial`)."""
    return {display_name(k): v for k, v in group["hparams"].items()}


def drawn_figures(study: optuna.Study) -> list[str]:
    """The figures the study allows: "best rates" only when the winner has dropout (else it would be empty)."""
    from lightning_dropout.tune.records import winner

    return [f for f in FIGURES if f != "best_rates" or len(winner(study)[0])]


def trial_plan(study: optuna.Study, number: int) -> DropoutPlan:
    return DropoutPlan.from_yaml(study.trials[number].user_attrs["plan"])


# ----------------------------------------------------------------------------------------------------------
# A real TensorBoard server on the study's log dir
# ----------------------------------------------------------------------------------------------------------
class TensorBoard:
    """A running `tensorboard` process and its HTTP data API (the requests its dashboards send)."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.process, self.log = url, process, log
        # a local server: never through an HTTP proxy configured in the environment
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str, **query: str) -> Any:
        return json.loads(self.raw(path + ("?" + urllib.parse.urlencode(query) if query else "")))

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return json.loads(self.raw(path, json.dumps(body).encode()))

    def raw(self, path: str, data: bytes | None = None) -> bytes:
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        with self._opener.open(request, timeout=30) as response:
            return bytes(response.read())

    def experiment(self) -> dict[str, Any]:
        # the HParams dashboard's request (tensorboard/plugins/hparams/api.proto, GetExperimentRequest)
        return dict(
            self.post("/data/plugin/hparams/experiment", {"experimentName": "", "hparamsLimit": 1000})
        )

    def session_groups(self, col_params: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        # ListSessionGroupsRequest as the dashboard sends it: every status, one page
        body = {
            "experimentName": "",
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": col_params or [],
            "startIndex": 0,
            "sliceSize": 1000,
        }
        return list(self.post("/data/plugin/hparams/session_groups", body).get("sessionGroups", []))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_tensorboard(logdir: Path, load_fast: str, log: Path) -> TensorBoard:
    """Start `tensorboard` on a free local port and wait until it serves every session of the study (runs
    appear before their events are read: the HParams records are the last events of each run)."""
    expected = len(run_names(logdir.parent.parent))
    for _attempt in range(3):  # a port found free may be taken before tensorboard binds it: try another
        port = _free_port()
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1"]
        command += ["--port", str(port), f"--load_fast={load_fast}", "--reload_interval=1"]
        with log.open("ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        board = TensorBoard(f"http://127.0.0.1:{port}", process, log)
        deadline = time.monotonic() + 90
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if len(board.session_groups()) >= expected:
                    return board
            except OSError:  # not listening yet (urllib's URLError and HTTP errors are OSErrors)
                pass
            time.sleep(0.2)
        if process.poll() is None:
            _stop(process)
            pytest.fail(f"tensorboard did not serve {expected} sessions within 90 s:\n{board.log_text()}")
    pytest.fail(f"tensorboard exited at start ({process.returncode}):\n{log.read_text(errors='replace')}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


@pytest.fixture(scope="module", params=["false", "true"], ids=["python-loader", "rust-loader"])
def board(
    request: pytest.FixtureRequest, study_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TensorBoard]:
    """A `tensorboard --logdir runs/s` server, with each of its two data loaders (`--load_fast=false`: the
    Python multiplexer; `true`: the Rust data server that `auto`, the default, picks where it runs)."""
    log = tmp_path_factory.mktemp("tensorboard") / "tensorboard.log"
    tb = _start_tensorboard(study_dir / "runs" / "s", request.param, log)
    try:
        yield tb
    finally:
        _stop(tb.process)


def _metric(session: dict[str, Any], tag: str) -> float:
    (value,) = [m.get("value") for m in session["metricValues"] if m["name"]["tag"] == tag]
    return float(value) if value is not None else float("nan")


# ----------------------------------------------------------------------------------------------------------
# HParams dashboard
# ----------------------------------------------------------------------------------------------------------
def test_hparams_columns_are_the_plan_the_trial_and_the_metrics(board):
    experiment = board.experiment()
    types = {h["displayName"]: h["type"] for h in experiment["hparamInfos"]}
    plan_columns = {f"dropout/{site}/{field}" for site in SITES for field in ("variant", "p", "scaling")}
    trial_columns = {"trial", "kind", "baseline", "seed", "state"}
    assert {name for name in types if not name.startswith("module/")} == plan_columns | trial_columns
    assert {"module/hidden", "module/lr"} <= set(types)  # the module's own hparams
    for site in SITES:
        assert types[f"dropout/{site}/p"] == "DATA_TYPE_FLOAT64"
        assert types[f"dropout/{site}/variant"] == types[f"dropout/{site}/scaling"] == "DATA_TYPE_STRING"
    assert types["trial"] == "DATA_TYPE_FLOAT64" and types["state"] == "DATA_TYPE_STRING"
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == METRICS
    labels = {m["name"]["tag"]: m.get("displayName", "") for m in experiment["metricInfos"]}
    assert labels["hp/value"] == "val_acc: trial value (best)"  # the two values of a trial, told apart
    assert labels["hp/best_val_acc"] == "val_acc at the best epoch"


def test_hparams_marks_what_varies_and_lists_trial_kind_state_then_the_sites_first(board):
    """The dashboard ticks the first five columns of the experiment, in the server's order (what differs first):
    the columns that vary are marked, and come as trial, kind, state, then the sites, then the rest."""
    experiment = board.experiment()
    groups = board.session_groups()
    seen: dict[str, set[str]] = {}
    for group in groups:
        for key, value in hparams(group).items():
            seen.setdefault(key, set()).add(json.dumps(value))
    infos = [(h["displayName"], bool(h.get("differs"))) for h in experiment["hparamInfos"]]
    assert {name: differs for name, differs in infos} == {k: len(v) > 1 for k, v in seen.items()}
    varying = [name for name, differs in infos if differs]
    assert [name for name, differs in infos[: len(varying)]] == varying  # what varies comes first
    first = [k for k in ("trial", "kind", "state") if k in varying]
    sites = [k for k in varying if k.startswith("dropout/")]
    assert varying == first + sorted(sites) + sorted(set(varying) - set(first) - set(sites))
    assert first[:2] == ["trial", "kind"] and sites  # this study: trials and re-runs, sampled sites
    assert {f"dropout/{site}/p" for site in SITES} <= set(sites)
    # the names carry the rank that orders them; the dashboard shows the display names
    names = {h["displayName"]: h["name"] for h in experiment["hparamInfos"]}
    assert names["trial"] == column_name("trial") and names["kind"] == column_name("kind")


def test_hparams_table_has_one_row_per_trial_and_rerun_with_the_stored_values(board, study_dir):
    study = load(study_dir)
    groups = board.session_groups()
    # one session per run, each its own group (the `trial`/`seed` columns differ), every run listed
    assert all(len(g["sessions"]) == 1 and g["sessions"][0]["name"] == g["name"] for g in groups)
    rows = {g["name"]: g for g in groups}
    reruns = study.user_attrs["reruns"]
    assert sorted(rows) == run_names(study_dir)
    assert len(rows) == len(study.trials) + sum(len(r["seeds"]) for r in reruns.values())
    for trial in study.trials:
        row = rows[f"trials/trial_{trial.number:04d}"]
        hp = hparams(row)
        assert hp["trial"] == trial.number and hp["kind"] == "trial" and hp["state"] == "complete"
        assert row["sessions"][0]["status"] == "STATUS_SUCCESS"
        assert _metric(row, "hp/value") == pytest.approx(trial.value)
        assert _metric(row, "hp/best_val_acc") == pytest.approx(trial.user_attrs["metrics"]["best_value"])
        assert _metric(row, "hp/gap_at_best/acc") == pytest.approx(
            trial.user_attrs["metrics"]["gap_at_best/acc"]
        )
        sites = {site_name(s.key): s for s in trial_plan(study, trial.number)}
        for key in SITES:
            site = sites.get(key)
            assert hp[f"dropout/{key}/variant"] == (site.variant if site else "none")
            assert hp[f"dropout/{key}/p"] == pytest.approx(site.p if site else 0.0)
    for number, info in reruns.items():
        for index, (seed, value) in enumerate(zip(info["seeds"], info["values"], strict=True)):
            row = rows[f"reruns/rerun_{int(number):04d}_seed{index}"]
            assert hparams(row)["kind"] == "rerun" and hparams(row)["trial"] == int(number)
            assert hparams(row)["seed"] == seed
            assert _metric(row, "hp/value") == pytest.approx(value)


def test_hparams_table_filtered_to_trials_and_sorted_by_value_starts_with_the_best(board, study_dir):
    study = load(study_dir)
    groups = board.session_groups(
        [
            {"hparam": column_name("kind"), "filterDiscrete": ["trial"]},
            {"metric": {"group": "", "tag": "hp/value"}, "order": "ORDER_DESC"},
        ]
    )
    assert sorted(g["name"] for g in groups) == [f"trials/trial_{t.number:04d}" for t in study.trials]
    values = [_metric(g, "hp/value") for g in groups]
    assert values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(study.best_value)
    best = [hparams(g)["trial"] for g in groups if _metric(g, "hp/value") == values[0]]
    assert study.best_trial.number in best


# ----------------------------------------------------------------------------------------------------------
# Scalars and images dashboards
# ----------------------------------------------------------------------------------------------------------
def test_scalar_tags_have_the_gap_and_each_sites_rate(board, study_dir):
    study = load(study_dir)
    tags = board.get("/data/plugin/scalars/tags")
    for name in run_names(study_dir):
        number = int(name.split("_")[1])
        run_tags = set(tags[name])
        assert {"val_acc", "gap/acc", "gap/loss", "train_clean/acc", "train_dropout/acc"} <= run_tags, name
        assert set(METRICS) <= run_tags, name
        rates = {t for t in run_tags if t.startswith("dropout/rate/")}
        assert rates == {f"dropout/rate/{site_name(s.key)}" for s in trial_plan(study, number)}, name
    sampled = [t.number for t in study.trials if "baseline" not in t.user_attrs]
    assert sampled and all(
        f"dropout/rate/{site}" in tags[f"trials/trial_{n:04d}"] for n in sampled for site in SITES
    )


def test_custom_scalars_overlay_val_train_clean_and_train_dropout_per_metric(board, study_dir):
    """The Custom Scalars dashboard (its layout request, merged over the runs): one chart per metric with the
    validation, clean-training and dropout-on training tags; the per-site rate charts beside it."""
    import re

    layout = board.get("/data/plugin/custom_scalars/layout")
    charts = {c["title"]: c["multiline"]["tag"] for cat in layout["category"] for c in cat["chart"]}
    assert {cat["title"] for cat in layout["category"]} == {"dropout", "val vs train"}
    tags = board.get("/data/plugin/scalars/tags")["trials/trial_0001"]
    for base in ("acc", "loss"):
        regexes = charts[f"{base}: val, train_clean, train_dropout"]
        drawn = {t for t in tags if any(re.fullmatch(rx, t) for rx in regexes)}
        assert drawn == {f"val_{base}", f"train_clean/{base}", f"train_dropout/{base}"}, base
    # the timing is not a gap; no logged key holds the plan key's `:` (MLflow refuses it)
    assert "timing/gap_seconds" in tags and not [t for t in tags if t.startswith("gap/") and "second" in t]
    assert not [t for t in tags if ":" in t]


def test_study_figures_are_images_tensorboard_serves_as_png(board, study_dir):
    tags = board.get("/data/plugin/images/tags")
    figures = drawn_figures(load(study_dir))
    assert set(tags["study"]) == {f"study/{name}" for name in figures}
    for name in figures:
        (entry,) = board.get("/data/plugin/images/images", run="study", tag=f"study/{name}", sample="0")
        png = board.raw(f"/data/plugin/images/individualImage?{entry['query']}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000, name


def test_each_study_figure_has_one_title(study_dir, tmp_path):
    """The figures of TensorBoard's IMAGES and of the report: one title each (Optuna's plots bring their own)."""
    from lightning_dropout.tune.report import study_figures, write_report

    study = load(study_dir)
    figures, skipped = study_figures(study)
    assert list(figures) == drawn_figures(study)
    assert set(skipped) == set(FIGURES) - set(figures)
    if skipped:  # no dropout won: no empty "best rates" figure, and the reason instead
        assert "has no dropout site: no rate to draw" in skipped["best_rates"]
    page = write_report(study, tmp_path / "report.html").read_text()
    assert page.count("<img ") == len(figures)
    assert ("best rates: not drawn (the winner" in page) == bool(skipped)
    for name, fig in figures.items():
        titles = [ax.get_title(loc) for ax in fig.axes for loc in ("left", "center", "right")]
        titles.append(fig._suptitle.get_text() if fig._suptitle is not None else "")
        assert len([t for t in titles if t]) == 1, (name, titles)


# ----------------------------------------------------------------------------------------------------------
# The HTML report in a browser
# ----------------------------------------------------------------------------------------------------------
# Each <img> as the browser decoded it. A truncated PNG still reports `complete` and its size (from its
# header) but leaves the rows it lacks transparent: matplotlib's figures are opaque, so every pixel must be.
IMAGES_JS = """
Array.from(document.images).map(img => {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  let transparent = -1;
  if (img.naturalWidth > 0 && img.naturalHeight > 0) {
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    transparent = 0;
    for (let k = 3; k < pixels.length; k += 4) if (pixels[k] < 255) transparent++;
  }
  return {alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
          shown: img.getBoundingClientRect().width, transparent: transparent};
})
"""


def test_report_shows_every_figure_in_chromium_without_console_errors(chromium, study_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    out = tmp_path / "report.html"
    assert main(["report", "s", "--storage", sqlite_url(study_dir), "--out", str(out)]) == 0
    embedded = out.read_text().count("<img ")
    study = load(study_dir)
    problems: list[str] = []

    def console(kind: str, text: str) -> None:
        if kind in ("error", "warning"):
            problems.append(f"console.{kind}: {text}")

    with sync_playwright() as pw:
        # Playwright passes --no-sandbox itself (chromium_sandbox=False, needed as root in containers);
        # a small /dev/shm (Docker's 64 MB) would crash the renderer
        browser = pw.chromium.launch(
            executable_path=chromium, chromium_sandbox=False, args=["--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: console(m.type, m.text))
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:80]}"))
            page.goto(out.as_uri(), wait_until="load")
            images = page.evaluate(IMAGES_JS)
            trial_rows = page.locator("table").last.locator("tbody tr").count()
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            title = page.title()
        finally:
            browser.close()
    assert problems == []
    # every figure the report embeds is decoded and laid out (a broken data: URL still reports complete)
    assert [i["alt"] for i in images] == drawn_figures(study) and len(images) == embedded
    for image in images:
        assert image["complete"] and image["width"] > 100 and image["height"] > 100, image
        assert image["transparent"] == 0, image  # decoded whole
        assert 0 < image["shown"] <= 1280, image
    assert trial_rows == len(study.trials)
    assert overflow <= 0  # nothing wider than the window: no sideways scrolling
    assert title.startswith("s:")
