"""The report's figures, drawn with matplotlib (Agg, no display) from the figure data the rows
recorded in compat-matrix.json (`compat.figure_data` says which row records what). A figure whose
row did not record its data (the row was not selected, failed before, or does not exist in this
version) is left out; nothing is computed here that the JSON does not hold.

Each figure is an SVG string (text drawn as paths: no font is fetched) with a title and a caption
that says what a reader should look for.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

STABLE_COLOR = "#0072B2"  # blue; solid lines, circles
CYCLE_COLOR = "#D55E00"  # vermillion; dashed lines, squares (distinct in grey-scale too)
GOLDEN_COLOR = "#222222"
OTHER_COLOR = "#999999"
PIXELS_PER_INCH = 96


@dataclass
class Figure:
    """One drawn figure: `svg` is the whole SVG document."""

    id: str
    row: str
    title: str
    caption: str
    svg: str
    width: int  # pixels at 96 per inch
    height: int


def figure_inputs(matrix: dict) -> dict[str, dict]:
    """{row id: {figure name: data}} from every check of every row.

    Args:
        matrix: compat-matrix.json as a dict.
    """
    out: dict[str, dict] = {}
    for row in matrix.get("rows", []):
        for test in row.get("tests", []):
            for name, data in (test.get("figures") or {}).items():
                out.setdefault(row["id"], {})[name] = data
    return out


def _new_figure(width: float, height: float, panels: int = 1):
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=9)
    return fig, axes


def _svg(fig) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "mmdit-compat"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def _values(seq) -> list[float]:
    return [math.nan if v is None else float(v) for v in seq]


# -- one function per figure: (data of its row) -> (fig, caption) or None ----------------------------
def draw_trajectories(data: dict):
    """Loss and gradient norm per step of both loop runs, and the held-out base losses.

    Args:
        data: the trajectories row's figure data (`steps`, `base_losses`, `golden`).
    Returns:
        (matplotlib figure, caption), or None without the data.
    """
    steps = data.get("steps")
    if not steps:
        return None
    base = data.get("base_losses")
    golden = data.get("golden")
    fig, axes = _new_figure(11, 3.3, 3 if base else 2)
    for ax, what, label in ((axes[0], "losses", "training loss"), (axes[1], "grad_norms", "gradient norm")):
        for kind, color, style, marker in (("stable", STABLE_COLOR, "-", "o"), ("cycle", CYCLE_COLOR, "--", "s")):
            ys = _values(steps.get(kind, {}).get(what, []))
            ax.plot(range(1, len(ys) + 1), ys, style, color=color, marker=marker, label=kind, linewidth=2)
            if golden and golden.get(kind):
                want = _values(golden[kind].get(what, []))
                rtol, atol = float(golden.get("rtol", 0)), float(golden.get("atol", 0))
                xs = range(1, len(want) + 1)
                margin = [atol + rtol * abs(w) for w in want]
                ax.fill_between(
                    xs,
                    [w - m for w, m in zip(want, margin)],
                    [w + m for w, m in zip(want, margin)],
                    color=color,
                    alpha=0.2,
                )
                ax.plot(
                    xs,
                    want,
                    "x",
                    color=GOLDEN_COLOR,
                    markersize=8,
                    label=f"{kind} golden" if kind == "stable" else None,
                )
        finite = [v for kind in ("stable", "cycle") for v in _values(steps.get(kind, {}).get(what, [])) if v > 0]
        if finite and max(finite) / min(finite) > 20:  # a sequential stable run alternates l2t (~3) and t2l (~0.01)
            ax.set_yscale("log")
        ax.set_xlabel("loop step", fontsize=10)
        ax.set_title(f"{label} per step", fontsize=11)
        ax.legend(fontsize=8)
    if base:
        _draw_base_rises(axes[2], base)
    caption = (
        "Per-step training loss and gradient norm of the stable and the cycle run through the real loop"
        + (", with the golden file's values (x) and its tolerance band" if golden else "")
        + (
            f" (the stable run trains in {steps['stable']['mode']} mode: its l2t and t2l steps alternate, hence the "
            "zigzag on a log scale; the cycle run's loss is its weighted total)"
            if steps.get("stable", {}).get("mode") == "sequential"
            else ""
        )
        + ". Look for: the two runs starting together and no gradient-norm spike in the cycle run"
        + ("; golden crosses on the lines (numerics unchanged)" if golden else "")
        + (
            ". Right: the stable trainer's own l2t and t2l losses on a held-out batch, of the cycle run's final "
            "weights against the stable continuation's; a bar above the dashed limit means fine-tuning with the "
            "cycle trainer undoes the pretraining (the row fails)."
            if base
            else "."
        )
    )
    return fig, caption


def _draw_base_rises(ax, base: dict) -> None:
    """What the row checks: each base loss of the cycle run against the stable continuation's, in %."""
    modes = [m for m in ("l2t", "t2l") if m in base.get("stable", {}) and m in base.get("cycle", {})]
    rises = [100 * (float(base["cycle"][m]) - float(base["stable"][m])) / abs(float(base["stable"][m])) for m in modes]
    limit = None if base.get("limit") is None else 100 * float(base["limit"])
    colors = [CYCLE_COLOR if limit is None or r <= limit else "#B3261E" for r in rises]
    ax.bar(range(len(modes)), rises, 0.5, color=colors, hatch="//", edgecolor="#333")
    for j, (m, r) in enumerate(zip(modes, rises)):
        label = f"{r:+.1f}%\n{float(base['cycle'][m]):.4g} vs {float(base['stable'][m]):.4g}"
        ax.text(j, r, label, ha="center", va="bottom" if r >= 0 else "top", fontsize=8)
    ax.set_xticks(range(len(modes)), [f"base {m}" for m in modes])
    ax.axhline(0.0, color="#444", linewidth=1)
    top, low = max(rises + [0.0]), min(rises + [0.0])
    if limit is not None:
        ax.axhline(limit, color="#B3261E", linewidth=1.5, linestyle="--")
        ax.text(len(modes) - 0.45, limit, f"limit +{limit:g}%", ha="right", va="bottom", fontsize=8, color="#B3261E")
        top = max(top, limit)
    span = top - low
    ax.set_ylim(low - 0.3 * span - 1, top + 0.15 * span + 1)
    ax.set_xlim(-0.6, len(modes) - 0.4)
    ax.set_ylabel("cycle vs stable continuation, %", fontsize=9)
    ax.set_title("held-out base losses after the runs", fontsize=11)


def draw_t2l_timesteps(data: dict):
    """Histogram of the latent timesteps the noised passes were given, stable against cycle.

    Args:
        data: the t2l_latent_timestep row's figure data.
    Returns:
        (matplotlib figure, caption), or None without the data.
    """
    stable = data.get("stable_latent_t")
    cycle = data.get("cycle_latent_t")
    if stable is None and cycle is None:
        return None
    random = data.get("random_mode_latent_t")
    fig, axes = _new_figure(9, 3.2)
    ax = axes[0]
    bins = [i / 40 for i in range(41)]

    def share(values):  # each sample's share, so that runs of different sizes compare
        return {"x": values, "weights": [1.0 / len(values)] * len(values)}

    if random and random.get("t"):
        ax.hist(
            **share(_values(random["t"])),
            bins=bins,
            color=OTHER_COLOR,
            alpha=0.5,
            hatch="..",
            label=f"cycle, latent_t_mode random (for contrast, n={len(random['t'])})",
        )
    if stable:
        ax.hist(
            **share(_values(stable)),
            bins=bins,
            histtype="step",
            color=STABLE_COLOR,
            linewidth=4,
            label=f"stable t2l (n={len(stable)})",
        )
    if cycle and cycle.get("t"):
        ts = _values(cycle["t"])
        ax.hist(
            **share(ts),
            bins=bins,
            histtype="step",
            color=CYCLE_COLOR,
            linewidth=2,
            linestyle="--",
            label=f"cycle, configured latent_t_mode {cycle.get('mode')} (n={len(ts)})",
        )
    ax.set_xlabel("latent timestep t fed to the model (T2L and cycle_latent passes)", fontsize=10)
    ax.set_ylabel("share of samples", fontsize=10)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.15)
    ax.legend(fontsize=8, loc="upper left")
    caption = (
        "Latent timesteps the model was given in the noised passes, observed over several steps. The pretrained "
        "stable T2L only ever saw t = 1 (one bar at the right edge). Look for: the configured cycle trainer's "
        "outline on that same bar; any cycle mass below 1 is a distribution shift for the pretrained weights "
        "(the row fails). The grey bars show what latent_t_mode random would feed."
    )
    return fig, caption


def draw_x0_gain(data: dict):
    """The x0 error gain against t per parameterization, and the measured point.

    Args:
        data: the x0_reconstruction row's figure data (`x0_gain`).
    Returns:
        (matplotlib figure, caption), or None without the data.
    """
    gain = data.get("x0_gain")
    if not gain:
        return None
    fig, axes = _new_figure(9, 3.4)
    ax = axes[0]
    styles = {"epsilon": (CYCLE_COLOR, "-"), "v_param": (STABLE_COLOR, "--"), "x0": ("#009E73", ":")}
    for name, ys in gain["gain"].items():
        color, style = styles.get(name, (OTHER_COLOR, "-"))
        configured = " (configured)" if name == gain["parameterization"] else ""
        ax.plot(gain["t"], ys, style, color=color, linewidth=2.5 if configured else 1.5, label=f"{name}{configured}")
    ax.set_yscale("log")
    for level, label in ((gain["review_above"], "REVIEW above"), (gain["incompatible_above"], "INCOMPATIBLE above")):
        ax.axhline(level, color="#444", linewidth=1, linestyle="-." if "REVIEW" in label else "-")
        ax.text(0.45, level * 1.15, f"{label} {level:g}", fontsize=8, color="#444", ha="center")
    point = gain["point"]
    ax.plot(
        [point["t"]],
        [point["gain"]],
        "o",
        markersize=11,
        markerfacecolor="none",
        markeredgecolor="#000",
        markeredgewidth=2,
    )
    ax.annotate(
        f"measured through the trainer: {point['gain']:.3g}x at t = {point['t']:.3g}",
        (point["t"], point["gain"]),
        xytext=(-16, 0),  # left of the circle: clear of the title whatever the gain
        textcoords="offset points",
        ha="right",
        va="center",
        fontsize=9,
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#999", "alpha": 0.9},
    )
    ax.set_xlabel("latent timestep t", fontsize=10)
    ax.set_ylabel("x0 error gain |dx0 / d prediction|", fontsize=10)
    ax.set_title(f"{gain['schedule']} schedule, {gain['num_timesteps']} steps", fontsize=11)
    ax.legend(fontsize=8, loc="upper left")
    caption = (
        "How much an error in the T2L prediction is amplified in the x0 that cycle_text conditions on, for each "
        "parameterization on the configured schedule (closed forms), and the configured point measured through "
        "the trainer (circle). Look for: the circle at t = 1 (latent_t_mode full) above the INCOMPATIBLE line, "
        "which epsilon reaches near t = 1 on the cosine schedule; v_param and x0 stay near 1."
    )
    return fig, caption


def draw_gradient_flow(data: dict):
    """For each loss term, the parameter tensors of each group it sends gradient to.

    Args:
        data: the gradient_flow row's figure data (`reach_stable_*`, `reach_cycle`).
    Returns:
        (matplotlib figure, caption), or None without the data.
    """
    cycle = data.get("reach_cycle") or {}
    stable = {mode: data[f"reach_stable_{mode}"] for mode in ("l2t", "t2l") if data.get(f"reach_stable_{mode}")}
    if not cycle and not stable:
        return None
    frozen_by = {"l2t": "latent", "t2l": "text"}  # upstream's stable modes
    compared = {"base_L2T": "l2t", "base_T2L": "t2l"}  # the cycle term and the stable mode it corresponds to
    rows = [(f"stable {m}", reach, None) for m, reach in stable.items()]
    rows += [(f"cycle {t}", reach, frozen_by.get(compared.get(t, ""))) for t, reach in cycle.items()]
    groups = ["text", "latent", "shared"]
    fig, axes = _new_figure(7.5, 0.5 * len(rows) + 1.3)
    ax = axes[0]
    ax.grid(False)
    for i, (label, reach, frozen_group) in enumerate(rows):
        for j, group in enumerate(groups):
            got, total = reach.get(group, [0, 0])
            share = got / total if total else 0.0
            beyond = frozen_group == group and got > 0
            face = "#E69F00" if beyond else (STABLE_COLOR if label.startswith("stable") else CYCLE_COLOR)
            ax.add_patch(
                _rect(
                    j,
                    i,
                    face if share else "#ffffff",
                    0.25 + 0.75 * share if share else 1.0,
                    hatch="xx" if beyond else "",
                )
            )
            text = f"{got}/{total}" + (" beyond stable" if beyond else "")
            ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=9, color="#000")
    ax.set_xlim(0, len(groups))
    ax.set_ylim(len(rows), 0)
    ax.set_xticks([j + 0.5 for j in range(len(groups))], [f"{g} group" for g in groups])
    ax.set_yticks([i + 0.5 for i in range(len(rows))], [label for label, _, _ in rows])
    ax.set_title("parameter tensors each loss term sends gradient to", fontsize=11)
    caption = (
        "For each loss term (rows), how many parameter tensors of each group (columns, by upstream's name "
        "substrings) get a non-zero gradient; an empty cell gets none. The stable modes freeze a group each "
        "(l2t the latent group, t2l the text group). Look for: hatched orange cells, where a cycle term updates "
        "the group the matching stable mode kept frozen (the row's REVIEW): those weights move in a direction "
        "the pretraining never trained."
    )
    return fig, caption


def _rect(x: float, y: float, color: str, alpha: float, hatch: str = ""):
    from matplotlib.patches import Rectangle

    return Rectangle((x + 0.03, y + 0.06), 0.94, 0.88, facecolor=color, alpha=alpha, edgecolor="#333", hatch=hatch)


def draw_cycle_weights(config: dict | None, applied: dict | None):
    """The cycle weights per step: the config's schedule, and the row's test ramp as applied.

    Args:
        config: recommended_settings' `config_weights`, if recorded.
        applied: cycle_terms' `ramp_applied`, if recorded.
    Returns:
        (matplotlib figure, caption), or None without either.
    """
    if not config and not applied:
        return None
    panels = [p for p in (config, applied) if p]
    fig, axes = _new_figure(11 if len(panels) == 2 else 6.5, 3.2, len(panels))
    for ax, data, title in zip(
        axes,
        panels,
        [
            t
            for t, p in (
                ("your cycle config: weights per step", config),
                ("the row's test ramp: weights the trainer's loss followed", applied),
            )
            if p
        ],
    ):
        for term, color, style in (("cycle_text", STABLE_COLOR, "-"), ("cycle_latent", CYCLE_COLOR, "--")):
            if data is config:
                ax.plot(data["steps"], data[term], style, color=color, linewidth=2, drawstyle="steps-post", label=term)
            else:
                ax.plot(
                    data["steps"], data[term], style, color=color, marker="o", linewidth=1.5, label=f"{term} (checked)"
                )
        if data is config and data.get("checked_step") is not None:
            step = data["checked_step"]
            for term, color in (("cycle_text", STABLE_COLOR), ("cycle_latent", CYCLE_COLOR)):
                ax.plot([step], [data["checked"][term]], "D", color=color, markersize=9, markeredgecolor="#000")
            ax.axvline(step, color="#444", linewidth=1, linestyle=":")
            ax.text(step, ax.get_ylim()[1] * 0.95, f" trainer checked at step {step}", fontsize=8, va="top")
        ordered = sorted(data["steps"])
        if data is applied and len(ordered) > 1 and ordered[-1] > 3 * max(ordered[-2], 1):
            ax.set_xscale("symlog", linthresh=max(1, ordered[-2]))  # a far last step: log scale past the ramp
        ax.set_xlabel("training step", fontsize=10)
        ax.set_ylabel("weight", fontsize=10)
        ax.set_title(title, fontsize=11)
        ax.legend(fontsize=8, loc="lower right")
    caption = (
        "The cycle terms' weights over the first steps: warmup (0), then a linear ramp to the base weight. Left: "
        "what the configured cycle_*_weight / warmup / ramp give, with the step at which the row checked the "
        "trainer's loss against them (diamonds). Right: the weights the trainer's total loss was shown to follow "
        "under the row's own test ramp. Look for: small weights (review section 5: 0.1) reached gradually, "
        "not a jump at step 0."
    )
    return fig, caption


def draw_resources(data: dict):
    """Stacked memory parts of one step, stable against cycle.

    Args:
        data: the resources row's figure data (`memory`: {"stable": {part: bytes}, "cycle": {...}}).
    Returns:
        (matplotlib figure, caption), or None without the data.
    """
    memory = data.get("memory")
    if not memory:
        return None
    kinds = [k for k in ("stable", "cycle") if k in memory]
    parts = list(dict.fromkeys(p for k in kinds for p in memory[k]))
    fig, axes = _new_figure(9, 1.0 + 0.6 * len(kinds))
    ax = axes[0]
    palette = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999"]
    hatches = ["", "//", "..", "xx", "\\\\", "++", "oo", "--"]
    for i, part in enumerate(parts):
        lefts = [sum(float(memory[k].get(p, 0)) for p in parts[:i]) / 2**20 for k in kinds]
        widths = [float(memory[k].get(part, 0)) / 2**20 for k in kinds]
        ax.barh(
            kinds,
            widths,
            left=lefts,
            color=palette[i % len(palette)],
            hatch=hatches[i % len(hatches)],
            label=part,
            edgecolor="#333",
        )
    ax.set_xlabel("MiB", fontsize=10)
    ax.invert_yaxis()
    ax.legend(fontsize=8, ncols=min(4, len(parts)), loc="lower right")
    caption = (
        "Memory of one training step, split by what holds it, stable against cycle. Look for: which part "
        "grows in the cycle run (its extra passes keep activations alive) and whether the total still fits "
        "your device."
    )
    return fig, caption


FIGURES = (  # id, row, title, drawing function of the row's figure data
    ("trajectories", "trajectories", "Trajectories: loss and gradient norm per step", draw_trajectories),
    ("t2l_timesteps", "t2l_latent_timestep", "T2L latent timesteps fed to the model", draw_t2l_timesteps),
    ("x0_gain", "x0_reconstruction", "x0 error gain against t", draw_x0_gain),
    ("gradient_flow", "gradient_flow", "Gradient flow per parameter group", draw_gradient_flow),
    ("cycle_weights", "cycle_terms", "Cycle weights over steps", None),
    ("resources", "resources", "Memory split, stable vs cycle", draw_resources),
)


def draw_figures(matrix: dict) -> list[Figure]:
    """Every figure whose data the matrix holds, drawn (Agg, SVG).

    Args:
        matrix: compat-matrix.json as a dict.
    """
    inputs = figure_inputs(matrix)
    drawn = []
    for figure_id, row, title, draw in FIGURES:
        if draw is None:  # the cycle weights combine two rows' data
            made = draw_cycle_weights(
                inputs.get("recommended_settings", {}).get("config_weights"), inputs.get(row, {}).get("ramp_applied")
            )
            if made is not None and "ramp_applied" not in inputs.get(row, {}):
                row = "recommended_settings"
        else:
            made = draw(inputs[row]) if row in inputs else None
        if made is None:
            continue
        fig, caption = made
        width, height = fig.get_size_inches()
        drawn.append(
            Figure(
                figure_id, row, title, caption, _svg(fig), int(width * PIXELS_PER_INCH), int(height * PIXELS_PER_INCH)
            )
        )
    return drawn
