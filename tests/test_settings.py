"""The settings schema: unknown keys name the nearest valid key, types and ranges are checked, every
default is stated in the schema and recorded where it was taken, and the trainers, the model, the
loop and the compat harness all read settings through it."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from compat.harness import CompatContext
from compat.subjects import Subject
from compat.trainer_spec import TrainerSpec
from cycle_vae_impl.configs import config_path
from cycle_vae_impl.trainers.cycle_vae_trainer import CycleVAETrainer
from latentDLM_mmdit.config import (
    ConfigError,
    load_config,
    resolve_config,
    with_updates,
)
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.factory import DTYPES, build_model, dtype_from_config
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT, model_settings
from latentDLM_mmdit.settings import (
    ALIASES,
    DTYPE_NAMES,
    UPSTREAM_PROFILE,
    UPSTREAM_UNUSED,
    LossSettings,
    schema_keys,
    validate_settings,
)
from latentDLM_mmdit.settings import validation as settings_validation
from latentDLM_mmdit.training import LoopSettings, TrainingError, build_trainer
from tests.builders import TINY_VOCAB, tiny_model

VOCAB = TINY_VOCAB
MODEL = {"hidden_size": 32, "n_blocks": 1, "cond_dim": 32, "max_seq_len": 16}


def _cycle_yaml(tmp_path, edit) -> str:
    """The packaged tiny cycle config as a dict, edited by `edit(dict)`, written to a file."""
    data = yaml.safe_load(config_path("cycle").read_text())
    edit(data)
    path = tmp_path / "cycle.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _model() -> MultimodalMMDiT:
    return tiny_model(0, vocab_size=len(VOCAB), latent_dim=8, base=MODEL)  # MODEL as users write it: streams left out


# -- unknown keys ----------------------------------------------------------------------------------
def test_a_typo_in_a_yaml_key_names_the_key_the_file_and_the_nearest_key(tmp_path):
    path = _cycle_yaml(tmp_path, lambda d: d["loss"].update(cycle_text_weigth=d["loss"].pop("cycle_text_weight")))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "'loss.cycle_text_weigth'" in message and path in message
    assert "nearest valid key: 'loss.cycle_text_weight'" in message
    assert load_config(config_path("cycle")).loss.cycle_text_weight == 0.1  # the correct spelling loads


def test_a_key_in_the_wrong_section_points_to_its_section(tmp_path):
    path = _cycle_yaml(tmp_path, lambda d: d["training"].update(latent_loss_weight=0.2))
    with pytest.raises(ConfigError, match="nearest valid key: 'loss.latent_loss_weight'"):
        load_config(path)


def test_every_problem_of_a_file_is_reported_at_once(tmp_path):
    """Unknown keys and wrong types in one pass, then every range: not one error per run."""
    with pytest.raises(ConfigError) as info:
        load_config(_cycle_yaml(tmp_path, lambda d: d["loss"].update(cycle_text_weigth=0.1, ramp="x")))
    assert "2 problems" in str(info.value) and "cycle_text_weigth" in str(info.value) and "loss.ramp" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(
            _cycle_yaml(
                tmp_path, lambda d: (d["optimizer"].update(lr=float("inf")), d["loss"].update(cycle_latent_weight=-0.5))
            )
        )
    assert (
        "2 problems" in str(info.value)
        and "optimizer.lr" in str(info.value)
        and "cycle_latent_weight" in str(info.value)
    )


# -- types and ranges ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "section, key, text, expected",
    [
        ("optimizer", "lr", ".inf", "optimizer.lr=inf must be a finite number > 0"),
        ("optimizer", "lr", ".nan", "optimizer.lr=nan must be a finite number > 0"),
        ("optimizer", "lr", "0.0", "optimizer.lr=0.0 must be a finite number > 0"),
        ("optimizer", "lr", "-1.0e-4", "must be a finite number > 0"),
        ("loss", "cycle_text_weight", "-0.1", "loss.cycle_text_weight=-0.1 must be a finite number >= 0"),
        ("loss", "cycle_latent_weight", ".nan", "loss.cycle_latent_weight=nan must be a finite number >= 0"),
        ("loss", "latent_loss_weight", ".inf", "loss.latent_loss_weight=inf must be a finite number >= 0"),
        ("loss", "cycle_latent_t_min", "0.98", "0 <= t_min < t_max <= 1"),
        ("loss", "cycle_latent_t_max", "1.5", "0 <= t_min < t_max <= 1"),
        ("loss", "cycle_text_ramp_steps", "-1", "loss.cycle_text_ramp_steps=-1 must be >= 0"),
        ("loss", "latent_t_mode", "ful", "did you mean 'full'"),
        ("loss", "cycle_latent_sampling", "topk", "valid: argmax, categorical"),
        ("loss", "loss_type", "cycle", "valid: l2t, t2l, unconditional, sequential, random, cycle_vae"),
        ("model", "latent_parameterization", "v", "valid: epsilon, x0, v_param"),
        ("model", "latent_beta_schedule", "cosin", "did you mean 'cosine'"),
        ("training", "dtype", "bf32", "valid: fp32"),
        ("model", "hidden_size", "'64'", "model.hidden_size: expected an int, got '64'"),
        ("loss", "cycle_stop_grad_latent", "1", "expected a bool"),
        ("logging", "run_name", "7", "expected a string, got 7 (quote it in YAML)"),
        ("training", "seed", "null", "training.seed: null is not allowed"),
    ],
)
def test_bad_values_in_a_file_fail_naming_key_and_value(tmp_path, section, key, text, expected):
    value = yaml.safe_load(text)
    with pytest.raises(ConfigError) as info:
        load_config(_cycle_yaml(tmp_path, lambda d: d[section].update({key: value})))
    assert expected in str(info.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer.lr=inf", "optimizer.lr=inf (from override) must be a finite number > 0"),
        ("optimizer.lr=.nan", "must be a finite number > 0"),
        ("loss.cycle_text_weight=-1", "loss.cycle_text_weight=-1.0 (from override) must be a finite number >= 0"),
        ("loss.cycle_latent_t_min=0.99", "0 <= t_min < t_max <= 1"),
    ],
)
def test_bad_values_in_overrides_fail(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(config_path("cycle"), [override])


def test_tokenizer_ids_are_checked_against_each_other():
    with pytest.raises(ConfigError, match=r"tokenizer.mask_token_id=64 is outside the vocabulary"):
        load_config(config_path("stable"), ["tokenizer.mask_token_id=64"])
    with pytest.raises(ConfigError, match="are both 0"):
        load_config(config_path("stable"), ["tokenizer.mask_token_id=0"])


# -- defaults --------------------------------------------------------------------------------------
def test_a_missing_cycle_key_takes_the_recommended_default_and_the_resolved_config_records_it(tmp_path):
    def drop(d):
        for key in ("cycle_text_weight", "latent_t_mode", "cycle_latent_ramp_steps"):
            del d["loss"][key]

    resolved = resolve_config(_cycle_yaml(tmp_path, drop))
    loss = resolved.config.loss
    assert (loss.cycle_text_weight, loss.latent_t_mode, loss.cycle_latent_ramp_steps) == (0.1, "full", 2000)
    for key in ("loss.cycle_text_weight", "loss.latent_t_mode", "loss.cycle_latent_ramp_steps"):
        assert resolved.sources[key] == "default"
        assert key in resolved.defaulted
    assert resolved.sources["loss.cycle_latent_weight"] == "file"  # what the file gives is recorded as such
    assert "loss.cycle_text_weight=0.1" in resolved.summary()[0]
    trainer = CycleVAETrainer(_model(), VOCAB, MaskedDiffusion(VOCAB), torch.float32, resolved.config)
    assert trainer.weights["cycle_text"] == (0.1, 2, 20) and trainer.latent_t_mode == "full"


def test_profile_upstream_gives_upstreams_defaults_to_left_out_cycle_keys_only(tmp_path):
    def upstream(d):
        d["profile"] = "upstream"
        for key in ("cycle_text_weight", "cycle_text_ramp_steps", "cycle_latent_weight", "latent_t_mode"):
            del d["loss"][key]

    resolved = resolve_config(_cycle_yaml(tmp_path, upstream))
    loss = resolved.config.loss
    assert (loss.cycle_text_weight, loss.cycle_text_ramp_steps, loss.cycle_latent_weight, loss.latent_t_mode) == (
        1.0,
        0,
        0.0,
        "random",
    )
    assert resolved.sources["loss.cycle_text_weight"] == "profile upstream"
    assert loss.cycle_latent_ramp_steps == 12  # given by the file: the profile does not replace it
    recommended = resolve_config(config_path("cycle"), ["profile=recommended"]).config.loss
    assert recommended.cycle_text_weight == 0.1


def test_the_schema_states_the_reviews_recommendations_and_the_profile_names_schema_keys():
    recommended = LossSettings(loss_type="cycle_vae")
    assert (
        recommended.latent_t_mode,
        recommended.cycle_text_weight,
        recommended.cycle_latent_weight,
        recommended.cycle_stop_grad_latent,
    ) == ("full", 0.1, 0.1, True)
    assert recommended.cycle_text_ramp_steps > 0 and recommended.cycle_latent_ramp_steps > 0
    keys = schema_keys()
    assert all(key in keys and not keys[key].is_section for key in UPSTREAM_PROFILE)
    assert all(target in keys for target, _ in ALIASES.values())
    assert not set(UPSTREAM_UNUSED) & set(keys)  # an upstream key is either mapped or unused, never both


def test_upstream_values_read_as_upstream_read_them():
    """multimodal_mdlm (upstream's mmdit.yaml) fell through to unconditional in upstream's stable
    trainer; save_every 0 meant no periodic checkpoint in upstream's cycle script."""
    resolved = validate_settings({"loss": {"loss_type": "multimodal_mdlm"}}, "x")
    assert resolved.config.loss.loss_type == "unconditional"
    assert any("multimodal_mdlm" in note and "unconditional" in note for note in resolved.notes)
    with pytest.raises(ConfigError, match="did you mean 'unconditional'"):
        validate_settings({"loss": {"loss_type": "unconditionl"}}, "x")  # other values stay errors
    settings = LoopSettings.from_config(load_config(config_path("cycle"), ["logging.save_every=0"]))
    assert settings.save_every == settings.num_train_steps == 40


def test_every_dtype_of_the_schema_maps_to_a_torch_dtype():
    assert set(DTYPES) == set(DTYPE_NAMES)


def test_the_loop_names_every_missing_required_key_at_once():
    config = OmegaConf.to_container(load_config(config_path("stable")))
    del config["training"]["train_batch_size"], config["training"]["num_train_steps"], config["optimizer"]["lr"]
    with pytest.raises(TrainingError) as info:
        LoopSettings.from_config(config)
    assert all(k in str(info.value) for k in ("training.train_batch_size", "training.num_train_steps", "optimizer.lr"))


# -- the readers validate --------------------------------------------------------------------------
def test_trainers_and_model_validate_the_config_they_are_given():
    with pytest.raises(ConfigError, match="nearest valid key: 'loss.latent_loss_weight'"):
        MultimodalDiffusionTrainer(
            _model(),
            VOCAB,
            MaskedDiffusion(VOCAB),
            torch.float32,
            {"loss": {"loss_type": "l2t", "latent_loss_wieght": 0.2}},
        )
    with pytest.raises(ConfigError, match="nearest valid key: 'loss.cycle_text_weight'"):
        CycleVAETrainer(
            _model(),
            VOCAB,
            MaskedDiffusion(VOCAB),
            torch.float32,
            {"loss": {"loss_type": "cycle_vae", "cycle_txt_weight": 0.2}},
        )
    with pytest.raises(ConfigError, match="needs loss.loss_type"):
        CycleVAETrainer(_model(), VOCAB, MaskedDiffusion(VOCAB), torch.float32, {"loss": {}})
    with pytest.raises(ValueError, match="nearest valid key: 'model.hidden_size'"):
        MultimodalMMDiT(dict(MODEL, hidden_szie=32), vocab_size=16, latent_dim=8)
    with pytest.raises(ValueError, match="model.dropout=1.5 must be in"):
        MultimodalMMDiT(dict(MODEL, dropout=1.5), vocab_size=16, latent_dim=8)
    config = {"loss": {"loss_type": "l2t"}}
    MultimodalDiffusionTrainer(_model(), VOCAB, MaskedDiffusion(VOCAB), torch.float32, config)
    assert config == {"loss": {"loss_type": "l2t"}}  # only read


def test_an_upstream_config_object_is_accepted_by_the_constructors_as_upstream_passed_it():
    """Upstream built Trainer(model, tokenizer, schedule, dtype, config) and MultimodalMMDiT(config.model, ...)
    from the composed config, its unused keys included."""
    config = OmegaConf.create(
        {
            "model": dict(MODEL, type="multimodal_mmdit", n_heads=24, p_uniform=0.0),
            "loss": {"loss_type": "t2l", "loss_scale": 1.0, "reduction": "tokenmean"},
            "training": {"seed": 3, "num_epochs": 10, "compile_model": False},
        }
    )
    model = MultimodalMMDiT(config.model, vocab_size=16, latent_dim=8)
    trainer = MultimodalDiffusionTrainer(model, VOCAB, MaskedDiffusion(VOCAB), torch.float32, config)
    assert trainer.loss_type == "t2l" and trainer.settings.training.seed == 3
    with pytest.raises(ConfigError, match="loss.loss_scale=2.0 changes training upstream"):
        MultimodalDiffusionTrainer(
            model, VOCAB, MaskedDiffusion(VOCAB), torch.float32, {"loss": {"loss_type": "t2l", "loss_scale": 2.0}}
        )


def test_validation_of_a_validated_config_changes_nothing():
    once = validate_settings(load_config(config_path("cycle")), "x").config
    twice = validate_settings(once, "x").config
    assert OmegaConf.to_container(once) == OmegaConf.to_container(twice)


# -- validated once, where a config enters ---------------------------------------------------------
@pytest.fixture
def validations(monkeypatch):
    """Counts full validations (what the sealed fast path skips)."""
    calls: list[str] = []
    real = settings_validation._validated

    def counting(config, source, given_sources):
        calls.append(source)
        return real(config, source, given_sources)

    monkeypatch.setattr(settings_validation, "_validated", counting)
    return calls


def test_a_loaded_config_is_validated_once_and_readers_take_it_as_it_is(validations):
    config = load_config(config_path("cycle"))
    assert OmegaConf.is_readonly(config)
    entered = len(validations)
    model = build_model(config, seed=0)
    assert dtype_from_config(config) is torch.float32
    trainer = CycleVAETrainer(model, VOCAB, MaskedDiffusion(VOCAB), torch.float32, config)
    LoopSettings.from_config(config)
    assert validations[entered:] == [], f"readers validated the sealed config again: {validations[entered:]}"
    assert trainer.settings is config  # the trainer holds the very object, not a copy
    with pytest.raises(ReadonlyConfigError):
        config.loss.cycle_text_weight = 5.0
    changed = with_updates(config, {"loss.cycle_text_weight": 0.5}, "test")
    assert (changed.loss.cycle_text_weight, config.loss.cycle_text_weight) == (0.5, 0.1)


def test_the_resolution_a_config_was_sealed_with_reaches_its_readers():
    config = load_config(config_path("cycle"), ["loss.cycle_text_weight=0.25"])
    resolved = validate_settings(config, "a reader", shared=True)
    assert resolved.config is config and resolved.source == "a reader"
    assert resolved.sources["loss.cycle_text_weight"] == "override" and resolved.sources["training.seed"] != "override"


@pytest.mark.parametrize(
    "unvalidated",
    [
        pytest.param(lambda c: OmegaConf.merge(c, {"loss": {"cycle_text_weight": -1.0}}), id="merged"),
        pytest.param(lambda c: _unlocked(copy.deepcopy(c)), id="deep-copied"),
        pytest.param(lambda c: _unlocked(c), id="section-unlocked"),
        pytest.param(lambda c: OmegaConf.to_container(_unlocked(c), resolve=True), id="as-a-dict"),
    ],
)
def test_anything_but_the_sealed_object_is_validated_where_it_enters(unvalidated):
    """A merge, a copy, a plain dict, or the sealed config itself after a section was unlocked and
    changed: each reaches a trainer as a new input and is validated there (here: refused)."""
    config = unvalidated(load_config(config_path("cycle")))
    with pytest.raises(ConfigError, match="cycle_text_weight=-1.0"):
        CycleVAETrainer(_model(), VOCAB, MaskedDiffusion(VOCAB), torch.float32, config)


def _unlocked(config):
    OmegaConf.set_readonly(config.loss, False)
    config.loss.cycle_text_weight = -1.0
    return config


def test_the_model_takes_the_model_section_of_a_sealed_config_as_it_is(validations):
    config = load_config(config_path("cycle"))
    entered = len(validations)
    model_settings(config.model)
    assert validations[entered:] == []
    with pytest.raises(ValueError, match="latent_dim"):  # only the model section passes as a model config
        model_settings(config.training)
    OmegaConf.set_readonly(config.model, False)
    entered = len(validations)
    model_settings(config.model)  # unlocked: validated again, as any mapping
    assert validations[entered:] == ["the model config given to MultimodalMMDiT"]


def test_sealed_configs_are_forgotten_with_their_objects():
    gc.collect()
    before = len(settings_validation._SEALED), len(settings_validation._SEALED_SECTIONS)
    configs = [with_updates(load_config(config_path("cycle")), {"training.seed": i}, "test") for i in range(3)]
    assert len(settings_validation._SEALED) >= before[0] + 3
    del configs
    gc.collect()
    assert (len(settings_validation._SEALED), len(settings_validation._SEALED_SECTIONS)) == before


class _WritesItsConfig(torch.nn.Module):
    """A trainer as upstream's protocol allows one: it writes to the config it is handed."""

    def __init__(self, model, tokenizer, text_noise_schedule, dtype, config):
        super().__init__()
        config.loss.cycle_text_weight = 0.75
        self.model, self.config = model, config

    def forward(self, batch):
        raise NotImplementedError("built, never run")


def test_a_trainer_that_writes_its_config_gets_its_own_copy_and_ours_the_sealed_config(validations):
    """Upstream's protocol hands a trainer a config it may write to: the gate and the loop hand such
    a class a writable copy; a class declaring READS_CONFIG_ONLY (ours) gets the sealed config itself."""
    config, model = load_config(config_path("cycle")), _model()
    entered = len(validations)
    for build in (
        lambda cls: Subject(TrainerSpec.of(cls), "cycle").build(model, VOCAB, torch.float32, config),
        lambda cls: build_trainer(config, cls, model),
    ):
        writer = build(_WritesItsConfig)
        assert writer.config is not config and writer.config.loss.cycle_text_weight == 0.75
        assert config.loss.cycle_text_weight == 0.1  # the sealed config is untouched
        assert build(CycleVAETrainer).settings is config
    assert validations[entered:] == []


# -- the compat harness ----------------------------------------------------------------------------
def _with_loss(config, overrides):
    ctx = object.__new__(CompatContext)
    ctx.row_configs = {}  # the only instance state it reads
    return CompatContext._with_loss(ctx, config, overrides)


def test_compat_row_configs_are_built_once_per_context(validations):
    ctx = object.__new__(CompatContext)
    ctx.row_configs = {}
    base = load_config(config_path("cycle"))
    first = CompatContext._with_loss(ctx, base, {"cycle_text_weight": 0.5})
    entered = len(validations)
    assert CompatContext._with_loss(ctx, base, {"cycle_text_weight": 0.5}) is first
    assert validations[entered:] == []
    other = CompatContext._with_loss(ctx, base, {"cycle_text_weight": 0.25})
    assert other.loss.cycle_text_weight == 0.25 and first.loss.cycle_text_weight == 0.5


def test_compat_row_overrides_refuse_a_typo():
    base = load_config(config_path("cycle"))
    with pytest.raises(ConfigError) as info:
        _with_loss(base, {"cycle_text_wieght": 0.1})
    assert "'loss.cycle_text_wieght'" in str(info.value) and "nearest valid key: 'loss.cycle_text_weight'" in str(
        info.value
    )
    with pytest.raises(ConfigError, match="cycle_text_weight=-1.0"):
        _with_loss(base, {"cycle_text_weight": -1.0})
    updated = _with_loss(base, {"cycle_text_weight": 0.5, "training.dtype": "bf16", "logging.save_freq": 7})
    assert (updated.loss.cycle_text_weight, updated.training.dtype, updated.logging.save_every) == (0.5, "bf16", 7)
    assert base.loss.cycle_text_weight == 0.1  # the base is only read


def test_compat_row_overrides_keep_a_root_latent_spelling_in_step():
    base = with_updates(load_config(config_path("cycle")), {"latent_parameterization": "v_param"}, "test")
    updated = _with_loss(base, {"model.latent_parameterization": "epsilon"})
    assert (updated.model.latent_parameterization, updated.latent_parameterization) == ("epsilon", "epsilon")
