"""Config loading: typed overrides, clear errors, packaged configs whose every key is read, and
upstream's Hydra configs composed, mapped and trained from."""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import safe_open

from cycle_vae_impl.configs import config_path
from cycle_vae_impl.entrypoints.train_cycle_vae import CYCLE
from cycle_vae_impl.trainers.cycle_vae_trainer import CycleVAETrainer
from latentDLM_mmdit.config import ConfigError, load_config, resolve_config
from latentDLM_mmdit.factory import build_model
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.train_stable import STABLE
from latentDLM_mmdit.training import TrainingError, build_trainer, run_training
from tests.builders import TINY_OVERRIDES as TINY

ENTRIES = {"stable": STABLE, "cycle": CYCLE}

DATA = Path(__file__).parent / "data"
UPSTREAM = DATA / "upstream_configs" / "mmdit_stable_tiny.yaml"
TOKENIZER = DATA / "tokenizers" / "bert_tiny"


def test_packaged_configs_load():
    stable, cycle, cluster = (load_config(config_path(k)) for k in ("stable", "cycle", "cycle_cluster"))
    assert stable.loss.loss_type == "sequential"
    assert [(x.type, x.steps) for x in stable.training.sequential_schedule] == [("l2t", 1), ("t2l", 1)]
    assert cycle.loss.loss_type == "cycle_vae" and cycle.loss.latent_t_mode == "full"
    # Same model and tokenizer: a stable checkpoint initialises the cycle trainer.
    assert OmegaConf.to_container(stable.model) == OmegaConf.to_container(cycle.model)
    assert OmegaConf.to_container(stable.tokenizer) == OmegaConf.to_container(cycle.tokenizer)
    assert (cluster.model.hidden_size, cluster.model.n_blocks, cluster.model.max_seq_len) == (1024, 24, 4096)
    assert (cluster.tokenizer.vocab_size, cluster.tokenizer.mask_token_id) == (30522, 103)
    assert (cluster.optimizer.lr, cluster.optimizer.grad_clip_norm, cluster.training.dtype) == (5e-5, 0.5, "bf16")
    assert (cluster.loss.cycle_text_ramp_steps, cluster.loss.cycle_latent_weight) == (2000, 0.1)
    # The cluster config's file has exactly the tiny cycle config's keys.
    assert _leaves(OmegaConf.load(config_path("cycle_cluster"))) == _leaves(OmegaConf.load(config_path("cycle")))
    with pytest.raises(Exception, match="nonexistent"):
        _ = stable.training.nonexistent  # struct mode: a typo in code fails loudly


def test_overrides_are_typed():
    overrides = [
        "training.num_train_steps=7",
        "optimizer.lr=2",
        "optimizer.eps=1e-6",
        "model.qk_rmsnorm=FALSE",
        "logging.run_name=007",
        "data.token_dir=",
        "training.sequential_schedule=[{type: t2l, steps: 2}]",
        "training.sequential_schedule.0.steps=3",
    ]
    given = list(overrides)
    cfg = load_config(config_path("stable"), overrides)
    assert overrides == given  # not modified
    assert cfg.training.num_train_steps == 7 and isinstance(cfg.training.num_train_steps, int)
    assert cfg.optimizer.lr == 2.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.eps == 1e-6
    assert cfg.model.qk_rmsnorm is False
    assert cfg.logging.run_name == "007" and cfg.data.token_dir == ""
    assert [(x.type, x.steps) for x in cfg.training.sequential_schedule] == [("t2l", 3)]
    assert load_config(config_path("stable")).training.num_train_steps == 40  # file untouched


def test_unknown_key_names_key_and_file():
    path = config_path("cycle")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["loss.cycle_txt_weight=0.2"])
    assert "loss.cycle_txt_weight" in str(info.value) and str(path) in str(info.value)
    assert "nearest valid key: 'loss.cycle_text_weight'" in str(info.value)
    with pytest.raises(ConfigError, match="'nosection.key'.*valid root keys: data, latent_beta_schedule"):
        load_config(path, ["nosection.key=1"])
    with pytest.raises(ConfigError, match="training.seed is a value, not a section"):
        load_config(path, ["training.seed.x=1"])
    with pytest.raises(ConfigError, match=r"sequential_schedule is not in the config, so it has no item 0"):
        load_config(path, ["training.sequential_schedule.0.steps=3"])
    with pytest.raises(ConfigError, match=r"sequential_schedule is a list of 2 item\(s\)"):
        load_config(config_path("stable"), ["training.sequential_schedule.2.steps=3"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("training.seed=1.5", "expected an int, got '1.5'"),
        ("training.seed=true", "expected an int"),
        ("optimizer.lr=fast", "expected a float, got 'fast'"),
        ("optimizer.lr=true", "expected a float"),
        ("model.qk_rmsnorm=1", "expected a bool"),
        ("model.qk_rmsnorm=yes", "expected a bool"),
        ("training.seed=null", "null is not allowed"),
        ("logging.run_name=null", "null is not allowed"),
        ("training.sequential_schedule=l2t", "expected a list"),
        ("model=3", "is a section"),
        ("training.seed", "key.path=value"),
    ],
)
def test_wrong_type_names_key_type_and_value(override, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(config_path("stable"), [override])
    assert override.split("=")[0] in str(info.value)


def test_null_only_where_default_is_null(tmp_path):
    path = config_path("cycle")
    assert load_config(path, ["tokenizer.path=null"]).tokenizer.path is None
    assert load_config(path, ["tokenizer.vocab_size=null"]).tokenizer.vocab_size is None
    assert load_config(path, ["tokenizer.vocab_size=65"]).tokenizer.vocab_size == 65  # typed by the schema
    with pytest.raises(ConfigError, match="expected an int"):
        load_config(path, ["tokenizer.vocab_size=[1, 2]"])
    with pytest.raises(ConfigError, match="null is not allowed"):
        load_config(path, ["training.warmup_steps=~"])


def test_an_override_may_add_a_schema_key_the_file_lacks(tmp_path):
    data = yaml.safe_load(config_path("cycle").read_text())
    del data["data"]["synthetic_seq_len"], data["loss"]["cycle_text_weight"]
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(data))
    resolved = resolve_config(path, ["data.synthetic_seq_len=12"])
    assert resolved.config.data.synthetic_seq_len == 12 and resolved.sources["data.synthetic_seq_len"] == "override"
    assert resolved.config.loss.cycle_text_weight == 0.1 and resolved.sources["loss.cycle_text_weight"] == "default"


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown packaged cycle config"):
        config_path("huge")


def test_trainer_classes_follow_the_config(tmp_path):
    stable = load_config(config_path("stable"), TINY)
    cycle = load_config(config_path("cycle"), TINY)
    assert (
        type(build_trainer(stable, MultimodalDiffusionTrainer, build_model(stable, seed=0)))
        is MultimodalDiffusionTrainer
    )
    assert type(build_trainer(cycle, CycleVAETrainer, build_model(cycle, seed=0))) is CycleVAETrainer
    with pytest.raises(TrainingError, match="cycle_vae"):
        run_training(stable, trainer=CYCLE, output_dir=tmp_path, synthetic=True, progress=False, device="cpu")


# -- every key is read ---------------------------------------------------------------------------
def _leaves(node: DictConfig, prefix: str = "") -> set[str]:
    out = set()
    for key in node:
        child = node._get_node(key)
        out |= _leaves(child, f"{prefix}{key}.") if isinstance(child, DictConfig) else {f"{prefix}{key}"}
    return out


@contextmanager
def recorded_reads():
    """Records every key read from any DictConfig by code outside omegaconf and the schema's
    validation (which looks at every key to check it, and uses none)."""
    reads: set[str] = set()
    originals = {name: getattr(DictConfig, name) for name in ("__getattr__", "__getitem__", "get", "__contains__")}

    def wrap(original):
        def reader(self, key, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if not caller.startswith(("omegaconf", "latentDLM_mmdit.settings")):
                try:
                    reads.add(self._get_full_key(key))
                except (OmegaConfBaseException, KeyError, TypeError):  # not a config key omegaconf can name
                    pass
            return original(self, key, *args, **kwargs)

        return reader

    for name, original in originals.items():
        setattr(DictConfig, name, wrap(original))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(DictConfig, name, original)


@pytest.mark.parametrize(
    "kind, trainer_kind, extra",
    [
        ("stable", "stable", []),
        ("cycle", "cycle", []),
        # Upstream sizes are too big for a test: same keys, tiny values (bf16 and the BERT vocabulary stay).
        (
            "cycle_cluster",
            "cycle",
            ["model.max_seq_len=32", "data.synthetic_seq_len=16", "data.synthetic_num_samples=8"],
        ),
    ],
)
def test_every_packaged_key_is_read(tmp_path, kind, trainer_kind, extra):
    config = load_config(config_path(kind), TINY + ["training.num_train_steps=1"] + extra)
    leaves = _leaves(OmegaConf.load(config_path(kind)))  # the keys the file writes
    with recorded_reads() as reads:
        result = run_training(
            config, trainer=ENTRIES[trainer_kind], output_dir=tmp_path, synthetic=True, progress=False, device="cpu"
        )
    assert result.final_step == 1 and torch.isfinite(torch.tensor(result.metrics[0]["loss"]))
    # optimizer.name has one valid value (adamw), which the schema checks; the loop always builds AdamW.
    assert leaves - reads == {"optimizer.name"}
    # A key nobody reads is caught: the recorder does see a read of every other key.
    assert {"loss.latent_loss_weight", "model.qk_rmsnorm", "logging.save_every"} <= reads


# -- upstream's Hydra configs ------------------------------------------------------------------------
def _upstream(overrides=(), tokenizer_dir=TOKENIZER):
    return resolve_config(UPSTREAM, list(overrides), tokenizer_dir=tokenizer_dir)


def test_upstream_hydra_config_gives_the_values_upstream_used():
    """The defaults list is merged (optimizer.type and betas come from the optimizer group, the file's
    _self_ wins where both set a key), interpolations are resolved, upstream's names map onto ours."""
    resolved = _upstream()
    cfg = resolved.config
    # upstream's get_optimizer: AdamW(betas=optimizer.betas of the group), eps/weight_decay merged (_self_ last)
    assert (cfg.optimizer.name, cfg.optimizer.beta1, cfg.optimizer.beta2) == ("adamw", 0.9, 0.99)
    assert (cfg.optimizer.eps, cfg.optimizer.weight_decay, cfg.optimizer.lr, cfg.optimizer.grad_clip_norm) == (
        1e-8,
        0.01,
        5e-5,
        0.5,
    )
    assert resolved.sources["optimizer.beta2"] == "upstream key optimizer.betas"
    # logging group merged, the file's values win; upstream's names are ours
    assert (cfg.logging.run_name, cfg.logging.log_every, cfg.logging.save_every, cfg.logging.log_dir) == (
        "tiny-l2t-stable",
        1,
        1000,
        "/cluster/checkpoints",
    )
    assert cfg.data.token_dir == "/cluster/datasets/tiny-latents/tokens/train"  # ${data.data_dir} resolved
    assert (cfg.model.hidden_size, cfg.model.latent_dim, cfg.loss.loss_type, cfg.training.seed) == (32, 8, "l2t", 7)
    assert (cfg.tokenizer.vocab_size, cfg.tokenizer.mask_token_id, cfg.tokenizer.pad_token_id) == (32, 4, 0)
    unused = {u.key: u for u in resolved.unused}
    assert unused["optimizer.beta2"].value == 0.95 and "never read beta1/beta2" in unused["optimizer.beta2"].reason
    assert unused["hydra.run.dir"].value == "/cluster/checkpoints/tiny-l2t-stable"  # resolved against the config
    assert unused["data.tokenizer_path"].value == "/cluster/tokenizers/bert-tiny"
    for key in (
        "logging.wandb_project",
        "logging.eval_freq",
        "training.num_epochs",
        "model.n_heads",
        "model.type",
        "loss.loss_scale",
        "tokenizer.cache_dir",
        "data.data_files.train",
    ):
        assert key in unused and unused[key].reason
    # Nothing dropped silently: every leaf of the composed file is mapped, listed unused, or the vocabulary.
    composed = {"optimizer.type", "optimizer.betas", "optimizer.beta1", "optimizer.beta2"} | set(
        _leaves(OmegaConf.load(UPSTREAM)) - {"defaults"}
    )
    mapped = {k for k, v in resolved.sources.items() if v != "default"} | {
        v.removeprefix("upstream key ") for v in resolved.sources.values() if v.startswith("upstream key")
    }
    assert {k for k in composed if not k.startswith("defaults")} <= mapped | set(unused)
    assert any("gradient_accumulation_steps=2 is used here" in n for n in resolved.notes)


def test_upstream_config_overrides_use_upstreams_names_and_group_options():
    cfg = _upstream(
        [
            "logging.save_freq=5",
            "logging.log_every=3",
            "optimizer.betas=[0.8, 0.9]",
            "data.synthetic_seq_len=16",
            "logging.eval_freq=7",
        ]
    ).config
    assert (cfg.logging.save_every, cfg.logging.log_every, cfg.optimizer.beta1, cfg.optimizer.beta2) == (5, 3, 0.8, 0.9)
    assert cfg.data.synthetic_seq_len == 16
    with pytest.raises(ConfigError, match="override optimizer.betas=\\[beta1, beta2\\] instead"):
        _upstream(["optimizer.beta2=0.999"])
    with pytest.raises(ConfigError, match="optimizer.type='psgd' is not supported here"):
        _upstream(["optimizer=psgd"])  # another option of the group, composed by Hydra
    with pytest.raises(ConfigError, match="nearest valid key: 'logging.save_every'"):
        _upstream(["logging.save_evry=5"])


def test_a_typo_in_an_override_is_named_as_the_override_not_as_the_file():
    """The file is fine; the command line's key is not: the message must send the user there."""
    with pytest.raises(ConfigError) as info:
        load_config(config_path("stable"), ["training.num_trian_steps=2"])
    message = str(info.value)
    assert message.startswith(
        "unknown config key 'training.num_trian_steps' in the override 'training.num_trian_steps=2' (applied to "
    ), message
    assert "nearest valid key: 'training.num_train_steps'" in message


def test_upstream_config_without_a_tokenizer_folder_names_what_to_pass():
    with pytest.raises(ConfigError) as info:
        _upstream(tokenizer_dir=None)
    message = str(info.value)
    assert "tokenizer.path /cluster/tokenizers/bert-tiny does not exist" in message
    assert "--tokenizer DIR" in message and "tokenizer.vocab_size=N" in message and str(UPSTREAM) in message
    explicit = _upstream(
        ["tokenizer.vocab_size=40", "tokenizer.mask_token_id=39", "tokenizer.pad_token_id=0"], tokenizer_dir=None
    ).config
    assert (explicit.tokenizer.vocab_size, explicit.tokenizer.mask_token_id) == (40, 39)


def test_hydra_problems_are_config_errors(tmp_path):
    lonely = tmp_path / "mmdit_stable_tiny.yaml"
    lonely.write_text(UPSTREAM.read_text())  # without its logging/ and optimizer/ groups
    with pytest.raises(ConfigError, match=f"cannot compose {lonely} with Hydra .*looked up in {tmp_path}"):
        resolve_config(lonely, tokenizer_dir=TOKENIZER)
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  - _self_\nlogging:\n  run_name: ${nope.missing}\n")
    with pytest.raises(ConfigError, match="cannot resolve an interpolation"):
        resolve_config(bad)


@pytest.mark.parametrize("entry, extra", [(STABLE, []), (CYCLE, ["loss.loss_type=cycle_vae"])], ids=["stable", "cycle"])
def test_entry_point_trains_two_steps_on_the_upstream_shaped_config(tmp_path, capsys, caplog, entry, extra):
    from latentDLM_mmdit.training import cli_main

    caplog.set_level("INFO", logger="latentDLM_mmdit.training")
    out = tmp_path / "run"
    code = cli_main(
        entry,
        [
            "--config",
            str(UPSTREAM),
            "--synthetic",
            "--tokenizer",
            str(TOKENIZER),
            "--no-progress",
            "--device",
            "cpu",
            "--output-dir",
            str(out),
        ]
        + extra,
    )
    assert code == 0, capsys.readouterr().err
    logged = caplog.text  # what was defaulted and what is not used is said, not dropped
    assert re.search(
        r"upstream keys accepted, not used here \(no wandb here: every step goes to metrics.jsonl\): "
        r"[^\n]*logging.wandb_project='tiny-project'",
        logged,
    )
    assert "from the schema defaults: " in logged and "data.synthetic_seq_len=24" in logged
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    saved = OmegaConf.load(out / "config.yaml")
    assert (saved.tokenizer.vocab_size, saved.optimizer.beta2, saved.training.gradient_accumulation_steps) == (
        32,
        0.99,
        2,
    )
    with safe_open(str(out / "checkpoints" / "step_00000002.safetensors"), "pt") as handle:
        assert handle.get_slice("text_encoder.token_embed.weight").get_shape() == [32, 32]  # V from the folder
