"""Config loading: typed overrides, clear errors, and packaged configs whose every key is read."""
from __future__ import annotations

import sys
from contextlib import contextmanager

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from cycle_vae_impl.trainers.cycle_vae_trainer import CycleVAETrainer
from cycle_vae_impl.configs import config_path
from latentDLM_mmdit.config import ConfigError, load_config
from latentDLM_mmdit.factory import build_model
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.training import TrainingError, build_trainer, run_training
from cycle_vae_impl.entrypoints.train_cycle_vae import CYCLE
from latentDLM_mmdit.train_stable import STABLE

ENTRIES = {"stable": STABLE, "cycle": CYCLE}

TINY = ["model.n_blocks=1", "model.hidden_size=32", "model.cond_dim=32"]


def test_packaged_configs_load():
    stable, cycle, cluster = (load_config(config_path(k)) for k in ("stable", "cycle", "cycle_cluster"))
    assert stable.loss.loss_type == "sequential"
    assert [dict(x) for x in stable.training.sequential_schedule] == [{"type": "l2t", "steps": 1}, {"type": "t2l", "steps": 1}]
    assert cycle.loss.loss_type == "cycle_vae" and cycle.loss.latent_t_mode == "full"
    # Same model and tokenizer: a stable checkpoint initialises the cycle trainer.
    assert OmegaConf.to_container(stable.model) == OmegaConf.to_container(cycle.model)
    assert OmegaConf.to_container(stable.tokenizer) == OmegaConf.to_container(cycle.tokenizer)
    assert (cluster.model.hidden_size, cluster.model.n_blocks, cluster.model.max_seq_len) == (1024, 24, 4096)
    assert (cluster.tokenizer.vocab_size, cluster.tokenizer.mask_token_id) == (30522, 103)
    assert (cluster.optimizer.lr, cluster.optimizer.grad_clip_norm, cluster.training.dtype) == (5e-5, 0.5, "bf16")
    assert (cluster.loss.cycle_text_ramp_steps, cluster.loss.cycle_latent_weight) == (2000, 0.1)
    # The cluster config has exactly the tiny cycle config's keys.
    assert _leaves(cluster) == _leaves(cycle)
    with pytest.raises(Exception, match="nonexistent"):
        stable.training.nonexistent  # struct mode: a typo in code fails loudly


def test_overrides_are_typed():
    overrides = ["training.num_train_steps=7", "optimizer.lr=2", "optimizer.eps=1e-6", "model.qk_rmsnorm=FALSE",
                 "logging.run_name=007", "data.token_dir=", "training.sequential_schedule=[{type: t2l, steps: 2}]",
                 "training.sequential_schedule.0.steps=3"]
    given = list(overrides)
    cfg = load_config(config_path("stable"), overrides)
    assert overrides == given  # not modified
    assert cfg.training.num_train_steps == 7 and isinstance(cfg.training.num_train_steps, int)
    assert cfg.optimizer.lr == 2.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.eps == 1e-6
    assert cfg.model.qk_rmsnorm is False
    assert cfg.logging.run_name == "007" and cfg.data.token_dir == ""
    assert OmegaConf.to_container(cfg.training.sequential_schedule) == [{"type": "t2l", "steps": 3}]
    assert load_config(config_path("stable")).training.num_train_steps == 40  # file untouched


def test_unknown_key_names_key_and_file():
    path = config_path("cycle")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["loss.cycle_txt_weight=0.2"])
    assert "loss.cycle_txt_weight" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(ConfigError, match="'nosection'"):
        load_config(path, ["nosection.key=1"])
    with pytest.raises(ConfigError, match="training.seed.x"):
        load_config(path, ["training.seed.x=1"])


@pytest.mark.parametrize("override, expected", [
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
])
def test_wrong_type_names_key_type_and_value(override, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(config_path("stable"), [override])
    assert override.split("=")[0] in str(info.value)


def test_null_only_where_default_is_null(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a:\n  maybe: null\n  count: 3\n")
    assert load_config(path, ["a.maybe=[1, 2]"]).a.maybe == [1, 2]
    assert load_config(path, ["a.maybe=null"]).a.maybe is None
    with pytest.raises(ConfigError, match="null is not allowed"):
        load_config(path, ["a.count=~"])


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
    assert type(build_trainer(stable, MultimodalDiffusionTrainer, build_model(stable, seed=0))) is MultimodalDiffusionTrainer
    assert type(build_trainer(cycle, CycleVAETrainer, build_model(cycle, seed=0))) is CycleVAETrainer
    with pytest.raises(TrainingError, match="cycle_vae"):
        run_training(stable, trainer=CYCLE, output_dir=tmp_path, synthetic=True, progress=False, device="cpu")


# -- every key is read ---------------------------------------------------------------------------
def _leaves(node: DictConfig, prefix: str = "") -> set[str]:
    out = set()
    for key in node.keys():
        child = node._get_node(key)
        out |= _leaves(child, f"{prefix}{key}.") if isinstance(child, DictConfig) else {f"{prefix}{key}"}
    return out


@contextmanager
def recorded_reads():
    """Records every key read from any DictConfig by code outside omegaconf itself."""
    reads: set[str] = set()
    originals = {name: getattr(DictConfig, name) for name in ("__getattr__", "__getitem__", "get", "__contains__")}

    def wrap(original):
        def reader(self, key, *args, **kwargs):
            if not sys._getframe(1).f_globals.get("__name__", "").startswith("omegaconf"):
                try:
                    reads.add(self._get_full_key(key))
                except Exception:  # a key omegaconf cannot name is not a config key
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


@pytest.mark.parametrize("kind, trainer_kind, extra", [
    ("stable", "stable", []),
    ("cycle", "cycle", []),
    # Upstream sizes are too big for a test: same keys, tiny values (bf16 and the BERT vocabulary stay).
    ("cycle_cluster", "cycle", ["model.max_seq_len=32", "data.synthetic_seq_len=16", "data.synthetic_num_samples=8"]),
])
def test_every_packaged_key_is_read(tmp_path, kind, trainer_kind, extra):
    config = load_config(config_path(kind), TINY + ["training.num_train_steps=1"] + extra)
    leaves = _leaves(config)
    with recorded_reads() as reads:
        result = run_training(config, trainer=ENTRIES[trainer_kind], output_dir=tmp_path, synthetic=True,
                              progress=False, device="cpu")
    assert result.final_step == 1 and torch.isfinite(torch.tensor(result.metrics[0]["loss"]))
    # model.n_heads is read by nothing, as upstream (documented in the YAML).
    assert leaves - reads == {"model.n_heads"}
