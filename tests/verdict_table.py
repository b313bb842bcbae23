"""Running the gate on one case of `tests/verdict_table.yaml` (the verdict table over real configurations).

A case names its inputs: the stable and cycle configs (`packaged:stable`, `packaged:cycle`,
`packaged:cycle_cluster`, `upstream:stable`, `upstream:cluster`, `upstream:default`), optional
overrides of either (dotted keys, written into a copy of the file, as a user edits a config), the
checkpoint (`embedded`, `upstream` for upstream's `.pt` layout, `random` for a random checkpoint of
the cycle config, or `random:<millions>` with `model.hidden_size` / `n_blocks` grown to that many
parameters; both trainers then get that config, as in the bench's gate),
and the rows it judges (`all`, or a list: the gate runs with `-k` on them).

    python -m tests.verdict_table CASE [CASE ...]     # run cases, print the verdicts as YAML to paste
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from cycle_vae_impl.configs import config_path
from tests import upstream_files

REPO = Path(__file__).resolve().parents[1]
TABLE = Path(__file__).resolve().parent / "verdict_table.yaml"
CONFIGS = {
    "packaged:stable": lambda: config_path("stable"),
    "packaged:cycle": lambda: config_path("cycle"),
    "packaged:cycle_cluster": lambda: config_path("cycle_cluster"),
    "upstream:stable": lambda: upstream_files.STABLE_CONFIG,
    "upstream:cluster": lambda: upstream_files.CYCLE_CONFIGS["cluster"],
    "upstream:default": lambda: upstream_files.CYCLE_CONFIGS["default"],
}


def load_table() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(TABLE.read_text())["cases"]


def config_file(name: str, overrides: dict[str, Any], out: Path) -> Path:
    """The config `name`, with `overrides` written into a copy (its Hydra group folders beside it)."""
    source = CONFIGS[name]()
    if not overrides:
        return source
    folder = out / name.replace(":", "_")
    if source.parent.name == "stable" and name.startswith("upstream"):  # a Hydra folder: copy the groups too
        shutil.copytree(source.parent, folder, dirs_exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    raw = OmegaConf.load(source)
    for key, value in overrides.items():
        OmegaConf.update(raw, key, value, merge=False, force_add=True)
    target = folder / source.name
    target.write_text(OmegaConf.to_yaml(raw))
    return target


def random_checkpoint(cycle_config: Path, millions: int, out: Path) -> tuple[Path, Path]:
    """A random checkpoint of `cycle_config` grown to at least `millions` parameters (width first),
    and the grown config it was written for."""
    from bench.random_checkpoint import write_random_checkpoint
    from latentDLM_mmdit.config import load_config

    sizes = [()] if not millions else [(256, 4), (512, 4), (768, 6), (1024, 8)]
    for size in sizes:  # () keeps the config's own size
        grow = (
            [f"model.hidden_size={size[0]}", f"model.cond_dim={size[0]}", f"model.n_blocks={size[1]}"] if size else []
        )
        config = load_config(cycle_config, grow)
        path, n_params = write_random_checkpoint(config, out / f"random_{millions}M.safetensors")
        if n_params >= millions * 1e6:
            OmegaConf.save(config, out / "grown_config.yaml")
            return path, out / "grown_config.yaml"
    raise ValueError(f"no tried size reaches {millions}M parameters")


def gate_arguments(case: dict[str, Any], out: Path, upstream: dict[str, Path] | None) -> list[str]:
    stable = config_file(case["stable_config"], case.get("stable_overrides") or {}, out)
    cycle = config_file(case["cycle_config"], case.get("cycle_overrides") or {}, out)
    args = ["--stable-config", str(stable), "--cycle-config", str(cycle)]
    checkpoint = str(case.get("checkpoint", "embedded"))
    if checkpoint == "upstream":
        args += ["--checkpoint", str(upstream["checkpoint"]), "--tokenizer", str(upstream["tokenizer"])]
        args += ["--data-tokens", str(upstream["tokens"]), "--data-latents", str(upstream["latents"])]
    elif checkpoint.startswith("random"):
        # a random checkpoint of the (grown) cycle config; both configs are that file, as in the bench's gate
        millions = int(checkpoint.split(":")[1]) if ":" in checkpoint else 0
        grown, grown_config = random_checkpoint(cycle, millions, out)
        args = ["--stable-config", str(grown_config), "--cycle-config", str(grown_config), "--checkpoint", str(grown)]
        args += ["--batch-size", "2", "--seq-len", "64"]
    elif checkpoint != "embedded":
        raise ValueError(f"unknown checkpoint {checkpoint!r}")
    args += [str(a) for a in case.get("gate_args") or []]
    rows = case.get("rows", "all")
    if rows != "all":  # by module: a row's name can also be a check's name in another row
        args += ["--", "-k", " or ".join(f"test_row_{row}" for row in rows)]
    return args


def run_case(case: dict[str, Any], out: Path, upstream: dict[str, Path] | None = None) -> tuple[int, dict, str]:
    """(exit code, the matrix JSON, the gate's output) of the gate on `case`."""
    if str(case.get("checkpoint")) == "upstream" and upstream is None:
        upstream = upstream_files.write_all(out / "upstream")
    report = out / "report"
    argv = [sys.executable, "-m", "compat", "--report", str(report), "--quiet", *gate_arguments(case, out, upstream)]
    proc = subprocess.run(argv, cwd=out, capture_output=True, text=True, timeout=1200)
    return proc.returncode, json.loads((report / "compat-matrix.json").read_text()), proc.stdout + proc.stderr


if __name__ == "__main__":
    import tempfile

    table = load_table()
    for name in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            code, matrix, output = run_case(table[name], Path(tmp))
        verdicts = {
            r["id"]: r["verdict"]
            for r in matrix["rows"]
            if r["verdict"] != "NOT RUN" or r["not_run_kind"] != "not selected"
        }
        print(f"# {name}: exit {code}")
        for row in matrix["rows"]:
            if row["id"] in verdicts:
                print(f'      {row["id"]}: [{row["verdict"]}, "{row["measured"][:150]}"]')
