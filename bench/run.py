"""Benchmark: one line per figure, each a ratio measured in this run against its target.

    python -m bench            # full sizes: the gate on a random cluster-size checkpoint (~3.6 GB)
    python -m bench --small    # small sizes, for CI (under two minutes on 2 cores)

Figures:
  gate_memory      peak RSS of the gate process / checkpoint bytes   (target <= 1.2, goal 1.1)
  gate_wall        gate wall seconds / 90                             (target <= 1.0; goal 60 s)
  gate_row         (with --per-row) per row of that gate: seconds, peak RSS, and its rise above the
                   RSS once the checkpoint's model is loaded (bench/row_profile.py)
  cycle_step_cost  cycle step (both cycle terms on) / (stable l2t step + stable t2l step), same
                   batch, forward + backward; the four trainers are timed round robin and the
                   ratio taken per round, median and interquartile range printed
                   (floor 2.0, target <= 2.1)
  cycle_step_w0    the same with both cycle weights 0                 (floor 1.0)
  compat_suite     `pytest compat/` wall seconds on the embedded default / 60 (target <= 1.0)
  loader_feed_w*   samples/s of the training loop's data loader (0 and N reader processes) on
                   upstream-format files / samples/s of the model's optimizer step (bench/loader.py)
                                                                      (target >= 1.0)
  gate_plugin_*    the gate with the cycle trainer given as a SPEC (the built-in class, and a
                   foreign trainer that draws from the global RNG) / the built-in path, timed
                   round robin                                       (target <= 1.1)
  resources_wall   wall seconds of the resources row alone on the cluster config's shapes (real sizes,
                   B=4, S=4096; bench/resources_row.py, the checkpoint's weights never read) / 30
                                                                      (target <= 1.0)
  resources_rss    peak RSS of that process / 2 GiB (nothing real is allocated)   (target <= 1.0)
  checkpoint_save  the training loop's crash-safe checkpoint pair (temporaries fsynced, train
                   state published first, weights last, directory fsynced) / the same two files
                   written with a rename each and no fsync, round robin  (target <= 1.5)
  report_render    the report (compat-matrix.json, .md, index.html with every figure) written from a
                   saved matrix in a fresh process, matplotlib's import included, median of 3 runs /
                   3 s: what the report adds to the gate's wall time (target <= 1.0)
  teeth            (only with --only teeth) mutants killed by `pytest compat/` / mutants judged,
                   mutmut over the trainers and the loss, diffusion and masking code, see
                   bench/teeth.py                                     (target >= 0.90)
  teeth_gate       (--only teeth --teeth-target gate) the same over the gate's own code, with
                   tests/ and compat/ as the test command             (target >= 0.90)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench.loader import loader_figures
from bench.results import FIGURE_INPUTS, Figure, line, record
from bench.teeth import TARGETS, TeethError, teeth_figure

REPO = Path(__file__).resolve().parents[1]


# A launcher process whose only child is the measured command, so that RUSAGE_CHILDREN is that
# command's peak RSS (the largest of it and its own children), not also this process's other runs.
_LAUNCHER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "print('\\n@@peak_rss_kib=' + str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(rc)\n"
)


def run_measured(cmd: list[str], env: dict | None = None):
    """(completed process, wall seconds, peak RSS bytes) of `cmd` (with `env`, else this one's)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@peak_rss_kib=")]
    if not marker:
        raise RuntimeError(f"no RSS measurement from {cmd}: {proc.stderr[-2000:]}")
    return proc, wall, int(marker[-1].split("=", 1)[1]) * 1024  # Linux reports KiB


# -- gate memory and wall time -----------------------------------------------------------------------
GATE_MEMORY_TARGET = 1.2  # peak RSS / checkpoint bytes (goal 1.1)
GATE_WALL_TARGET_S = 90.0  # seconds on 2 cores (goal 60)


def cluster_checkpoint(small: bool, workdir: Path) -> tuple[Path, Path, int]:
    """(config file, random checkpoint, parameters) of the packaged cluster config (shrunk with
    --small), written into `workdir` once and reused by the figures that need it."""
    from bench.random_checkpoint import write_random_checkpoint
    from cycle_vae_impl.configs import config_path
    from latentDLM_mmdit.config import load_config

    overrides = ["model.hidden_size=256", "model.cond_dim=256", "model.n_blocks=4"] if small else []
    config = load_config(config_path("cycle_cluster"), overrides)
    cfg_file = workdir / "gate_config.yaml"
    checkpoint = workdir / "random_cluster.safetensors"
    if cfg_file.is_file() and checkpoint.is_file() and OmegaConf.load(cfg_file) == config:
        from compat.inputs import open_user_checkpoint

        with open_user_checkpoint(checkpoint) as source:
            return cfg_file, checkpoint, sum(int(torch.Size(s).numel()) for s in source.shapes.values())
    OmegaConf.save(config, cfg_file)
    checkpoint, n_params = write_random_checkpoint(config, checkpoint)
    return cfg_file, checkpoint, n_params


def gate_figures(small: bool, workdir: Path, per_row: bool = False) -> list[str]:
    from bench.row_profile import ENV as ROW_PROFILE_ENV

    cfg_file, checkpoint, n_params = cluster_checkpoint(small, workdir)
    size = checkpoint.stat().st_size
    cmd = [
        sys.executable,
        "-m",
        "compat",
        "--checkpoint",
        str(checkpoint),
        "--stable-config",
        str(cfg_file),
        "--cycle-config",
        str(cfg_file),
        "--batch-size",
        "2",
        "--seq-len",
        "128",
        "--report",
        str(workdir / "gate-report"),
        "--quiet",
    ]
    profile = workdir / "gate-row-profile.json"
    env = None
    if per_row:
        cmd += ["--", "-p", "bench.row_profile"]
        env = {**os.environ, ROW_PROFILE_ENV: str(profile)}
    proc, wall, peak = run_measured(cmd, env=env)
    (workdir / "gate.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"the gate failed to run (exit {proc.returncode}); log: {workdir / 'gate.log'}")
    label = "small" if small else "cluster"
    detail = (
        f"{label} config, {n_params / 1e6:.0f}M params, checkpoint {size / 2**30:.2f} GiB, peak RSS "
        f"{peak / 2**30:.2f} GiB, gate exit {proc.returncode}"
    )
    full = not small
    lines = [
        line(
            "gate_memory",
            peak / size,
            f"target <= {GATE_MEMORY_TARGET}" + ("" if full else " (full)"),
            detail,
            peak / size <= GATE_MEMORY_TARGET if full else None,
        ),
        line(
            "gate_wall",
            wall / GATE_WALL_TARGET_S,
            f"target <= 1.0 ({GATE_WALL_TARGET_S:.0f} s)" + ("" if full else " (full)"),
            f"{wall:.1f} s on {os.cpu_count()} cores",
            wall <= GATE_WALL_TARGET_S if full else None,
        ),
    ]
    if per_row:
        lines[0].rows = row_profile(profile, size)
    return lines


def row_profile(profile: Path, checkpoint_bytes: int) -> list[dict]:
    """Per row of the gate, in the order the rows ran: its checks and seconds, the largest rise of RSS
    within one of its checks (what the row itself allocates), and the process's peak RSS while it ran,
    also against the checkpoint's size (memory an earlier row left behind counts there too)."""
    import json

    data = json.loads(profile.read_text())
    by_row: dict[str, dict] = {}
    for r in data["records"]:
        row = by_row.setdefault(r["row"] or "(not a row)", {"seconds": 0.0, "peak": 0, "rise": 0, "checks": 0})
        row["seconds"] += r["seconds"]
        row["peak"] = max(row["peak"], r["rss_peak"])
        row["rise"] = max(row["rise"], r["rss_peak"] - r["rss_start"])
        row["checks"] += 1
    return [
        {
            "row": name,
            "checks": row["checks"],
            "seconds": round(row["seconds"], 1),
            "rise_gib": round(row["rise"] / 2**30, 3),
            "peak_gib": round(row["peak"] / 2**30, 3),
            "peak_ratio": round(row["peak"] / checkpoint_bytes, 3),
        }
        for name, row in by_row.items()
    ]


def row_profile_lines(rows: list[dict]) -> list[str]:
    """The per-row table as printed: one `gate_row` line per row."""
    lines = [f"{'gate_row':<16} {'row':<24} {'checks':>6} {'seconds':>8} {'own rise':>10} {'peak RSS':>20}"]
    for r in rows:
        peak = f"{r['peak_gib']:.2f} G ({r['peak_ratio']:.2f} x)"
        lines.append(
            f"{'gate_row':<16} {r['row']:<24} {r['checks']:>6} {r['seconds']:>8.1f} {r['rise_gib']:>8.2f} G {peak:>20}"
        )
    return lines


# -- the resources row alone ------------------------------------------------------------------------
RESOURCES_WALL_TARGET = 30.0  # seconds (issue 18): nothing real is allocated, so a laptop's minute is too much
RESOURCES_RSS_TARGET = 2 * 2**30  # bytes


def resources_figures(small: bool, workdir: Path) -> list[str]:
    """The resources row on the random cluster checkpoint's shapes (its weights are never read), at
    the config's real sizes (B = training.train_batch_size, S = model.max_seq_len), in a process of
    its own (`bench/resources_row.py`): wall time and peak RSS."""
    import json

    cfg_file, checkpoint, n_params = cluster_checkpoint(small, workdir)
    cmd = [sys.executable, "-m", "bench.resources_row", "--checkpoint", str(checkpoint)]
    cmd += ["--stable-config", str(cfg_file), "--cycle-config", str(cfg_file)]
    cmd += ["--gpu-memory", "80GiB", "--gpu-tflops", "989"]
    proc, wall, peak = run_measured(cmd)
    (workdir / "resources.log").write_text(proc.stdout + proc.stderr)
    marker = [x for x in proc.stdout.splitlines() if x.startswith("@@resources=")]
    if proc.returncode != 0 or not marker:
        raise RuntimeError(
            f"the resources row failed to run (exit {proc.returncode}); log: {workdir / 'resources.log'}"
        )
    result = json.loads(marker[-1].split("=", 1)[1])
    measured = dict(result["measured"])
    verdicts = ", ".join(f"{k} {v[0]}" for k, v in result["outcomes"].items())
    full = not small
    label = "small" if small else "cluster"
    return [
        line(
            "resources_wall",
            wall / RESOURCES_WALL_TARGET,
            "target <= 1.0" + ("" if full else " (full)"),
            f"{wall:.1f} s ({result['row_seconds']:.1f} s the row's checks) on {os.cpu_count()} cores, {label} "
            f"config, {n_params / 1e6:.0f}M params: {measured.get('per_rank', '?')}; {verdicts}",
            wall <= RESOURCES_WALL_TARGET if full else None,
        ),
        line(
            "resources_rss",
            peak / RESOURCES_RSS_TARGET,
            "target <= 1.0" + ("" if full else " (full)"),
            f"peak RSS {peak / 2**30:.2f} GiB of {RESOURCES_RSS_TARGET / 2**30:.0f} GiB; fit: {measured.get('fit', '?')}",
            peak <= RESOURCES_RSS_TARGET if full else None,
        ),
    ]


# -- cycle step cost ---------------------------------------------------------------------------------
def _step_seconds(trainer, batch, draws) -> float:
    """Wall seconds of one forward + backward step."""
    trainer.model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    loss, _ = trainer(batch, step=10_000, draws=draws)
    loss.backward()
    return time.perf_counter() - started


def interleaved(subjects: dict, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Times of each subject, measured round robin (one step of each per round), so that a load
    that comes and goes on a shared machine hits every subject alike; warm-up rounds dropped."""
    times: dict[str, list[float]] = {name: [] for name in subjects}
    for r in range(warmup + rounds):
        for name, run in subjects.items():
            elapsed = run()
            if r >= warmup:
                times[name].append(elapsed)
    return times


def spread(values: list[float]) -> str:
    """Median and the interquartile range, e.g. "1.98 [1.95, 2.02]"."""
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return f"{statistics.median(values):.3f} [{q[0]:.3f}, {q[2]:.3f}]"


def step_cost_figures(small: bool) -> list[str]:
    from cycle_vae_impl.trainers.cycle_vae_trainer import CycleVAETrainer
    from cycle_vae_impl.configs import config_path
    from latentDLM_mmdit.config import load_config
    from latentDLM_mmdit.diffusion_process import MaskedDiffusion
    from latentDLM_mmdit.factory import build_model
    from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
    from latentDLM_mmdit.synthetic import synthetic_batch
    from latentDLM_mmdit.tokenizer import vocab_from_config

    sizes = (
        ["model.hidden_size=64", "model.cond_dim=64", "model.n_blocks=2"]
        if small
        else ["model.hidden_size=256", "model.cond_dim=256", "model.n_blocks=4", "model.max_seq_len=128"]
    )
    config = load_config(config_path("cycle"), sizes)
    B, S = (4, 16) if small else (4, 96)
    repeats = 5 if small else 7
    model = build_model(config, seed=0).train()
    vocab = vocab_from_config(config)
    batch = synthetic_batch(vocab, B, S, int(config.model.latent_dim), torch.Generator().manual_seed(0))
    noise = torch.randn(B, int(config.model.latent_dim), generator=torch.Generator().manual_seed(1))

    def stable(mode):
        cfg = OmegaConf.merge(config, {"loss": {"loss_type": mode}})
        return MultimodalDiffusionTrainer(model, vocab, MaskedDiffusion(vocab), torch.float32, cfg)

    def cycle(weight):
        cfg = OmegaConf.merge(
            config,
            {
                "loss": {
                    "cycle_text_weight": weight,
                    "cycle_latent_weight": weight,
                    "cycle_text_ramp_steps": 0,
                    "cycle_latent_ramp_steps": 0,
                }
            },
        )
        return CycleVAETrainer(model, vocab, MaskedDiffusion(vocab), torch.float32, cfg)

    def unfrozen(fn):
        def run(*args):
            for p in model.parameters():
                p.requires_grad_(True)
            return fn(*args)

        return run

    l2t_trainer, t2l_trainer = stable("l2t"), stable("t2l")
    both_trainer, zero_trainer = cycle(0.1), cycle(0.0)
    times = interleaved(
        {
            "l2t": lambda: _step_seconds(l2t_trainer, batch, None),
            "t2l": lambda: _step_seconds(t2l_trainer, batch, {"latent_noise": noise}),
            "cycle": unfrozen(
                lambda: _step_seconds(both_trainer, batch, {"latent_noise": noise, "cycle_latent_noise": noise})
            ),
            "cycle_w0": unfrozen(lambda: _step_seconds(zero_trainer, batch, {"latent_noise": noise})),
        },
        rounds=repeats,
    )
    # A ratio per round (its subjects measured back to back), then the median over rounds.
    ratio_both = [c / (a + b) for c, a, b in zip(times["cycle"], times["l2t"], times["t2l"])]
    ratio_zero = [c / (a + b) for c, a, b in zip(times["cycle_w0"], times["l2t"], times["t2l"])]
    median = {name: statistics.median(values) for name, values in times.items()}
    params = sum(p.numel() for p in model.parameters())
    detail = (
        f"{params / 1e6:.1f}M params, B={B} S={S}, {torch.get_num_threads()} threads, {repeats} interleaved "
        f"rounds; l2t {median['l2t'] * 1e3:.1f} ms + t2l {median['t2l'] * 1e3:.1f} ms"
    )
    both, zero = statistics.median(ratio_both), statistics.median(ratio_zero)
    # At the small sizes per-call Python overhead, not model passes, dominates: informational only.
    return [
        line(
            "cycle_step_cost",
            both,
            "floor 2.0, target <= 2.1" + (" (full)" if small else ""),
            f"per-round ratio median [IQR] {spread(ratio_both)}; cycle {median['cycle'] * 1e3:.1f} ms; {detail}",
            None if small else both <= 2.1,
        ),
        line(
            "cycle_step_w0",
            zero,
            "floor 1.0",
            f"per-round ratio median [IQR] {spread(ratio_zero)}; cycle(w=0) {median['cycle_w0'] * 1e3:.1f} ms; {detail}",
            None,
        ),
    ]


# -- report rendering --------------------------------------------------------------------------------
REPORT_MATRIX = REPO / "bench" / "data" / "report_matrix.json"  # a full default gate run's matrix
REPORT_BUDGET_S = 3.0
_RENDER = (
    "import json, sys, time\n"
    "started = time.perf_counter()\n"
    "from compat.report import write_report\n"
    "paths = write_report(sys.argv[2], json.loads(open(sys.argv[1]).read()))\n"
    "print(time.perf_counter() - started, paths['html'].stat().st_size)\n"
)


def report_figure(workdir: Path, matrix: Path | None = None, runs: int = 3) -> list[str]:
    """Seconds to write the report from a saved compat-matrix.json (fresh process each run)."""
    matrix = matrix or REPORT_MATRIX
    seconds, size = [], 0
    for i in range(runs):
        proc = subprocess.run(
            [sys.executable, "-c", _RENDER, str(matrix), str(workdir / f"report-{i}")],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"rendering {matrix} failed: {proc.stderr[-2000:]}")
        took, size = proc.stdout.split()
        seconds.append(float(took))
    median = statistics.median(seconds)
    detail = (
        f"{median:.2f} s (runs {', '.join(f'{s:.2f}' for s in seconds)}), index.html {int(size) / 1024:.0f} KiB, "
        f"from {matrix.name}"
    )
    return [line("report_render", median / REPORT_BUDGET_S, "target <= 1.0", detail, median <= REPORT_BUDGET_S)]


# -- compat suite wall time --------------------------------------------------------------------------
def suite_figure() -> list[str]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "compat", "-q", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return [
        line(
            "compat_suite", wall / 60, "target <= 1.0", f"{wall:.1f} s; {summary}", wall <= 60 and proc.returncode == 0
        )
    ]


def plugin_figure(rounds: int) -> list[str]:
    """The gate with the cycle trainer given as a SPEC (the plug-in path: loaded from its file,
    passes observed, draws captured where it takes none) against the built-in path, on the embedded
    default, timed round robin."""
    foreign = REPO / "tests" / "foreign_trainers" / "functional_cycle" / "trainer.py"
    runs = {
        "built_in": [],
        "plugin_spec": ["--cycle-trainer", "cycle_vae_impl.trainers.cycle_vae_trainer:CycleVAETrainer"],
    }
    if foreign.is_file():  # a source checkout: also a trainer that draws from the global RNG
        runs["plugin_foreign"] = ["--cycle-trainer", f"{foreign}:FunctionalCycleTrainer"]

    def gate(extra):
        def run():
            started = time.perf_counter()
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "compat",
                    "--quiet",
                    "--report",
                    tempfile.mkdtemp(prefix="bench-gate-"),
                    *extra,
                    "--",
                    "-k",
                    "not ddp",
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"the gate exited {proc.returncode}: {proc.stdout[-2000:]}")
            return time.perf_counter() - started

        return run

    times = interleaved({name: gate(extra) for name, extra in runs.items()}, rounds=rounds, warmup=0)
    base = statistics.median(times["built_in"])
    out = []
    for name in runs:
        if name == "built_in":
            continue
        ratios = [t / b for t, b in zip(times[name], times["built_in"])]
        ratio = statistics.median(ratios)
        out.append(
            line(
                f"gate_{name}",
                ratio,
                "target <= 1.1",
                f"per-round ratio median [IQR] {spread(ratios)}; {statistics.median(times[name]):.1f} s vs "
                f"built-in {base:.1f} s ({rounds} interleaved rounds, DDP row deselected)",
                ratio <= 1.1,
            )
        )
    return out


# -- checkpoint saving ---------------------------------------------------------------------------------
def checkpoint_save_figure(small: bool, workdir: Path) -> list[str]:
    """What publishing a checkpoint pair crash-safely costs over writing the same files unprotected."""
    from safetensors.torch import save_file

    from cycle_vae_impl.configs import config_path
    from latentDLM_mmdit.checkpoints import save_checkpoint, train_state_path
    from latentDLM_mmdit.config import load_config
    from latentDLM_mmdit.factory import build_model

    sizes = (
        ["model.hidden_size=64", "model.cond_dim=64", "model.n_blocks=2"]
        if small
        else ["model.hidden_size=256", "model.cond_dim=256", "model.n_blocks=4", "model.max_seq_len=128"]
    )
    config = load_config(config_path("stable"), sizes)
    model = build_model(config, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW state: two moments per parameter, as a real train state holds
    train_state = {"step": 1, "optimizer": optimizer.state_dict()}
    folder = workdir / "checkpoint_save"
    folder.mkdir(parents=True, exist_ok=True)

    def safe():
        started = time.perf_counter()
        save_checkpoint(
            folder / "safe.safetensors", model, config=config, trainer_kind="stable", step=1, train_state=train_state
        )
        return time.perf_counter() - started

    def unprotected():
        started = time.perf_counter()
        path = folder / "plain.safetensors"
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(path) + ".tmp", metadata={"step": "1"})
        os.replace(str(path) + ".tmp", path)
        torch.save(train_state, str(train_state_path(path)) + ".tmp")
        os.replace(str(train_state_path(path)) + ".tmp", train_state_path(path))
        return time.perf_counter() - started

    rounds = 5 if small else 7
    times = interleaved({"safe": safe, "unprotected": unprotected}, rounds=rounds, warmup=1)
    ratios = [a / b for a, b in zip(times["safe"], times["unprotected"])]
    ratio = statistics.median(ratios)
    nbytes = sum(f.stat().st_size for f in folder.glob("safe*"))
    return [
        line(
            "checkpoint_save",
            ratio,
            "target <= 1.5" + (" (full)" if small else ""),
            f"per-round ratio median [IQR] {spread(ratios)}; {statistics.median(times['safe']) * 1e3:.0f} ms vs "
            f"{statistics.median(times['unprotected']) * 1e3:.0f} ms for {nbytes / 2**20:.0f} MiB "
            f"(weights + train state, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
            f"{rounds} interleaved rounds in {folder}",
            None if small else ratio <= 1.5,
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="small sizes (CI): runs in under two minutes")
    parser.add_argument(
        "--only",
        choices=["gate", "step", "suite", "plugin", "save", "loader", "report", "resources", "teeth"],
        action="append",
        help="run only these figures (repeatable); teeth (the mutation score, bench/teeth.py) runs only when named",
    )
    parser.add_argument(
        "--teeth-file",
        action="append",
        default=None,
        metavar="PATH",
        help="teeth: mutate only this file of the target's only_mutate (repeatable)",
    )
    parser.add_argument(
        "--teeth-sample",
        type=int,
        default=None,
        metavar="N",
        help="teeth: run N mutants drawn uniformly at random (seeded) and state the score's 95%% interval",
    )
    parser.add_argument("--teeth-seed", type=int, default=0, help="teeth: the sample's seed (default 0)")
    parser.add_argument(
        "--teeth-target",
        choices=TARGETS,
        action="append",
        default=None,
        help="teeth: the trainer code ([tool.mutmut]) or the gate's own code ([tool.teeth.gate]); repeatable; "
        "default: trainer, and both with --small (a 3-mutant smoke of each)",
    )
    parser.add_argument(
        "--report-matrix",
        default=None,
        metavar="JSON",
        help="report: the compat-matrix.json to render (default: bench/data/report_matrix.json, a default gate run)",
    )
    parser.add_argument(
        "--per-row",
        action="store_true",
        help="gate: also a line per row of the gate (seconds, peak RSS and its rise above the loaded model)",
    )
    parser.add_argument("--workdir", default=None, help="where the random checkpoint and logs go (default: a temp dir)")
    args = parser.parse_args(argv)
    selected = set(args.only or ["gate", "step", "suite", "plugin", "save", "loader", "report", "resources"])
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mmdit-compat-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"mmdit-compat bench ({'small' if args.small else 'full'} sizes), torch {torch.__version__}, "
        f"{os.cpu_count()} cores, workdir {workdir}",
        flush=True,
    )
    lines = []
    if "step" in selected:
        lines += step_cost_figures(args.small)
        print(*lines[-2:], sep="\n", flush=True)
    if "loader" in selected:
        lines += loader_figures(args.small, workdir)
        print(*lines[-2:], sep="\n", flush=True)
    if "report" in selected:
        matrix = Path(args.report_matrix) if args.report_matrix else None
        if matrix is not None and not matrix.is_file():
            print(f"bench: --report-matrix {matrix}: no such file", file=sys.stderr)
            return 2
        lines += report_figure(workdir, matrix)
        print(lines[-1], flush=True)
    if "suite" in selected:
        lines += suite_figure()
        print(lines[-1], flush=True)
    if "plugin" in selected:
        lines += plugin_figure(rounds=1 if args.small else 3)
        print(*lines[-2:], sep="\n", flush=True)
    if "save" in selected:
        lines += checkpoint_save_figure(args.small, workdir)
        print(lines[-1], flush=True)
    if "gate" in selected:
        gate_lines = gate_figures(args.small, workdir, per_row=args.per_row)
        lines += gate_lines
        print(*gate_lines, *row_profile_lines(gate_lines[0].rows) if gate_lines[0].rows else (), sep="\n", flush=True)
    if "resources" in selected:
        lines += resources_figures(args.small, workdir)
        print(*lines[-2:], sep="\n", flush=True)
    if "teeth" in selected:
        for target in args.teeth_target or (list(TARGETS) if args.small else ["trainer"]):
            try:
                teeth_lines = teeth_figure(
                    args.small,
                    Path(args.workdir) if args.workdir else None,
                    args.teeth_file,
                    sample=args.teeth_sample,
                    seed=args.teeth_seed,
                    target=target,
                )
            except TeethError as error:
                print(f"teeth: {error}", file=sys.stderr)
                return 2
            lines += teeth_lines
            print(*teeth_lines, sep="\n", flush=True)
    if not args.small:  # the figure of record for each measured figure (README: python -m bench.results)
        measured = [f for f in lines if isinstance(f, Figure) and f.name in FIGURE_INPUTS]
        if measured:
            record(measured)
            print(f"recorded {', '.join(f.name for f in measured)} in bench/results.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
