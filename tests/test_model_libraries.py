"""Conformance on the model libraries Lightning users load most: Hugging Face ``transformers`` models built from
tiny configs (no download) and timm's patterns (real timm when it imports, else line-for-line copies in
``timm_patterns.py``).

Three kinds of site, each checked to be found and to act (or to fail in one line):

* ``module``: a dropout module the model calls (``nn.Dropout``, timm ``DropPath``/``DropBlock2d``);
* ``bypassed``: a dropout module whose ``.p`` a fused kernel reads instead of calling it (timm ``Attention``
  with ``fused_attn``, Hugging Face attention): only ``standard`` acts, unless the owner has an eager path
  that calls the module (timm);
* ``rate``: a float rate the model applies functionally (BART ``self.dropout``, T5 attention
  ``self.dropout``, timm ``self.drop_rate``): only ``standard``, found as an attribute site.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import optuna
import pytest
import timm_patterns as tp
import torch
import torch.nn.functional as F
import yaml
from helpers import trainer
from torch import Tensor, nn

from lightning_dropout import DropoutConfigError, DropoutPlan, Rule, Site, apply_plan, describe, inject, undo
from lightning_dropout import _attr_sites as attr_sites
from lightning_dropout.callback import DropoutInjector
from lightning_dropout.injection import resolve, site_handles
from lightning_dropout.tune import SearchGroup, suggest_plan

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------------
# The matrix: models and one site of each kind they have
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Model:
    name: str
    build: Callable[[], nn.Module]
    example: Any
    sites: dict[str, str]  # kind -> a site key of that kind
    eager_acts: bool = False  # whether the eager path makes a bypassed module run
    extra: dict[str, Any] = field(default_factory=dict)

    def forward(self, model: nn.Module, seed: int = 0) -> Tensor:
        torch.manual_seed(seed)
        out = model(**self.example) if isinstance(self.example, dict) else model(self.example)
        return out if isinstance(out, Tensor) else out.last_hidden_state


def _transformers() -> Any:
    """transformers, from the `dev`/`test-models` extras; under CI (`$CI` set) its absence fails, never skips."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        import transformers
    else:
        transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def bert() -> nn.Module:
    tf = _transformers()
    config = tf.BertConfig(
        vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=32,
    )  # fmt: skip
    return tf.BertModel(config)


def gpt2() -> nn.Module:
    tf = _transformers()
    config = tf.GPT2Config(
        vocab_size=99, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return tf.GPT2Model(config)


def bart() -> nn.Module:
    tf = _transformers()
    config = tf.BartConfig(
        vocab_size=99, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=32,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip
    return tf.BartModel(config)


def t5() -> nn.Module:
    tf = _transformers()
    config = tf.T5Config(
        vocab_size=99, d_model=16, d_kv=8, d_ff=37, num_layers=1, num_heads=2, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return tf.T5Model(config)


IMAGE = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
TOKENS = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(2))

MODELS = [
    Model(
        "bert",
        bert,
        {"input_ids": IDS},
        {
            "module": "encoder.layer.0.output.dropout:replace",
            "bypassed": "encoder.layer.0.attention.self.dropout:replace",
        },
    ),
    Model(
        "gpt2",
        gpt2,
        {"input_ids": IDS},
        {"module": "h.0.mlp.dropout:replace", "bypassed": "h.0.attn.attn_dropout:replace"},
    ),
    Model(
        "bart",
        bart,
        {"input_ids": IDS},
        {"rate": "encoder.layers.0.activation_dropout:attribute"},
        extra={"attention rate": "decoder.layers.0.encoder_attn.dropout:attribute"},
    ),
    Model(
        "t5",
        t5,
        {"input_ids": IDS, "decoder_input_ids": IDS},
        {
            "module": "encoder.block.0.layer.1.DenseReluDense.dropout:replace",
            "rate": "encoder.block.0.layer.0.SelfAttention.dropout:attribute",
        },
    ),
    Model(
        "timm-resnet",
        tp.ResNetLike,
        IMAGE,
        {"module": "layer1.0.drop_block:replace", "rate": "drop_rate:attribute"},
        extra={"droppath": "layer1.1.drop_path:replace"},
    ),
    Model(
        "timm-vit",
        tp.ViTLike,
        TOKENS,
        {"module": "blocks.0.mlp.drop1:replace", "bypassed": "blocks.0.attn.attn_drop:replace"},
        eager_acts=True,
        extra={"droppath": "blocks.1.drop_path1:replace"},
    ),
]


def _real_timm() -> list[Model]:
    """Real timm models, when timm imports (it needs a torchvision built for the installed torch)."""
    try:
        import timm
    except Exception:  # ImportError, or torchvision's operator registration failing at import
        return []

    def resnet() -> nn.Module:
        return timm.create_model(
            "resnet18",
            pretrained=False,
            num_classes=3,
            drop_rate=0.2,
            drop_path_rate=0.1,
            drop_block_rate=0.1,
        )

    def vit() -> nn.Module:
        return timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, depth=2,
            drop_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.1,
        )  # fmt: skip

    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    small = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    return [
        Model(
            "timm.resnet18",
            resnet,
            image,
            {"module": "layer4.0.drop_block:replace", "rate": "drop_rate:attribute"},
        ),
        Model(
            "timm.vit",
            vit,
            small,
            {"module": "blocks.0.mlp.drop1:replace", "bypassed": "blocks.0.attn.attn_drop:replace"},
            eager_acts=True,
        ),
    ]


MODELS += _real_timm()
IDS_OF = [m.name for m in MODELS]
KIND_CASES = [pytest.param(m, kind, id=f"{m.name}-{kind}") for m in MODELS for kind in m.sites]


def fresh(model: Model) -> nn.Module:
    torch.manual_seed(0)
    return model.build().train()


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def state(module: nn.Module) -> list[tuple[str, str, dict[str, Any], int]]:
    """What undo must restore: every module's name, type, plain scalar attributes and hook count."""
    out = []
    for name, m in module.named_modules():
        scalars = {
            k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str)) and k != "training"
        }
        hooks = len(m._forward_hooks) + len(m._forward_pre_hooks)
        out.append((name, type(m).__name__, scalars, hooks))
    config = getattr(module, "config", None)
    if config is not None:
        out.append(("config", config._attn_implementation, {}, 0))
    return out


# ----------------------------------------------------------------------------------------------------------
# 1. Found: every kind of site the model has is in the plan of Rule(replace=True)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_example", [False, True], ids=["static", "example"])
@pytest.mark.parametrize("model", MODELS, ids=IDS_OF)
def test_replace_true_finds_every_kind_of_site(model: Model, with_example: bool) -> None:
    net = fresh(model)
    plan = resolve(net, [Rule(replace=True)], model.example if with_example else None)
    keys = {s.key for s in plan}
    assert set(model.sites.values()) | set(model.extra.values()) <= keys
    for site in plan:
        if site.where == "attribute":
            assert site.variant == "standard" and 0 <= site.p < 1


# ----------------------------------------------------------------------------------------------------------
# 2. replace=True, p=0 makes training mode deterministic; state_dict keys stay; undo is exact
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_example", [False, True], ids=["static", "example"])
@pytest.mark.parametrize("model", MODELS, ids=IDS_OF)
def test_replace_true_p0_makes_training_deterministic(model: Model, with_example: bool) -> None:
    net = fresh(model)
    assert not torch.equal(model.forward(net, 0), model.forward(net, 1))  # the model really drops out
    inject(net, [Rule(replace=True, p=0.0)], example_input=model.example if with_example else None)
    torch.testing.assert_close(model.forward(net, 0), model.forward(net, 1), rtol=0, atol=0)


@pytest.mark.parametrize("model", MODELS, ids=IDS_OF)
def test_state_dict_keys_unchanged_and_undo_exact(model: Model) -> None:
    net = fresh(model)
    plain = copy.deepcopy(net)
    keys, before = list(net.state_dict()), state(net)
    rules = [Rule(replace=True, p=0.3)]
    for kind in ("module", "bypassed") if model.eager_acts else ("module",):
        if kind in model.sites:
            rules.append(Rule(replace=True, name=model.sites[kind].split(":")[0], variant="gaussian", p=0.2))
    inject(net, rules, example_input=model.example, eager=True)
    assert list(net.state_dict()) == keys
    assert state(net) != before
    net.load_state_dict(plain.state_dict(), strict=True)
    undo(net)
    assert state(net) == before
    assert repr(net) == repr(plain)
    torch.testing.assert_close(model.forward(net, 5), model.forward(plain, 5), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# 3. A non-standard variant on each kind of site acts (differs from `standard` under the same seed) or
#    fails in one line naming the site
# ----------------------------------------------------------------------------------------------------------
def _with_variant(model: Model, key: str, variant: str, p: float = 0.3, eager: bool = False) -> nn.Module:
    """The model with every dropout off but the site ``key``, which gets ``variant`` at rate ``p``."""
    net = fresh(model)
    inject(net, [Rule(replace=True, p=0.0)])
    target, _, where = key.partition(":")
    plan = DropoutPlan([Site(target, where, variant, p)])
    apply_plan(net, plan, model.example, **({"eager": True} if eager else {}))
    return net


@pytest.mark.parametrize(("model", "kind"), KIND_CASES)
def test_non_standard_variant_acts_or_fails_in_one_line(model: Model, kind: str) -> None:
    key = model.sites[kind]
    standard = model.forward(_with_variant(model, key, "standard"), seed=7)
    if kind == "module":
        gaussian = model.forward(_with_variant(model, key, "gaussian"), seed=7)
        assert not torch.allclose(gaussian, standard)
        return
    with pytest.raises(DropoutConfigError) as err:
        _with_variant(model, key, "gaussian")
    message = one_line(err)
    assert key in message and "'gaussian'" in message and "'standard'" in message
    if kind == "rate":
        assert "functionally" in message
        # the rate itself acts: at p=0.3 it drops out, at p=0 the model is deterministic
        assert not torch.allclose(standard, model.forward(_with_variant(model, key, "standard"), seed=8))
        off = _with_variant(model, key, "standard", p=0.0)
        torch.testing.assert_close(model.forward(off, seed=7), model.forward(off, seed=8), rtol=0, atol=0)
        return
    assert "would never run" in message
    # the eager hint where the owner has a known eager path (timm, transformers 5), else only `standard` acts
    assert (
        "fused_attn = False" in message and "eager=True" in message
    ) or "only variant 'standard'" in message
    # eager=True: timm's eager path calls the module, so the variant acts; Hugging Face's does in transformers 4
    # (GPT-2, BERT) but reads `.p` into nn.functional.dropout in transformers 5, which is refused in one line
    try:
        net = _with_variant(model, key, "gaussian", eager=True)
    except DropoutConfigError as err:
        assert not model.eager_acts
        assert "only variant 'standard' can act there" in str(err) and "\n" not in str(err)
    else:
        assert getattr(net.get_submodule(key.split(":")[0].rpartition(".")[0]), "fused_attn", False) is False
        assert not torch.allclose(model.forward(net, seed=7), standard)
        assert not torch.allclose(standard, model.forward(_with_variant(model, key, "standard"), seed=8))


@pytest.mark.parametrize("model", [m for m in MODELS if "bypassed" in m.sites], ids=lambda m: m.name)
def test_bypassed_module_is_caught_on_the_first_training_forward_without_example(model: Model) -> None:
    net = fresh(model)
    target = model.sites["bypassed"].split(":")[0]
    before = state(net)
    inject(
        net, plan=DropoutPlan([Site(target, "replace", "gaussian", 0.3)])
    )  # no example: nothing to run yet
    net.eval()
    model.forward(net)  # eval forwards do not check
    net.train()
    with pytest.raises(DropoutConfigError, match=r"would never run") as err:
        model.forward(net)
    assert model.sites["bypassed"] in one_line(err)
    undo(net)
    assert state(net) == before


def test_eager_switch_on_the_first_training_forward_is_undone() -> None:
    model = next(m for m in MODELS if m.name == "timm-vit")
    net = fresh(model)
    plan = DropoutPlan([Site("blocks.0.attn.attn_drop", "replace", "gaussian", 0.3)])
    inject(net, plan=plan, eager=True)
    assert net.blocks[0].attn.fused_attn
    first = model.forward(net, seed=3)
    assert not net.blocks[0].attn.fused_attn and net.blocks[1].attn.fused_attn
    torch.testing.assert_close(model.forward(net, seed=3), first, rtol=0, atol=0)  # the probe drew nothing
    undo(net)
    assert net.blocks[0].attn.fused_attn


def test_standard_on_a_bypassed_module_is_accepted_and_its_rate_acts() -> None:
    model = next(m for m in MODELS if m.name == "timm-vit")
    outs = []
    for p in (0.0, 0.5):
        net = fresh(model)
        inject(net, [Rule(replace=True, p=0.0), Rule(replace=True, name="blocks.*.attn.attn_drop", p=p)])
        outs.append(model.forward(net, seed=1))
    assert not torch.allclose(*outs)


def test_gaussian_on_a_fused_attention_is_no_longer_silently_standard() -> None:
    """The bug: under the same seed a `gaussian` replacement of a fused attention's dropout gave exactly the
    output of `standard`. Now it is refused, or (eager=True) it acts."""
    model = next(m for m in MODELS if m.name == "timm-vit")
    rules = [Rule(replace=True, p=0.0), Rule(replace=True, name="blocks.0.attn.attn_drop", p=0.4)]
    standard = fresh(model)
    inject(standard, rules)
    gaussian_rules = [rules[0], Rule(replace=True, name="blocks.0.attn.attn_drop", variant="gaussian", p=0.4)]
    with pytest.raises(DropoutConfigError):
        inject(fresh(model), gaussian_rules, example_input=model.example)
    gaussian = fresh(model)
    inject(gaussian, gaussian_rules, example_input=model.example, eager=True)
    assert not torch.allclose(model.forward(gaussian, seed=2), model.forward(standard, seed=2))


# ----------------------------------------------------------------------------------------------------------
# 4. A short tuning study on each model: the tuner searches every site's rate, rate attributes included
# ----------------------------------------------------------------------------------------------------------
class Wrapped(L.LightningModule):
    def __init__(self, model: Model) -> None:
        super().__init__()
        self.spec = model
        self.net = fresh(model)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.spec.forward(self.net, seed=batch_idx).float().pow(2).mean()
        self.last_loss = float(loss.detach())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("model", MODELS, ids=IDS_OF)
def test_short_tuning_study(model: Model) -> None:
    group = SearchGroup(name="all", select={"replace": True}, variants=["standard"], p=[0.0, 0.3])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2, 1)), batch_size=1)
    kinds = {k.split(":")[1] for k in model.sites.values()}

    def objective(trial: optuna.Trial) -> float:
        module = Wrapped(model)
        plan = suggest_plan(trial, [group], module.net, model.example)
        assert {s.key.split(":")[1] for s in plan} >= kinds
        injector = DropoutInjector(
            plan=DropoutPlan(Site(f"net.{s.target}", s.where, s.variant, s.p) for s in plan)
        )
        fit = trainer(max_steps=2, callbacks=[injector])
        fit.fit(module, data)
        rates = {h.site.key: h.rate for h in site_handles(module)}
        assert set(rates.values()) == {trial.params["all/standard/p"]}
        return module.last_loss

    study.optimize(objective, n_trials=2)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2


# ----------------------------------------------------------------------------------------------------------
# 5. Rate attributes: the guard against false positives, the user's names, describe, refusals
# ----------------------------------------------------------------------------------------------------------
class Rates(nn.Module):
    """One true rate per proof path, and the false positives the guard must reject."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.dropout = 0.2  # F.dropout(x, p=self.dropout): static and dynamic proof
        self.hidden_drop_rate = 0.1  # through a local variable: only the dynamic proof sees it
        self.mask_prob = 0.3  # a threshold, not dropout
        self.keep_prob = 0.9  # 1 - p: never a drop rate
        self.config_dropout = 0.4  # read in __init__ only
        self.embed_dropout = 0  # an int 0: a rate switched off
        self.width = self.config_dropout * 10

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(self.fc(x), p=self.dropout, training=self.training)
        p = self.hidden_drop_rate if self.training else 0.0
        x = F.dropout(x, p, self.training)
        x = torch.where(torch.rand_like(x) < self.mask_prob, torch.zeros_like(x), x)
        x = F.dropout(x, p=self.embed_dropout, training=self.training)
        return x * self.keep_prob


def test_rate_attributes_guard_against_false_positives() -> None:
    model = nn.Sequential(Rates())
    static = {s.key for s in resolve(model, [Rule(replace=True)])}
    assert static == {"0.dropout:attribute", "0.embed_dropout:attribute"}
    dynamic = {s.key for s in resolve(model, [Rule(replace=True)], torch.randn(2, 6))}
    assert dynamic == {"0.dropout:attribute", "0.hidden_drop_rate:attribute", "0.embed_dropout:attribute"}


def test_user_extends_the_rate_names(monkeypatch: pytest.MonkeyPatch) -> None:
    class GPT2Old(nn.Module):  # transformers 2.x kept `attn_pdrop` floats
        def __init__(self) -> None:
            super().__init__()
            self.attn_pdrop = 0.1

        def forward(self, x: Tensor) -> Tensor:
            return F.dropout(x, self.attn_pdrop, self.training)

    model = nn.Sequential(GPT2Old())
    with pytest.raises(DropoutConfigError, match="must match at least one module"):
        resolve(model, [Rule(replace=True)])
    monkeypatch.setattr(attr_sites, "RATE_ATTRIBUTES", list(attr_sites.RATE_ATTRIBUTES))
    attr_sites.register_rate_attribute("*_pdrop")
    assert [s.key for s in resolve(model, [Rule(replace=True)])] == ["0.attn_pdrop:attribute"]
    with pytest.raises(DropoutConfigError, match="non-empty glob"):
        attr_sites.register_rate_attribute("")


def test_rate_attribute_sites_describe_tune_and_undo() -> None:
    model = nn.Sequential(Rates())
    plan = inject(model, [Rule(replace=True, p=0.25)])
    rows = {r.key: r for r in describe(model)}
    assert rows["0.dropout:attribute"].module_type == "Rates" and rows["0.dropout:attribute"].p == 0.25
    assert model[0].dropout == 0.25 and model[0].embed_dropout == 0.25
    handle = next(h for h in site_handles(model) if h.site.key == "0.dropout:attribute")
    handle.set_rate(0.05)
    assert model[0].dropout == 0.05 and handle.rate == 0.05
    assert DropoutPlan.from_yaml(plan.to_yaml()) == plan
    undo(model)
    assert (model[0].dropout, model[0].embed_dropout) == (0.2, 0)
    assert type(model[0].embed_dropout) is int


def test_non_standard_variant_on_a_rate_attribute_is_refused_in_one_line() -> None:
    model = nn.Sequential(Rates())
    with pytest.raises(DropoutConfigError) as err:
        resolve(model, [Rule(replace=True, name="0.dropout", variant="gaussian")])
    assert one_line(err).startswith(
        "rules[0] Rule(replace=True, name=['0.dropout'], variant='gaussian') selects"
    )
    with pytest.raises(DropoutConfigError) as err:
        apply_plan(model, DropoutPlan([Site("0.dropout", "attribute", "spatial", 0.1)]))
    message = one_line(err)
    assert "site '0.dropout:attribute'" in message and "only variant 'standard'" in message
    with pytest.raises(DropoutConfigError, match="needs a float rate"):
        apply_plan(model, DropoutPlan([Site("0.keep_prob", "attribute", "standard", 0.1)]))
    assert model[0].dropout == 0.2
    # replace=True with another variant acts where it can and says which rates it leaves alone
    mixed = nn.Sequential(Rates(), nn.Dropout(0.1))
    with pytest.warns(UserWarning, match=r"leaves 1 float rates .*'0.dropout'"):
        plan = resolve(mixed, [Rule(replace=True, variant="gaussian")])
    assert [s.key for s in plan] == ["1:replace"]


def test_dropout_module_its_owner_never_calls_is_refused_for_other_variants() -> None:
    class Dead(
        nn.Module
    ):  # like transformers 4's BertSdpaSelfAttention: the kernel takes a float `dropout_prob`
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.dropout = nn.Dropout(0.1)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x)

    model = nn.Sequential(Dead())
    with pytest.raises(DropoutConfigError) as err:  # the rule would leave the only module it selects alone
        inject(model, [Rule(replace=True, variant="gaussian")], example_input=torch.randn(2, 4))
    assert one_line(err).startswith(
        "rules[0] Rule(replace=True, variant='gaussian') selects only 1 dropout modules their owners run past "
        "(['0.dropout']): Dead '0' runs without calling it, so variant 'gaussian' would never run there"
    )
    with pytest.raises(DropoutConfigError) as err:
        inject(model, [Rule(replace=True, variant="gaussian", strict=True)], example_input=torch.randn(2, 4))
    assert one_line(err).startswith(
        "site '0.dropout:replace': variant 'gaussian' would never run: Dead '0' ran"
    )
    assert "only variant 'standard' can act there (or exclude the site)" in str(err.value)
    assert type(model[0].dropout) is nn.Dropout and not site_handles(model)  # nothing applied
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject(model, [Rule(replace=True)], example_input=torch.randn(2, 4))  # standard: not probed, quiet


def test_callback_passes_eager_on() -> None:
    model = next(m for m in MODELS if m.name == "timm-vit")

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = fresh(model)
            self.example_input_array = model.example

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

    rules = [Rule(replace=True, name="net.blocks.0.attn.attn_drop", variant="gaussian", p=0.2)]
    with pytest.raises(DropoutConfigError, match="would never run"):
        DropoutInjector(rules=rules).inject(Module())
    module = Module()
    DropoutInjector(rules=rules, eager=True).inject(module)
    assert not module.net.blocks[0].attn.fused_attn


def test_replace_naming_an_owner_class_gives_attribute_sites() -> None:
    model = nn.Sequential(Rates(), nn.Linear(6, 2))
    plan = resolve(model, [Rule(replace=Rates, p=0.1)])
    assert {(s.key, s.variant) for s in plan} == {
        ("0.dropout:attribute", "standard"),
        ("0.embed_dropout:attribute", "standard"),
    }
    with pytest.raises(
        DropoutConfigError, match=r"site '0.dropout:attribute': Rates applies its float `dropout`"
    ):
        resolve(model, [Rule(replace=Rates, variant="gaussian")])


def test_a_refused_site_leaves_the_earlier_plan_in_place() -> None:
    model = next(m for m in MODELS if m.name == "timm-vit")
    net = fresh(model)
    first = inject(net, [Rule(replace=True, p=0.2)], example_input=model.example)
    with pytest.raises(DropoutConfigError, match="would never run"):
        apply_plan(
            net, DropoutPlan([Site("blocks.0.attn.attn_drop", "replace", "gaussian", 0.2)]), model.example
        )
    assert [(s.key, s.variant, s.p) for s in describe(net)] == [(s.key, s.variant, s.p) for s in first]
    assert net.blocks[0].attn.fused_attn


# ----------------------------------------------------------------------------------------------------------
# 6. A variant that cannot act on a site: replace=True leaves it alone with one warning, for a rate attribute
#    and for a bypassed attention dropout alike; strict=True refuses; the hint fits the installed library
# ----------------------------------------------------------------------------------------------------------
def _our_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "Rule(replace=True" in str(w.message)]


@pytest.mark.parametrize("with_example", [False, True], ids=["static", "example"])
@pytest.mark.parametrize(("name", "kind"), [("bert", "bypassed"), ("t5", "rate")])
def test_replace_true_leaves_a_site_its_variant_cannot_act_on_with_one_warning(
    name: str, kind: str, with_example: bool
) -> None:
    model = next(m for m in MODELS if m.name == name)
    key = model.sites[kind]
    example = model.example if with_example else None
    net = fresh(model)
    before = state(net)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plan = inject(net, [Rule(replace=True, variant="gaussian", p=0.2)], example_input=example)
    (message,) = _our_warnings(record)
    assert key.split(":")[0] in message and "strict=True" in message and "'standard'" in message
    assert key not in {s.key for s in plan}
    assert plan and all(s.variant == "gaussian" for s in plan)  # the module sites it can act on
    model.forward(net.train())  # a training forward: nothing left that would fail later
    undo(net)
    assert state(net) == before
    # strict=True keeps the refusal, in one line naming the site, and leaves the model as it was
    with pytest.raises(DropoutConfigError) as err:
        inject(net, [Rule(replace=True, variant="gaussian", strict=True)], example_input=model.example)
    assert key in one_line(err) and "'standard'" in str(err.value)
    assert state(net) == before


def test_a_bypass_only_a_forward_reveals_is_refused_on_the_first_forward_with_the_way_out() -> None:
    """GPT-2's source still calls its attention dropout (on a path it does not take by default), so without an
    example input the bypass shows only on the first training forward; the refusal says how to avoid it."""
    model = next(m for m in MODELS if m.name == "gpt2")
    net = fresh(model)
    inject(net, [Rule(replace=True, variant="gaussian")])
    with pytest.raises(DropoutConfigError) as err:
        model.forward(net)
    assert model.sites["bypassed"] in one_line(err) and "example_input_array" in str(err.value)
    with pytest.warns(UserWarning, match=r"h\.0\.attn\.attn_dropout"):
        plan = inject(fresh(model), [Rule(replace=True, variant="gaussian")], example_input=model.example)
    assert model.sites["bypassed"] not in {s.key for s in plan}


def test_the_callback_leaves_bert_attention_dropout_alone_in_setup() -> None:
    """The reported case: a BERT with `example_input_array` stopped in DropoutInjector.setup."""
    model = next(m for m in MODELS if m.name == "bert")

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = fresh(model)
            self.example_input_array = model.example

        def forward(self, input_ids: Tensor) -> Tensor:
            return self.net(input_ids=input_ids).last_hidden_state

    module = Module()
    with pytest.warns(UserWarning, match=r"net\.encoder\.layer\.0\.attention\.self\.dropout"):
        plan = DropoutInjector(rules=[Rule(replace=True, variant="gaussian", p=0.1)]).inject(module)
    assert "net.encoder.layer.0.attention.output.dropout:replace" in {s.key for s in plan}
    assert type(module.net.encoder.layer[0].attention.self.dropout) is nn.Dropout
    with pytest.raises(DropoutConfigError, match="would never run"):
        DropoutInjector(rules=[Rule(replace=True, variant="gaussian", strict=True)]).inject(Module())


def test_timm_attention_dropout_is_left_alone_unless_eager_switches_it() -> None:
    model = next(m for m in MODELS if m.name == "timm-vit")
    with pytest.warns(UserWarning, match=r"fused_attn = False\), which eager=True does for you") as record:
        plan = inject(fresh(model), [Rule(replace=True, variant="gaussian")], example_input=model.example)
    assert len(_our_warnings(record.list)) == 1
    assert model.sites["bypassed"] not in {s.key for s in plan}
    net = fresh(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = inject(net, [Rule(replace=True, variant="gaussian")], example_input=model.example, eager=True)
    assert model.sites["bypassed"] in {s.key for s in plan} and not net.blocks[0].attn.fused_attn


def test_the_bypass_hint_matches_the_installed_transformers() -> None:
    tf = _transformers()
    major = int(tf.__version__.split(".")[0])
    model = next(m for m in MODELS if m.name == "bert")
    key = model.sites["bypassed"]
    with pytest.raises(DropoutConfigError) as err:
        _with_variant(model, key, "gaussian")
    message = one_line(err)
    assert f"transformers {tf.__version__}" in message
    if major >= 5:  # no attention implementation calls the module: the old hint (eager) fails too
        assert "eager=True does for you" not in message and "attention.output.dropout" in message
        with pytest.raises(DropoutConfigError, match="even after switching"):
            _with_variant(model, key, "gaussian", eager=True)
        # what the hint says to do instead works: another variant on the module after the attention
        net = _with_variant(model, "encoder.layer.0.attention.output.dropout:replace", "gaussian")
        standard = _with_variant(model, "encoder.layer.0.attention.output.dropout:replace", "standard")
        assert not torch.allclose(model.forward(net, seed=3), model.forward(standard, seed=3))
    else:  # transformers 4 fixes the attention class when the model is built
        assert 'attn_implementation="eager"' in message


# ----------------------------------------------------------------------------------------------------------
# 7. existing_dropout / describe before injecting: the dropout each model has, and how it applies it
# ----------------------------------------------------------------------------------------------------------
KINDS = {"module": "module", "bypassed": "bypassed", "rate": "rate attribute"}


@pytest.mark.parametrize("model", MODELS, ids=IDS_OF)
def test_existing_dropout_lists_every_kind_of_site(model: Model) -> None:
    from lightning_dropout import existing_dropout

    net = fresh(model)
    before = state(net)
    rows = {r.key: r for r in existing_dropout(net, model.example)}
    assert list(rows) == [s.key for s in resolve(net, [Rule(replace=True)], model.example)]
    for kind, key in model.sites.items():
        assert rows[key].kind == KINDS[kind] and rows[key].variant == ""
    assert state(net) == before
    assert describe(net, model.example) == list(rows.values())


def test_existing_dropout_of_a_tiny_bert_with_and_without_an_example() -> None:
    from lightning_dropout import existing_dropout, format_sites

    tf = _transformers()
    config = tf.BertConfig(
        vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.15,
    )  # fmt: skip
    net = tf.BertForSequenceClassification(config)
    expected = {
        "bert.embeddings.dropout:replace": ("module", 0.2),
        "bert.encoder.layer.0.attention.self.dropout:replace": ("bypassed", 0.15),
        "bert.encoder.layer.0.attention.output.dropout:replace": ("module", 0.2),
        "bert.encoder.layer.0.output.dropout:replace": ("module", 0.2),
        "dropout:replace": ("module", 0.2),  # the classifier's
    }
    for example in (None, {"input_ids": IDS}):
        rows = existing_dropout(net, example)
        assert {r.key: (r.kind, pytest.approx(r.p)) for r in rows} == expected
        assert {r.module_type for r in rows} == {"Dropout"}
    table = format_sites(describe(net, {"input_ids": IDS}))
    line = next(x for x in table.splitlines() if x.startswith("bert.encoder.layer.0.attention.self.dropout"))
    assert line.split() == [
        "bert.encoder.layer.0.attention.self.dropout:replace",
        "Dropout",
        "bypassed",
        "0.15",
    ]
    assert "dropout:replace" in table and "2x16" in table  # the classifier's input


# ----------------------------------------------------------------------------------------------------------
# 8. The recipes of docs/model-libraries.md: the doc's own model module and YAML, on tiny models
# ----------------------------------------------------------------------------------------------------------
DOC = Path(__file__).resolve().parents[1] / "docs" / "model-libraries.md"
TINY = {
    "bert": {
        "vocab_size": 99, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 32,
    },
    "vit": {
        "image_size": 16, "patch_size": 8, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 32,
    },
}  # fmt: skip


def _doc_blocks(lang: str) -> dict[str, str]:
    """The ``lang`` code blocks of the doc's recipes, by the file name on their first line (``# bert_fit.yaml``)."""
    text = DOC.read_text(encoding="utf-8").split("## Recipes")[1]
    blocks = re.findall(rf"```{lang}\n(# .*?)```", text, flags=re.DOTALL)
    return {block.split()[1].rstrip(":"): block for block in blocks}


@pytest.fixture
def hf_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The doc's ``hf_models.py``, importable as ``hf_models`` (as the recipes' ``class_path`` says)."""
    _transformers()
    (tmp_path / "hf_models.py").write_text(_doc_blocks("python")["hf_models.py"], encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hf_models", raising=False)
    yield importlib.import_module("hf_models")
    sys.modules.pop("hf_models", None)


def _recipe(name: str, hf_models: Any) -> tuple[dict[str, Any], L.LightningModule]:
    """The recipe's config, and its model built tiny from the config's own model arguments."""
    config = yaml.safe_load(_doc_blocks("yaml")[name])
    args = dict(config["model"]["init_args"])
    assert config["model"]["class_path"] == "hf_models.HFClassifier" and args.pop("pretrained")
    torch.manual_seed(0)
    return config, hf_models.HFClassifier(**args, config=TINY[args["model_type"]])


def _batch(module: L.LightningModule) -> dict[str, Tensor]:
    return {**module.example_input_array, "labels": torch.zeros(2, dtype=torch.long)}


def test_doc_has_the_four_recipes() -> None:
    assert set(_doc_blocks("yaml")) == {"bert_fit.yaml", "bert_tune.yaml", "vit_fit.yaml", "vit_tune.yaml"}
    assert set(_doc_blocks("python")) == {"hf_models.py"}


FIT_SITES = {
    "bert_fit.yaml": {
        **{k: ("standard", 0.1) for k in [
            "model.bert.encoder.layer.0.attention.self.dropout:replace",
            "model.bert.encoder.layer.1.attention.self.dropout:replace",
        ]},
        **{k: ("gaussian", 0.1) for k in [
            "model.bert.embeddings.dropout:replace", "model.dropout:replace",
            *(f"model.bert.encoder.layer.{i}.{m}.dropout:replace" for i in (0, 1) for m in ("attention.output", "output")),
        ]},
    },
    "vit_fit.yaml": {
        "model.vit.layers.0.dropout:replace": ("droppath", 0.0),
        "model.vit.layers.1.dropout:replace": ("droppath", 0.1),
        "model.vit.layers.0.attention.attention_dropout:attribute": ("standard", 0.1),
        "model.vit.layers.1.attention.attention_dropout:attribute": ("standard", 0.1),
    },
}  # fmt: skip


@pytest.mark.parametrize("name", list(FIT_SITES))
def test_fit_recipe_applies_to_a_tiny_model(name: str, hf_models: Any) -> None:
    config, module = _recipe(name, hf_models)
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_dropout.callback.DropoutInjector"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a recipe leaves nothing alone and warns of nothing
        plan = DropoutInjector(**callback["init_args"]).inject(module)
    assert {s.key: (s.variant, pytest.approx(s.p)) for s in plan} == FIT_SITES[name]
    module.train()
    loss = module.training_step(_batch(module), 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert module(**module.example_input_array).shape == (2, module.hparams.num_labels)


TUNE_GROUPS = {
    "bert_tune.yaml": {
        "attention": {f"model.bert.encoder.layer.{i}.attention.self.dropout" for i in (0, 1)},
        "hidden": {
            "model.bert.embeddings.dropout",
            *(f"model.bert.encoder.layer.{i}.{m}.dropout" for i in (0, 1) for m in ("attention.output", "output")),
        },
        "head": {"model.dropout"},
    },
    "vit_tune.yaml": {
        "depth": {f"model.vit.layers.{i}.dropout" for i in (0, 1)},
        "attention": {f"model.vit.layers.{i}.attention.attention_dropout" for i in (0, 1)},
        "embeddings": {"model.vit.embeddings.dropout"},
    },
}  # fmt: skip


@pytest.mark.parametrize("name", list(TUNE_GROUPS))
def test_tune_recipe_applies_to_a_tiny_model(name: str, hf_models: Any) -> None:
    from lightning_dropout.tune.checks import check_groups

    config, module = _recipe(name, hf_models)
    example = module.example_input_array
    groups = [SearchGroup(**g) for g in config["dropout"]["groups"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=r".*self\.log\(\)")  # training_step outside a Trainer
        check_groups(groups, module, example)  # what `tune` checks before trial 0: every variant has a site
        assert {g.name: set(g.targets(module, example)) for g in groups} == TUNE_GROUPS[name]
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(3):
            trial = study.ask()
            _, net = _recipe(name, hf_models)
            plan = suggest_plan(trial, groups, net, example)
            apply_plan(net, plan, example)
            assert {s.target for s in plan} == set().union(*TUNE_GROUPS[name].values())
            net.train()
            study.tell(trial, float(net.training_step(_batch(net), 0).detach()))


@pytest.mark.parametrize("name", ["bert_fit.yaml", "bert_tune.yaml", "vit_fit.yaml", "vit_tune.yaml"])
def test_recipe_is_a_valid_lightning_cli_config(name: str, hf_models: Any, tmp_path: Path) -> None:
    """Copy-paste works: LightningCLI (as `lightning-dropout fit|tune` loads it) parses and validates the file,
    the injector's rules and the search groups included (nothing is built, so nothing is downloaded)."""
    from lightning_dropout.config import load_config
    from lightning_dropout.tune.config import CONFIG_SECTIONS

    path = tmp_path / name
    your_data = "data:\n  class_path: lightning_dropout.data.MNIST1DDataModule\n"  # the doc: "add your data"
    path.write_text(_doc_blocks("yaml")[name] + your_data, encoding="utf-8")
    cli = load_config(["--config", str(path)], instantiate=False, sections=CONFIG_SECTIONS)
    config = cli.config
    assert config.model.class_path == "hf_models.HFClassifier"
    if "fit" in name:
        (callback,) = config.trainer.callbacks
        assert callback.class_path == "lightning_dropout.callback.DropoutInjector"
        assert len(callback.init_args.rules) == 2
    else:
        assert [g.name for g in config.dropout.groups] == list(TUNE_GROUPS[name])
