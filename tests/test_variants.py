"""Conformance suite every registered dropout variant must pass, plus per-variant semantics.

The shared tests are parametrized over the registry (:data:`VARIANTS`); a variant registered without an
entry in :data:`CASES` fails ``test_every_variant_has_a_case`` and every conformance test.

Statistical tests draw from a fixed seed and size their inputs so that the tolerance is about 5 standard
deviations of the statistic (the sigma used is written next to each tolerance).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.variants import (
    VARIANTS,
    AlphaDropout,
    ConcreteDropout,
    DropBlock,
    DropoutVariant,
    DropPath,
    FeatureAlphaDropout,
    GaussianDropout,
    SpatialDropout,
    VariationalDropout,
    WeightDropout,
    alpha_dropout,
    attention_dropout,
    build_variant,
    concrete_dropout,
    drop_block,
    drop_path,
    dropout,
    feature_alpha_dropout,
    gaussian_dropout,
    get_variant,
    register_variant,
    seed_rate,
    spatial_dropout,
    variant_names,
    variational_dropout,
    weight_dropout,
)
from lightning_dropout.variants import Dropout as StandardDropout

P = 0.2
SMALL = 4  # batch size of the shape / identity / compile checks

# --------------------------------------------------------------------------------------------------------
# The case table: variant name -> [(constructor kwargs, input factory)]. A factory takes the batch size and
# returns an input of that batch. Inputs are positive (so that ``train / eval`` is a ratio of masks), except
# for the self-normalizing variants, which get N(0, 1) input.
# --------------------------------------------------------------------------------------------------------

Factory = Callable[[int], Tensor]
Case = tuple[dict[str, Any], Factory]


def _pos(*shape: int) -> Tensor:
    return torch.rand(*shape) + 0.5


def _attention_probs(b: int) -> Tensor:
    return torch.softmax(torch.randn(b, 2, 8, 8), dim=-1)


CASES: dict[str, list[Case]] = {
    "standard": [({}, lambda b: _pos(b, 64)), ({"scaling": "inference"}, lambda b: _pos(b, 64))],
    "attention": [({}, _attention_probs)],
    "alpha": [({}, lambda b: torch.randn(b, 64))],
    "feature_alpha": [({}, lambda b: torch.randn(b, 16, 8)), ({}, lambda b: torch.randn(b, 16, 2, 4))],
    "concrete": [({}, lambda b: _pos(b, 64))],
    "dropblock": [
        ({"block_size": 3}, lambda b: _pos(b, 8, 16)),
        ({"block_size": 3}, lambda b: _pos(b, 8, 16, 16)),
        # one mask per sample with share_channels: 8x more samples (and fewer channels) for the statistics
        ({"block_size": 4, "share_channels": True}, lambda b: _pos(8 * b, 2, 12, 16)),
    ],
    "droppath": [({}, lambda b: _pos(b, 3, 4)), ({"scale_by_keep": True}, lambda b: _pos(b, 8))],
    "gaussian": [({}, lambda b: _pos(b, 64))],
    "spatial": [
        ({}, lambda b: _pos(b, 8, 6)),
        ({}, lambda b: _pos(b, 8, 3, 4)),
        ({}, lambda b: _pos(b, 8, 2, 2, 3)),
    ],
    "variational": [
        ({"batch_first": True}, lambda b: _pos(b, 7, 16)),
        ({"batch_first": False}, lambda b: _pos(7, b, 16)),
    ],
    "weight": [({}, lambda b: _pos(b, 32))],
}

# Batch size for the statistical checks: >= 1e5 independent mask units per case (droppath: one per sample;
# spatial / feature_alpha: one per (sample, channel); variational: one per (sequence, feature); dropblock:
# >= 8192 maps). Measured over 12 seeds, every tolerance below is >= 6 sd of its statistic.
STATS_BATCH: dict[str, int] = {
    "standard": 4096,
    "attention": 2048,
    "alpha": 16384,
    "feature_alpha": 16384,
    "concrete": 4096,
    "dropblock": 1024,
    "droppath": 200_000,
    "gaussian": 16384,
    "spatial": 12_500,
    "variational": 8192,
    "weight": 8192,
}

# |mean(train / eval) - 1| tolerance. Inverted Bernoulli masks have a per-unit ratio sd of
# sqrt(p / (1 - p)) = 0.5 at p = 0.2, so 1e5 units give sigma = 0.0016; dropblock's per-map sd is larger
# (correlated blocks). concrete's relaxed mask has E[z] = 0.2024 != p at t = 0.1, so only ~5% holds.
EXPECTATION_TOL: dict[str, float] = {"concrete": 0.05, "dropblock": 0.015}
DEFAULT_EXPECTATION_TOL = 0.01
SELF_NORMALIZING = {"alpha", "feature_alpha"}
DROP_FRACTION_TOL = 0.02  # product claim: measured drop fraction within +-0.02 of p (p = 0.2)

# Functional twins: name -> f(x, module, training, generator) calling the functional with the module's params.
FUNCTIONALS: dict[str, Callable[[Any, Any, bool, torch.Generator | None], Any]] = {
    "standard": lambda x, m, t, g: dropout(x, m.p, t, m.scaling, generator=g),
    "attention": lambda x, m, t, g: attention_dropout(x, m.p, t, generator=g),
    "alpha": lambda x, m, t, g: alpha_dropout(x, m.p, t, generator=g),
    "feature_alpha": lambda x, m, t, g: feature_alpha_dropout(x, m.p, t, generator=g),
    "concrete": lambda x, m, t, g: concrete_dropout(x, m.p_logit, m.temperature, t, generator=g),
    "dropblock": lambda x, m, t, g: drop_block(x, m.p, m.block_size, t, m.share_channels, generator=g),
    "droppath": lambda x, m, t, g: drop_path(x, m.p, t, m.scale_by_keep, generator=g),
    "gaussian": lambda x, m, t, g: gaussian_dropout(x, m.p, t, generator=g),
    "spatial": lambda x, m, t, g: spatial_dropout(x, m.p, t, generator=g),
    "variational": lambda x, m, t, g: variational_dropout(x, m.p, t, m.batch_first, generator=g),
    "weight": lambda x, m, t, g: weight_dropout(x, m.p, t, generator=g),
}

ALL = sorted(VARIANTS)

# (label, p, measured drop fraction), printed as a table when the module finishes.
MEASURED: list[tuple[str, float, float]] = []


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module", autouse=True)
def _drop_fraction_table(request: pytest.FixtureRequest):
    yield
    if not MEASURED:
        return
    lines = [
        "",
        "measured drop fractions (track=True, one training forward)",
        f"{'case':<44} {'p':>5} {'measured':>9} {'|diff|':>7}",
    ]
    lines += [f"{label:<44} {p:>5.2f} {frac:>9.4f} {abs(frac - p):>7.4f}" for label, p, frac in MEASURED]
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n".join(lines))


def _cases(name: str) -> list[Case]:
    assert name in CASES, f"variant {name!r} is registered but has no entry in CASES"
    return CASES[name]


def _build(name: str, kwargs: dict[str, Any], p: float = P) -> DropoutVariant:
    return build_variant(name, p, **kwargs)


def _eval_expected(kwargs: dict[str, Any], p: float, x: Tensor) -> Tensor:
    return x * (1.0 - p) if kwargs.get("scaling") == "inference" else x


def _values(y: Tensor) -> list[float]:
    """The distinct values of ``y``, rounded to 4 decimals (to compare with the expected mask values)."""
    return sorted({round(v, 4) for v in y.unique().tolist()})


def _record_fraction(record_property, label: str, p: float, frac: float) -> None:
    record_property(f"drop_fraction[{label}]", round(frac, 5))
    MEASURED.append((label, p, frac))


# ======================================================================================================
# Registry
# ======================================================================================================


def test_every_variant_has_a_case() -> None:
    assert set(CASES) == set(VARIANTS)
    assert set(STATS_BATCH) == set(VARIANTS)
    assert set(FUNCTIONALS) == set(VARIANTS), "every variant needs its functional twin in FUNCTIONALS"


def test_registry_names_and_classes() -> None:
    assert variant_names() == sorted(VARIANTS)
    for name, cls in VARIANTS.items():
        assert issubclass(cls, DropoutVariant)
        assert cls.variant_name == name
        assert get_variant(name) is cls
        assert isinstance(cls.drops_units, bool) and isinstance(cls.schedulable, bool)
    assert not GaussianDropout.drops_units
    assert not ConcreteDropout.schedulable


def test_unknown_variant_lists_names_and_suggests_closest() -> None:
    with pytest.raises(DropoutConfigError, match="Did you mean 'standard'") as info:
        get_variant("standrd")
    for name in VARIANTS:
        assert repr(name) in str(info.value)
    with pytest.raises(DropoutConfigError, match="must be one of"):
        build_variant("no-such-variant", 0.1)
    with pytest.raises(DropoutConfigError, match="must be one of"):
        get_variant(["standard"])  # unhashable


def test_unknown_param_names_the_allowed_ones() -> None:
    with pytest.raises(DropoutConfigError, match="block_sise") as info:
        build_variant("dropblock", 0.1, block_sise=3)
    assert "'block_size'" in str(info.value) and "'share_channels'" in str(info.value)
    with pytest.raises(DropoutConfigError, match=r"\(none\)"):
        build_variant("gaussian", 0.1, block_size=3)


def test_duplicate_registration_is_refused() -> None:
    saved = dict(VARIANTS)
    try:
        with pytest.raises(DropoutConfigError, match="unique"):

            @register_variant("standard")
            class Other(DropoutVariant):  # pragma: no cover - never used
                pass

        assert VARIANTS["standard"] is saved["standard"]
        # re-registering the same class under its own name is allowed (module reloads)
        assert register_variant("standard")(saved["standard"]) is saved["standard"]
    finally:
        VARIANTS.clear()
        VARIANTS.update(saved)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), True, 1.5, "0.1", None], ids=repr)
@pytest.mark.parametrize("name", ALL)
def test_bad_rate_is_refused(name: str, bad: object) -> None:
    kwargs = _cases(name)[0][0]
    with pytest.raises(DropoutConfigError, match="0 <= p < 1"):
        build_variant(name, bad, **kwargs)  # type: ignore[arg-type]


# ======================================================================================================
# Shared conformance suite
# ======================================================================================================


@pytest.mark.parametrize("name", ALL)
def test_shape_dtype_kept_and_input_accepted(name: str) -> None:
    for kwargs, make in _cases(name):
        module = _build(name, kwargs)
        assert module.training
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x = make(SMALL).to(dtype)
            assert module.check_input(x.shape) is None
            y = module(x)
            assert y.shape == x.shape and y.dtype == dtype, (kwargs, dtype)


@pytest.mark.parametrize("name", ALL)
def test_eval_is_identity_or_inference_rule(name: str) -> None:
    for kwargs, make in _cases(name):
        module = _build(name, kwargs).eval()
        x = make(SMALL)
        torch.testing.assert_close(module(x), _eval_expected(kwargs, P, x), rtol=0, atol=0)


def test_standard_inference_scaling_eval_rule() -> None:
    x = _pos(8, 16)
    module = StandardDropout(0.3, scaling="inference").eval()
    torch.testing.assert_close(module(x), x * 0.7)
    torch.testing.assert_close(dropout(x, 0.3, training=False, scaling="inference"), x * 0.7)


@pytest.mark.parametrize("name", ALL)
def test_p_zero_is_identity_in_training(name: str) -> None:
    for kwargs, make in _cases(name):
        if name == "concrete":
            with pytest.raises(DropoutConfigError, match="0 < p < 1"):
                _build(name, kwargs, p=0.0)
            return
        module = _build(name, kwargs, p=0.0).train()
        x = make(SMALL)
        assert torch.equal(module(x), x)


@pytest.mark.parametrize("name", ALL)
def test_expectation_preserved(name: str) -> None:
    """E[train output] equals the eval output (inverted: the input); alpha variants keep mean 0, std 1."""
    for i, (kwargs, make) in enumerate(_cases(name)):
        torch.manual_seed(1000 + i)
        module = _build(name, kwargs)
        x = make(STATS_BATCH[name])
        with torch.no_grad():
            y = module(x)
        assert not torch.equal(y, x), "training mode must be stochastic"
        if name in SELF_NORMALIZING:
            # 1e6 N(0,1) values; channel masks make ~1e5 independent units: sigma(mean) ~ 0.002.
            assert abs(float(y.mean())) < 0.01, float(y.mean())
            assert abs(float(y.std()) - 1.0) < 0.01, float(y.std())
            continue
        ratio = float((y / _eval_expected(kwargs, P, x)).mean())
        tol = EXPECTATION_TOL.get(name, DEFAULT_EXPECTATION_TOL)
        assert abs(ratio - 1.0) < tol, (kwargs, ratio)


@pytest.mark.parametrize("name", ALL)
def test_measured_drop_fraction(name: str, record_property) -> None:
    cls = VARIANTS[name]
    for i, (kwargs, make) in enumerate(_cases(name)):
        torch.manual_seed(2000 + i)
        module = _build(name, kwargs)
        assert module.drop_fraction is None
        x = make(STATS_BATCH[name])
        with torch.no_grad():
            module(x)
        assert module.drop_fraction is None, "tracking is off by default"
        module.track = True
        with torch.no_grad():
            module(x)
        if not cls.drops_units:
            assert module.drop_fraction is None
            continue
        frac = float(module.drop_fraction)
        _record_fraction(record_property, f"{name}#{i} {kwargs or ''} {tuple(x.shape)}", P, frac)
        assert abs(frac - P) <= DROP_FRACTION_TOL, (kwargs, frac)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name: str) -> None:
    for kwargs, make in _cases(name):
        module = _build(name, kwargs)
        if name == "concrete":
            with torch.no_grad():
                module.p_logit.fill_(-0.4)
        # p is a hyperparameter (not state) except for concrete, whose learned rate must survive
        fresh = _build(name, kwargs, p=0.1 if name == "concrete" else P)
        fresh.load_state_dict(module.state_dict(), strict=True)
        assert fresh.state_dict().keys() == module.state_dict().keys()
        if name == "concrete":
            assert fresh.p == module.p == pytest.approx(1 / (1 + math.exp(0.4)))
        module.eval()
        fresh.eval()
        x = make(SMALL)
        assert torch.equal(fresh(x), module(x))


@pytest.mark.parametrize("name", ALL)
def test_params_extra_repr_and_rebuild(name: str) -> None:
    for kwargs, _ in _cases(name):
        module = _build(name, kwargs)
        params = module.params()
        assert list(params) == VARIANTS[name].param_names()
        for key, value in kwargs.items():
            assert params[key] == value
        text = module.extra_repr()
        assert "p=0.2" in text
        assert "p=" in repr(module)
        rebuilt = build_variant(name, module.p, **params)
        assert rebuilt.extra_repr() == text


@pytest.mark.parametrize("name", ALL)
def test_set_rate(name: str) -> None:
    module = _build(name, _cases(name)[0][0])
    if not module.schedulable:
        with pytest.raises(DropoutConfigError, match="cannot be scheduled"):
            module.set_rate(0.3)
        assert module.p == pytest.approx(P)
        return
    module.set_rate(0.3)
    assert module.p == 0.3
    for bad in (1.0, -0.1, float("nan"), True):
        with pytest.raises(DropoutConfigError, match="0 <= p < 1"):
            module.set_rate(bad)
    assert module.p == 0.3


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("name", ALL)
def test_torch_compile(name: str) -> None:
    """Train and eval under ``torch.compile``; the compiled module also follows ``set_rate`` (schedules).

    The aot_eager backend replays eager's RNG calls in order, so under the same seed the compiled training
    output equals the eager one bit for bit (inductor would not: pytorch#118735). One input shape throughout:
    a changing batch size is ``test_torch_compile_batch_size_change``.
    """
    for i, (kwargs, make) in enumerate(_cases(name)):
        if i > 0 and "scaling" not in kwargs:  # one compile per distinct eval rule keeps this fast
            continue
        torch._dynamo.reset()
        module = _build(name, kwargs, p=0.1)
        compiled = torch.compile(module, backend="aot_eager")
        x = make(64)
        # a rate baked into the graph would make the compiled output differ from eager after set_rate
        for p in (0.1, 0.5) if module.schedulable else (module.p,):
            if module.schedulable:
                module.set_rate(p)
            torch.manual_seed(5)
            y = compiled(x)
            torch.manual_seed(5)
            assert y.shape == x.shape
            assert torch.equal(y, module(x)), p
        module.eval()
        torch.testing.assert_close(compiled(x), _eval_expected(kwargs, module.p, x), rtol=0, atol=0)
    torch._dynamo.reset()


# Variants whose default training path is torch's own fused op (F.dropout / F.alpha_dropout); all other
# paths draw their noise through torch.rand / torch.randn(..., generator=None).
_FUSED_DEFAULT = {"alpha", "attention", "standard", "weight"}

# Regression: under torch.compile a changed input shape (a smaller last batch, another sequence length) makes
# dynamo retrace with a symbolic batch size; torch.rand / torch.randn(shape, ..., generator=None) then raised
# "SymIntArrayRef expected to contain only concrete integers" (the ``.generator`` overload takes no SymInts).
# The variants now pass ``generator`` only when one is set.


class CompileFailedError(AssertionError):
    """A dynamo error re-raised with a short traceback (dynamo's own takes pytest seconds to format)."""


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize(
    ("name", "track"),
    [(n, False) for n in ALL] + [(n, True) for n in sorted(_FUSED_DEFAULT)],  # track: the non-fused path
    ids=lambda v: {False: "default", True: "track"}.get(v, v) if isinstance(v, bool) else v,
)
def test_torch_compile_batch_size_change(name: str, track: bool, request: pytest.FixtureRequest) -> None:
    kwargs, make = _cases(name)[0]
    torch._dynamo.reset()
    module = _build(name, kwargs)
    module.track = track
    compiled = torch.compile(module, backend="aot_eager")
    error = None
    try:
        for batch in (4, 8, 16):
            x = make(batch)
            assert compiled(x).shape == x.shape
    except torch._dynamo.exc.TorchRuntimeError as err:
        error = str(err).splitlines()[0][:300]
    finally:
        torch._dynamo.reset()
    if error is not None:
        raise CompileFailedError(error)


_CHECK_SHAPES = [(), (5,), (4, 3), (1, 2, 3, 4, 5, 6)]


@pytest.mark.parametrize(
    "name",
    [n for n in ALL],
)
def test_forward_enforces_check_input(name: str) -> None:
    """Every shape ``check_input`` refuses makes a training forward raise DropoutConfigError naming it."""
    kwargs = _cases(name)[0][0]
    module = _build(name, kwargs)
    for shape in _CHECK_SHAPES:
        if module.check_input(torch.Size(shape)) is None:
            continue
        with pytest.raises(DropoutConfigError, match=re.escape(f"got shape {shape}")):
            module(torch.ones(shape))


@pytest.mark.parametrize("name", ALL)
def test_functional_twin_agrees(name: str) -> None:
    assert name in FUNCTIONALS, f"variant {name!r} is registered but has no functional twin in FUNCTIONALS"
    fn = FUNCTIONALS[name]
    for kwargs, make in _cases(name):
        module = _build(name, kwargs)
        x = make(64)
        module.generator = torch.Generator().manual_seed(123)
        y_module = module(x)
        y_fn = fn(x, module, True, torch.Generator().manual_seed(123))
        assert torch.equal(y_module, y_fn), kwargs
        assert not torch.equal(y_module, _eval_expected(kwargs, P, x))
        # same generator seed -> same mask, whatever the global RNG does in between
        torch.rand(10)
        module.generator = torch.Generator().manual_seed(123)
        assert torch.equal(module(x), y_module)
        # the functional's eval rule matches the module's
        module.eval()
        assert torch.equal(fn(x, module, False, None), module(x))


@pytest.mark.parametrize("name", [n for n in ALL if n != "concrete"])  # concrete takes a logit, any real
@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "0.5", True])
def test_functional_twin_refuses_the_rates_the_module_refuses(name: str, bad: Any) -> None:
    """``dropout(x, 1.0)`` was NaN and ``gaussian_dropout(x, 1.0)`` divided by zero: a twin checks ``p`` as its
    module does, in training and in eval, with or without a generator, in the module's words."""
    kwargs, make = _cases(name)[0]
    module = _build(name, kwargs)
    x = make(SMALL)
    with pytest.raises(DropoutConfigError) as from_module:
        _build(name, kwargs, p=bad)
    for training, generator in ((True, None), (True, torch.Generator().manual_seed(0)), (False, None)):
        module.p = bad
        with pytest.raises(DropoutConfigError) as from_twin:
            FUNCTIONALS[name](x, module, training, generator)
        assert str(from_twin.value) == str(from_module.value)


@pytest.mark.parametrize("name", ALL)
def test_functional_twin_draws_what_the_module_draws(name: str) -> None:
    """Twin and module run one kernel: from the same seed they give the same output bit for bit and leave the
    RNG in the same state (the same draws in the same order), on the global RNG and on a generator; tracking
    the drop fraction does not change what a generator draws."""
    assert name in FUNCTIONALS, f"variant {name!r} is registered but has no functional twin in FUNCTIONALS"
    fn = FUNCTIONALS[name]
    for kwargs, make in _cases(name):
        module = _build(name, kwargs)
        x = make(SMALL)
        # global RNG, untracked (the fused torch op where the variant has one)
        torch.manual_seed(9)
        y_module, after_module = module(x), torch.rand(4)
        torch.manual_seed(9)
        y_fn, after_fn = fn(x, module, True, None), torch.rand(4)
        assert torch.equal(y_module, y_fn), kwargs
        assert torch.equal(after_module, after_fn), (kwargs, "the twin draws a different amount of noise")
        # a generator, untracked and tracked
        for track in (False, True):
            module.track = track
            module.generator = torch.Generator().manual_seed(9)
            y_module = module(x)
            gen = torch.Generator().manual_seed(9)
            y_fn = fn(x, module, True, gen)
            assert torch.equal(y_module, y_fn), (kwargs, track)
            assert torch.equal(module.generator.get_state(), gen.get_state()), (kwargs, track)
            assert (module.drop_fraction is not None) == (track and module.drops_units), (kwargs, track)
            module.drop_fraction = None


# ======================================================================================================
# standard / attention
# ======================================================================================================


@pytest.mark.parametrize("path", ["fused", "tracked", "generator"])
def test_standard_inverted_values(path: str) -> None:
    module = StandardDropout(P)
    module.track = path == "tracked"
    if path == "generator":
        module.generator = torch.Generator().manual_seed(0)
    y = module(torch.ones(10_000))
    assert _values(y) == [0.0, 1.25]


def test_standard_inference_scaling_trains_with_zero_one_and_matches_eval() -> None:
    module = StandardDropout(P, scaling="inference")
    x = _pos(4096, 64)
    y = module(x)
    assert set(torch.unique(y / x).tolist()) == {0.0, 1.0}
    # E[train] = (1 - p) x = eval; keep-rate sd 0.4 / sqrt(262144) = 0.0008
    module.eval()
    assert float((y / module(x)).mean()) == pytest.approx(1.0, abs=0.005)
    torch.testing.assert_close(module(x), 0.8 * x)


def test_standard_rejects_unknown_scaling() -> None:
    with pytest.raises(DropoutConfigError, match="'inverted', 'inference'"):
        build_variant("standard", 0.1, scaling="classic")
    with pytest.raises(DropoutConfigError, match="'inverted', 'inference'"):
        dropout(torch.ones(3), 0.1, scaling="classic")


def test_attention_rows_no_longer_sum_to_one_in_training() -> None:
    probs = _attention_probs(8)
    module = build_variant("attention", 0.3)
    y = module(probs)
    assert _values(y / probs) == [0.0, round(1 / 0.7, 4)]
    assert not torch.allclose(y.sum(-1), torch.ones(8, 2, 8))
    assert torch.allclose(module.eval()(probs).sum(-1), torch.ones(8, 2, 8))


# ======================================================================================================
# spatial
# ======================================================================================================


@pytest.mark.parametrize("spatial", [(7,), (3, 5), (2, 3, 4)], ids=["1d", "2d", "3d"])
def test_spatial_drops_whole_channels(spatial: tuple[int, ...]) -> None:
    module = SpatialDropout(0.5)
    module.track = True
    y = module(torch.ones(16, 32, *spatial)).flatten(2)
    dropped = (y == 0).all(-1)
    kept = (y == 2.0).all(-1)
    assert bool((dropped | kept).all())
    assert dropped.any() and kept.any()
    assert float(module.drop_fraction) == pytest.approx(float(dropped.float().mean()))


@pytest.mark.parametrize("shape", [(4, 3), (5,), (1, 2, 3, 4, 5, 6)])
def test_spatial_refuses_non_feature_maps(shape: tuple[int, ...]) -> None:
    module = SpatialDropout(0.2)
    assert module.check_input(torch.Size(shape)) is not None
    with pytest.raises(DropoutConfigError, match=r"'spatial'.*got shape " + re.escape(str(shape))):
        module(torch.ones(shape))


def test_spatial_2d_input_error_mentions_the_shape() -> None:
    with pytest.raises(DropoutConfigError, match=r"\(N, C, L\).*got shape \(4, 3\)"):
        SpatialDropout(0.2)(torch.ones(4, 3))


# ======================================================================================================
# variational
# ======================================================================================================


def test_variational_batch_first_same_mask_every_step() -> None:
    module = VariationalDropout(0.5, batch_first=True)
    y = module(torch.ones(64, 9, 16))  # (B, T, H)
    assert torch.equal(y, y[:, :1].expand_as(y))
    masks = y[:, 0]  # (B, H)
    assert len({tuple(row.tolist()) for row in masks}) == 64, "each sample needs its own mask"


def test_variational_time_major_same_mask_every_step() -> None:
    module = VariationalDropout(0.5, batch_first=False)
    y = module(torch.ones(9, 64, 16))  # (T, B, H)
    assert torch.equal(y, y[:1].expand_as(y))
    masks = y[0]  # (B, H)
    assert len({tuple(row.tolist()) for row in masks}) == 64, "each sample needs its own mask"


def test_variational_refuses_2d_input() -> None:
    # after a Linear a 2-D tensor is a batch of vectors, not a sequence: one mask for the batch would be wrong
    with pytest.raises(
        DropoutConfigError, match=r"needs a sequence \(B, T, \*\) or \(T, B, \*\), but got shape \(9, 32\)"
    ):
        VariationalDropout(0.5)(torch.ones(9, 32))


@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_variational_packed_sequence_one_mask_per_sequence(enforce_sorted: bool) -> None:
    lengths = torch.tensor([8, 6, 5, 3, 1, 8])
    if enforce_sorted:
        lengths = lengths.sort(descending=True).values
    padded = torch.ones(6, 8, 32)
    packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    module = VariationalDropout(0.5, batch_first=True)
    module.track = True
    module.generator = torch.Generator().manual_seed(7)
    out = module(packed)
    assert isinstance(out, PackedSequence)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    assert float(module.drop_fraction) == pytest.approx(0.5, abs=0.2)
    unpacked, out_lengths = pad_packed_sequence(out, batch_first=True, total_length=8)
    assert torch.equal(out_lengths, lengths)
    for i, n in enumerate(lengths.tolist()):
        seq = unpacked[i, :n]
        assert torch.equal(seq, seq[:1].expand_as(seq)), f"sequence {i} changes mask over time"
        assert set(seq.unique().tolist()) <= {0.0, 2.0}
    masks = {tuple(unpacked[i, 0].tolist()) for i in range(6)}
    assert len(masks) == 6, "each sequence needs its own mask"
    # functional twin on the packed input, same generator seed
    again = variational_dropout(packed, 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again.data, out.data)
    # eval is the identity
    assert module.eval()(packed) is packed


# ======================================================================================================
# weight
# ======================================================================================================


@pytest.mark.parametrize("path", ["fused", "tracked", "generator"])
def test_weight_dropout_gradient_reaches_the_weight(path: str) -> None:
    weight = torch.randn(16, 8, requires_grad=True)
    module = WeightDropout(0.5)
    module.track = path == "tracked"
    if path == "generator":
        module.generator = torch.Generator().manual_seed(0)
    dropped = module(weight)
    dropped.sum().backward()
    assert weight.grad is not None
    kept = dropped != 0
    assert set(weight.grad.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(weight.grad == 2.0, kept)
    torch.testing.assert_close(dropped[kept], 2 * weight.detach()[kept])


def test_weight_dropout_eval_returns_the_same_tensor() -> None:
    weight = torch.nn.Parameter(torch.randn(4, 4))
    assert WeightDropout(0.5).eval()(weight) is weight
    assert weight_dropout(weight, 0.5, training=False) is weight


# ======================================================================================================
# gaussian
# ======================================================================================================


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_gaussian_variance(p: float) -> None:
    module = GaussianDropout(p)
    module.track = True
    y = module(torch.ones(1_000_000))
    # sd(sample var) = var * sqrt(2 / n) = 0.0014 var; sd(mean) = sqrt(var / n) <= 0.001
    assert float(y.var()) == pytest.approx(p / (1 - p), rel=0.01)
    assert float(y.mean()) == pytest.approx(1.0, abs=0.005)
    assert module.drop_fraction is None
    assert (y != 0).all(), "gaussian dropout removes no unit"


# ======================================================================================================
# dropblock
# ======================================================================================================


def _zero_is_in_full_block(zero: Tensor, ks: tuple[int, ...]) -> bool:
    """Every zero position lies inside a k-window (k = ks) that is entirely zero. zero: (N, C, *spatial)."""
    zero = zero.float()
    if len(ks) == 1:
        full = -F.max_pool1d(-zero, ks[0], stride=1)  # min-pool over valid windows
        covered = F.max_pool1d(F.pad(full, (ks[0] - 1, ks[0] - 1)), ks[0], stride=1)
    else:
        full = -F.max_pool2d(-zero, ks, stride=1)
        covered = F.max_pool2d(F.pad(full, (ks[1] - 1, ks[1] - 1, ks[0] - 1, ks[0] - 1)), ks, stride=1)
    return torch.equal(covered, zero)


@pytest.mark.parametrize("p", [0.02, 0.2])
@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("spatial", [(16, 16), (12, 20), (40,)], ids=["16x16", "12x20", "L40"])
def test_dropblock_zeros_form_blocks(spatial: tuple[int, ...], k: int, p: float) -> None:
    module = DropBlock(p, block_size=k, share_channels=True)
    y = module(torch.ones(256, 3, *spatial))
    assert torch.equal(y[:, :1].expand_as(y), y), "share_channels: one mask for all channels"
    zero = y[:, :1] == 0
    assert zero.any()
    assert _zero_is_in_full_block(zero, (k,) * len(spatial))


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_dropblock_single_seed_is_a_k_by_k_square(k: int) -> None:
    module = DropBlock(0.01, block_size=k, share_channels=True)
    zero = (module(torch.ones(1000, 1, 16, 16)) == 0)[:, 0]  # ~90 (k=5) to ~340 (k=2) single-block maps
    counts = zero.flatten(1).sum(1)
    assert bool(((counts == 0) | (counts >= k * k)).all()), "a dropped region smaller than one block"
    singles = zero[counts == k * k]
    assert len(singles) > 20
    for mask in singles:
        rows = mask.any(1).nonzero().flatten()
        cols = mask.any(0).nonzero().flatten()
        assert rows.tolist() == list(range(int(rows[0]), int(rows[0]) + k))
        assert cols.tolist() == list(range(int(cols[0]), int(cols[0]) + k))


def test_dropblock_channels_independent_without_sharing() -> None:
    y = DropBlock(0.3, block_size=3)(torch.ones(8, 16, 10, 10))
    zero = (y == 0).flatten(2)
    assert not all(torch.equal(zero[:, 0], zero[:, c]) for c in range(1, 16))
    assert _zero_is_in_full_block(y == 0, (3, 3))


@pytest.mark.parametrize("k", [3, 4, 5])
@pytest.mark.parametrize("spatial", [(16, 16), (16,), (64,)], ids=["16x16", "L16", "L64"])
def test_dropblock_drop_fraction_matches_p(spatial: tuple[int, ...], k: int, record_property) -> None:
    """Product claim: the measured fraction is p +- 0.02 (timm drops 0.22 / 0.255 / 0.31 at k = 3 / 4 / 5)."""
    # 8192 maps (2-d) / 16384 maps (1-d); worst per-map sd ~0.25 -> sigma <= 0.003
    n = 8192 if len(spatial) == 2 else 16384
    module = DropBlock(P, block_size=k)
    module.track = True
    with torch.no_grad():
        y = module(torch.ones(n // 16, 16, *spatial))
    frac = float(module.drop_fraction)
    assert frac == pytest.approx(float((y == 0).float().mean()))
    _record_fraction(
        record_property,
        f"dropblock k={k} {'x'.join(map(str, spatial)) if len(spatial) == 2 else f'L={spatial[0]}'}",
        P,
        frac,
    )
    assert abs(frac - P) <= DROP_FRACTION_TOL


@pytest.mark.parametrize("k", [2, 4, 6])
def test_dropblock_even_block_sizes(k: int) -> None:
    for shape in [(512, 16, 16, 16), (1024, 16, 32)]:
        module = DropBlock(P, block_size=k)
        module.track = True
        x = torch.ones(shape)
        y = module(x)
        assert y.shape == x.shape
        assert _zero_is_in_full_block(y == 0, (k,) * (x.dim() - 2))
        assert abs(float(module.drop_fraction) - P) <= DROP_FRACTION_TOL
        assert set(y.unique().tolist()) == {0.0, 1.25}


def test_dropblock_block_larger_than_map_is_clipped() -> None:
    module = DropBlock(0.3, block_size=9)
    module.track = True
    y = module(torch.ones(2048, 8, 5, 5)).flatten(2)
    assert bool(((y == 0).all(-1) | (y != 0).all(-1)).all()), "a 5x5 map under a 9-block drops whole"
    assert abs(float(module.drop_fraction) - 0.3) <= DROP_FRACTION_TOL  # 16384 maps, sigma 0.004
    # clipped on one axis only: (4, 12) map with a 6-block -> 4x6 blocks
    y = DropBlock(0.3, block_size=6, share_channels=True)(torch.ones(512, 1, 4, 12))
    assert _zero_is_in_full_block(y == 0, (4, 6))
    counts = (y == 0).flatten(1).sum(1)
    assert bool(((counts == 0) | (counts >= 24)).all())
    # 1-d
    y = DropBlock(0.3, block_size=9)(torch.ones(256, 8, 4)).flatten(2)
    assert bool(((y == 0).all(-1) | (y != 0).all(-1)).all())


def _brute_force_fraction(gamma: float, spatial: tuple[int, ...], k: int) -> float:
    """Expected dropped fraction with seeds ~ Bernoulli(gamma) on every position where a block fits."""
    ks = [min(k, s) for s in spatial]
    count = np.zeros(spatial)
    for start in np.ndindex(*[s - kk + 1 for s, kk in zip(spatial, ks, strict=True)]):
        count[tuple(slice(i, i + kk) for i, kk in zip(start, ks, strict=True))] += 1
    return 1.0 - float(np.mean((1.0 - gamma) ** count))


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
@pytest.mark.parametrize(
    ("spatial", "k"),
    [
        ((16, 16), 3),
        ((16, 16), 4),
        ((16, 16), 5),
        ((7, 9), 3),
        ((5, 5), 9),
        ((4, 12), 6),
        ((16,), 4),
        ((40,), 7),
    ],
)
def test_dropblock_seed_rate_is_exact(spatial: tuple[int, ...], k: int, p: float) -> None:
    gamma = seed_rate(p, spatial, k)
    assert 0.0 < gamma < 1.0
    assert _brute_force_fraction(gamma, spatial, k) == pytest.approx(p, abs=1e-9)
    assert seed_rate(0.0, spatial, k) == 0.0


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_dropblock_rejects_bad_block_size(bad: object) -> None:
    with pytest.raises(DropoutConfigError, match="block_size"):
        DropBlock(0.1, block_size=bad)  # type: ignore[arg-type]
    with pytest.raises(DropoutConfigError, match="block_size"):
        drop_block(torch.ones(1, 1, 8, 8), 0.1, block_size=bad)  # type: ignore[arg-type]


def test_dropblock_refuses_other_ranks() -> None:
    with pytest.raises(DropoutConfigError, match=r"got shape \(2, 3\)"):
        DropBlock(0.2)(torch.ones(2, 3))
    with pytest.raises(DropoutConfigError, match=r"got shape \(1, 2, 3, 4, 5\)"):
        DropBlock(0.2)(torch.ones(1, 2, 3, 4, 5))


# ======================================================================================================
# droppath
# ======================================================================================================


@pytest.mark.parametrize(("scale_by_keep", "kept_value"), [(True, 1 / 0.7), (False, 1.0)])
def test_droppath_whole_samples(scale_by_keep: bool, kept_value: float) -> None:
    module = DropPath(0.3, scale_by_keep=scale_by_keep)
    y = module(torch.ones(256, 3, 4, 5)).flatten(1)
    dropped = (y == 0).all(1)
    kept = torch.isclose(y, torch.tensor(kept_value)).all(1)
    assert bool((dropped | kept).all())
    assert dropped.any() and kept.any()
    assert _values(y) == [0.0, round(kept_value, 4)]


def test_droppath_without_scaling_keeps_eval_identity() -> None:
    module = DropPath(0.3, scale_by_keep=False)
    x = _pos(100_000, 2)
    # E[train] = (1 - p) x: keep-rate sd 0.46 / sqrt(1e5) = 0.0015
    assert float((module(x) / x).mean()) == pytest.approx(0.7, abs=0.008)
    assert torch.equal(module.eval()(x), x)


# ======================================================================================================
# concrete
# ======================================================================================================


def test_concrete_p_is_sigmoid_of_logit() -> None:
    module = ConcreteDropout(0.2)
    assert module.p == pytest.approx(0.2)
    assert list(module.state_dict()) == ["p_logit"]
    with torch.no_grad():
        module.p_logit.fill_(0.7)
    assert module.p == pytest.approx(float(torch.sigmoid(torch.tensor(0.7))))
    assert "p=0.668" in module.extra_repr()


def test_concrete_gradient_reaches_p_logit_through_output_and_regularizer() -> None:
    module = ConcreteDropout(0.2)
    x = _pos(32, 10)
    module(x).sum().backward()
    grad = module.p_logit.grad
    assert grad is not None and torch.isfinite(grad) and float(grad) != 0.0
    assert module.input_features == 10

    module.p_logit.grad = None
    w = torch.randn(5, 10, requires_grad=True)
    reg = module.regularizer([w])
    reg.backward()
    assert module.p_logit.grad is not None and float(module.p_logit.grad) != 0.0
    assert w.grad is not None and w.grad.abs().sum() > 0
    # value: wr * sum ||W||^2 / (1 - p) + dr * K * (p log p + (1 - p) log(1 - p))
    p = module.p
    expected = 1e-6 * float(w.detach().pow(2).sum()) / (1 - p) + 1e-5 * 10 * (
        p * math.log(p) + (1 - p) * math.log(1 - p)
    )
    assert float(reg.detach()) == pytest.approx(expected, rel=1e-4)


def test_concrete_rate_cannot_be_scheduled() -> None:
    module = ConcreteDropout(0.2)
    with pytest.raises(DropoutConfigError, match="cannot be scheduled"):
        module.set_rate(0.1)
    assert module.p == pytest.approx(0.2)


def test_concrete_rejects_bad_temperature() -> None:
    with pytest.raises(DropoutConfigError, match="temperature"):
        ConcreteDropout(0.2, temperature=0.0)


def test_concrete_drops_about_p() -> None:
    # relaxed mask at t = 0.1: most of z is near 0 or 1; the fraction with z > 0.5 is p exactly
    module = ConcreteDropout(0.2)
    with torch.no_grad():
        y = module(torch.ones(200_000))
    z = 1.0 - y * 0.8
    assert float((z > 0.5).float().mean()) == pytest.approx(0.2, abs=0.005)  # sd 0.0009
    assert float(z.mean()) == pytest.approx(0.2, abs=0.01)


# ======================================================================================================
# alpha / feature_alpha
# ======================================================================================================

A_REF, B_REF, DROPPED_REF = 0.8789, 0.3090, -1.2362  # reference notes, p = 0.2


@pytest.mark.parametrize("path", ["torch", "tracked", "generator"])
def test_alpha_dropped_value_and_affine(path: str) -> None:
    module = AlphaDropout(P)
    module.track = path == "tracked"
    if path == "generator":
        module.generator = torch.Generator().manual_seed(0)
    x = torch.randn(200_000)
    y = module(x)
    dropped = torch.isclose(y, torch.tensor(DROPPED_REF), atol=1e-4)
    # a kept unit is a * x + b
    torch.testing.assert_close(y[~dropped], A_REF * x[~dropped] + B_REF, atol=2e-4, rtol=0)
    assert float(dropped.float().mean()) == pytest.approx(P, abs=0.005)  # sd 0.0009
    # on zeros: exactly the two values b and the dropped value
    values = module(torch.zeros(10_000)).unique()
    torch.testing.assert_close(values, torch.tensor([DROPPED_REF, B_REF]), atol=1e-4, rtol=0)


def test_alpha_matches_torch_alpha_dropout_statistics() -> None:
    x = torch.randn(1_000_000)
    ours = AlphaDropout(P)
    ours.track = True  # own implementation, not the torch call
    y = ours(x)
    ref = F.alpha_dropout(x, P, training=True)
    for out in (y, ref):
        assert abs(float(out.mean())) < 0.005  # sd 0.001
        assert abs(float(out.std()) - 1.0) < 0.005
    # both set a dropped unit to the same value
    dropped = torch.isclose(y, torch.tensor(DROPPED_REF), atol=1e-4)
    dropped_ref = torch.isclose(ref, torch.tensor(DROPPED_REF), atol=1e-4)
    assert float(dropped.float().mean()) == pytest.approx(P, abs=0.005)  # sd 0.0004 (+ ~1e-4 kept hits)
    assert float(dropped_ref.float().mean()) == pytest.approx(P, abs=0.005)


def test_feature_alpha_drops_whole_channels() -> None:
    module = FeatureAlphaDropout(P)
    module.track = True
    y = module(torch.zeros(64, 32, 5)).flatten(2)
    dropped = torch.isclose(y, torch.tensor(DROPPED_REF), atol=1e-4).all(-1)
    kept = torch.isclose(y, torch.tensor(B_REF), atol=1e-4).all(-1)
    assert bool((dropped | kept).all())
    assert float(module.drop_fraction) == pytest.approx(float(dropped.float().mean()))
    with pytest.raises(DropoutConfigError, match=r"got shape \(5,\)"):
        module(torch.zeros(5))


def test_alpha_functional_trains_by_default() -> None:
    """Unlike torch.nn.functional.alpha_dropout, the twins default to training=True."""
    x = torch.zeros(1000)
    assert not torch.equal(alpha_dropout(x, P), x)
    assert not torch.equal(feature_alpha_dropout(x.view(10, 100), P), x.view(10, 100))


def test_the_torch_free_catalog_is_the_registry():
    """`lightning-dropout variants` prints `catalog.BUILTIN_VARIANTS` without importing torch: it must list
    exactly the built-in variants, each with the first line of its class docstring."""
    import re

    from lightning_dropout.catalog import BUILTIN_VARIANTS

    registry = {
        name: re.sub(r"\s*\(see the module docstring[^)]*\)", "", (cls.__doc__ or "").strip().splitlines()[0])
        for name, cls in VARIANTS.items()
    }
    assert registry == BUILTIN_VARIANTS


def test_a_variant_reads_its_parameters_off_its_target_in_one_classmethod() -> None:
    """`params_from_target` is the one place a variant fills parameters from the module it is attached to (the
    injection engine holds no per-variant branch): a new variant only overrides it."""
    from torch import nn

    from lightning_dropout import Rule, inject

    saved = dict(VARIANTS)
    try:

        @register_variant("width_probe")
        class WidthProbe(DropoutVariant):
            def __init__(self, p: float = 0.5, width: int = 0) -> None:
                super().__init__(p)
                self.width = width

            @classmethod
            def params_from_target(cls, module: nn.Module, where: str, params: Any) -> dict[str, Any]:
                return {"width": getattr(module, "out_features", 0), **params}

            def forward(self, x: Tensor) -> Tensor:
                return x

        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
        plan = inject(model, [Rule(match=nn.Linear, variant="width_probe", p=0.2)])
        built = [m for m in model.modules() if isinstance(m, WidthProbe)]
        assert sorted(m.width for m in built) == [3, 6] and len(plan) == 2
    finally:
        VARIANTS.clear()
        VARIANTS.update(saved)
