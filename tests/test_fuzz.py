"""The config fuzzer in CI: :data:`fuzzing.CI_CASES` seeded mutations of ``configs/*.yaml``, each through
``describe`` and a one-epoch ``tune``; every run ends in exit 2 with one error line, or exit 0 after a real run
(``tests/fuzzing.py`` says what counts; ``python tests/fuzzing.py --deep`` is the 1,000-run mode)."""

from __future__ import annotations

from pathlib import Path

import fuzzing
import pytest
import yaml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore"),
]

_BASE = Path("/FUZZ-RUN")  # replaced by each case's own run directory
CASES = fuzzing.mutations(fuzzing.CI_CASES, fuzzing.CI_SEED, run_dir=_BASE, data_dir=Path("/FUZZ-DATA"))


@pytest.mark.parametrize(
    "index", range(len(CASES)), ids=[f"{i:03d}-{m.source}-{m.kind}" for i, m in enumerate(CASES)]
)
def test_a_mutated_config_fails_in_one_line_or_runs(index: int, tmp_path: Path, data_dir: Path) -> None:
    mutation = CASES[index]
    text = mutation.text.replace(str(_BASE), str(tmp_path / "runs")).replace("/FUZZ-DATA", str(data_dir))
    outcomes = fuzzing.run_mutation(
        fuzzing.Mutation(mutation.source, mutation.kind, mutation.where, text), tmp_path, limit=120
    )
    findings = [f"{o.command}: {o.finding}" for o in outcomes if o.finding]
    assert not findings, f"{mutation.kind} at {mutation.where}: {findings}\n{text[:2000]}"


def test_the_mutations_cover_every_config_and_kind() -> None:
    assert {m.source for m in CASES} == {p.stem for p in fuzzing.CONFIGS}
    kinds = {m.kind for m in CASES}
    missing = set(fuzzing.TREE_KINDS) - kinds
    assert not missing, missing
    assert {"alias", "merge", "alias-bomb", "repeated-key", "deep-nesting", "root"} <= kinds
    assert len({m.text for m in CASES}) > 0.9 * len(CASES)  # the seed gives distinct configs


def test_a_finding_is_reported(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself: a traceback, exit 0 from a study that trained nothing and a hang are findings."""
    import lightning_dropout.cli as cli

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"seed_everything": 1}))

    def boom(argv: list[str]) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "main", boom)
    assert "traceback" in (fuzzing.run_one("describe", config, tmp_path / "runs", 10).finding or "")
    monkeypatch.setattr(cli, "main", lambda argv: 0)
    assert "trained nothing" in (fuzzing.run_one("tune", config, tmp_path / "runs", 10).finding or "")

    def sleep(argv: list[str]) -> int:
        import time

        time.sleep(5)
        return 0

    monkeypatch.setattr(cli, "main", sleep)
    assert "hang" in (fuzzing.run_one("describe", config, tmp_path / "runs", 0.5).finding or "")
