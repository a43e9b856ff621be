"""The audit's report: results.json, summary.md, PNG charts and a self-contained, escaped report.html; and a
shareable export of a run with no record text."""
from __future__ import annotations

import base64
import html
import itertools
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from kdfast.audit.frontier import frontier_points, plot_frontier  # noqa: E402
from kdfast.io import atomic_path, atomic_write_json, atomic_write_text  # noqa: E402

FPRS = ("0.25", "0.05", "0.01", "0.001", "0.0")


def _fmt(x, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def degenerate(model: dict) -> bool:
    """Whether the audit flagged this model degenerate (kdfast.audit.degeneracy's rule; old runs: never)."""
    return bool((model.get("health") or {}).get("degenerate"))


def _working(model: dict) -> str:
    if not model.get("health"):
        return "not measured"
    return "degenerate: " + "; ".join(model["health"]["reasons"]) if degenerate(model) else "yes"


def auc_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and lines of the model × attack AUC table (the study's heatmap as text), with whether each model
    is a working model: a degenerate one's AUCs are no evidence about its technique."""
    header = ["model"] + results["attacks"] + ["working model"]
    lines = [[m["label"]] + [_fmt(m["auc"].get(a)) for a in results["attacks"]] + [_working(m)]
            for m in results["models"]]
    return header, lines


def tpr_table(results: dict, fpr: str = "0.01") -> tuple[list[str], list[list[str]]]:
    """TPR at FPR ≤ fpr by model and attack: the ROC's, then "held-out TPR / realized FPR" at the threshold chosen
    on the calibration half of the non-members (where the run calibrated it)."""
    header = ["model"] + results["attacks"]
    lines = []
    for m in results["models"]:
        row = [m["label"]]
        for a in results["attacks"]:
            cell = _fmt(m.get("tpr_at_fpr", {}).get(a, {}).get(fpr), 3)
            cal = (m.get("calibrated", {}).get(a) or {}).get("at_fpr", {}).get(fpr)
            row.append(f"{cell} ({_fmt(cal['tpr'], 3)}/{_fmt(cal['fpr'], 3)})" if cal else cell)
        lines.append(row)
    return header, lines


def _struck(lines: list[list[str]], grey: list[bool], verdict: bool = True) -> list[list[str]]:
    """Markdown has no grey: a degenerate model's figures are struck through (its label and the verdict, the last
    column where `verdict`, are not)."""
    out = []
    for r, g in zip(lines, grey):
        end = len(r) - verdict
        out.append([r[0]] + [f"~~{c}~~" if g and c != "–" else c for c in r[1:end]] + r[end:])
    return out


def md_escape(text) -> str:
    """Text as Markdown shows it literally: HTML-escaped (a viewer renders raw HTML), backslashes and table pipes
    escaped, newlines folded (a table row or heading is one line)."""
    text = html.escape(" ".join(str(text).splitlines()), quote=False)
    return text.replace("\\", "\\\\").replace("|", "\\|")


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    """A Markdown table; every cell is escaped (labels, ids and size keys come from the user's config)."""
    line = lambda cells: "| " + " | ".join(md_escape(c) for c in cells) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(r) for r in lines])


def text_table(header: list[str], lines: list[list[str]]) -> str:
    """A plain aligned table for the terminal."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_heatmap(results: dict, path: Path) -> Path:
    attacks, models = results["attacks"], results["models"]
    grid = np.array([[m["auc"].get(a, np.nan) for a in attacks] for m in models], dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(attacks) + 2.5, 0.45 * len(models) + 1.5))
    greyed = np.array([degenerate(m) for m in models], dtype=bool)
    im = ax.imshow(np.where(greyed[:, None], np.nan, grid), cmap="RdBu_r", vmin=0.0, vmax=1.0, aspect="auto")
    if greyed.any():  # a degenerate model's row: grey, its figures faint, marked on its label
        ax.imshow(np.where(greyed[:, None], 0.0, np.nan) + np.zeros_like(grid),
                  cmap=ListedColormap(["#e6e6e6"]), aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=35, ha="right")
    ax.set_yticks(range(len(models)), [m["label"] + (" (degenerate)" if g else "") for m, g in zip(models, greyed)])
    for tick, g in zip(ax.get_yticklabels(), greyed):
        tick.set_color("grey" if g else "black")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                color = "#999999" if greyed[i] else "white" if abs(grid[i, j] - 0.5) > 0.3 else "black"
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(im, ax=ax, label="ROC AUC (0.5 = no leakage)")
    title = "Membership inference AUC by model and attack"
    ax.set_title(title + ("\ngrey rows: degenerate models, their AUCs are no evidence" if greyed.any() else ""))
    return _save(fig, path)


def plot_roc_by_model(results: dict, attack: str, path: Path) -> Path:
    """One attack's ROC curve for every model (kdfast.attacks.plot_roc draws one model's curve per attack)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for m in results["models"]:
        roc = m.get("roc", {}).get(attack)
        if roc:
            ax.plot(roc["fpr"], roc["tpr"], label=f"{m['label']} ({_fmt(m['auc'].get(attack))})", lw=1.2)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {attack} attack")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_memorization(results: dict, path: Path) -> Path:
    models = [m for m in results["models"] if m.get("memorization")]
    x = np.arange(len(models))
    fig, ax = plt.subplots(figsize=(0.8 * len(models) + 3, 4))
    member = [m["memorization"]["member"] for m in models]
    nonmember = [m["memorization"]["nonmember"] for m in models]
    ax.bar(x - 0.2, member, 0.4, label="members")
    ax.bar(x + 0.2, nonmember, 0.4, label="non-members")
    for i, m in enumerate(models):
        ax.text(i, max(member[i], nonmember[i]) + 0.01, f"gap {m['memorization']['gap']:+.3f}", ha="center", fontsize=7)
    ax.set_xticks(x, [m["label"] for m in models], rotation=35, ha="right")
    ax.set(ylabel="match accuracy (first tokens, greedy)", title="Memorization: members vs non-members")
    ax.legend()
    return _save(fig, path)


def plot_per_block(results: dict, path: Path) -> Path | None:
    models = [m for m in results["models"] if m.get("mope_block")]
    if not models:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in models:
        blocks = sorted(m["mope_block"], key=int)
        ax.plot([int(b) for b in blocks], [m["mope_block"][b] for b in blocks], marker="o", label=m["label"])
    ax.axhline(0.5, color="k", ls=":", lw=0.8)
    ax.set(xlabel="transformer block perturbed", ylabel="MoPe AUC", title="Per-block MoPe AUC")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_utility(results: dict, attack: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for m in results["models"]:
        u, a = m.get("utility", {}).get("rouge_l"), m["auc"].get(attack)
        if u is not None and a is not None:
            ax.scatter(u, a)
            ax.annotate(m["label"], (u, a), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.5, color="k", ls=":", lw=0.8)
    ax.set(xlabel="utility: ROUGE-L on held-out prompts", ylabel=f"leakage: {attack} AUC",
           title="Utility beside leakage")
    return _save(fig, path)


def plot_sizes(results: dict, attack: str, path: Path) -> Path | None:
    sizes = list(dict.fromkeys(m["size"] for m in results["models"] if m.get("size")))
    if len(sizes) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for tech in dict.fromkeys(m["technique"] for m in results["models"] if m.get("size")):
        ys = [next((m["auc"].get(attack) for m in results["models"]
                    if m.get("size") == s and m["technique"] == tech), None)
              for s in sizes]
        ax.plot(sizes, [np.nan if y is None else y for y in ys], marker="o", label=tech)
    ax.set(xlabel="student size", ylabel=f"{attack} AUC", title="Leakage by student size")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _plain_kd(results: dict, model: dict) -> dict | None:
    """The plain KD student of an ablation student's size (full teacher logits, default settings), if audited."""
    return next((m for m in results["models"] if m["role"] == "student" and m["technique"] == "kd"
                 and m["size"] == model["size"]), None)


def plot_ablations(results: dict, attack: str, path: Path) -> Path | None:
    abl = results.get("ablations") or {}
    panels = [(k, v) for k, v in abl.items() if v]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    by_id = {m["id"]: m for m in results["models"]}
    for ax, (name, entries) in zip(axes[0], panels):
        labels = [str(e["value"]) for e in entries]
        values = [by_id[e["model_id"]]["auc"].get(attack, np.nan) for e in entries]
        ax.bar(labels, values, color="tab:purple")
        ax.axhline(0.5, color="k", ls=":", lw=0.8)
        if kd := _plain_kd(results, by_id[entries[0]["model_id"]]):
            ax.axhline(kd["auc"].get(attack, np.nan), color="tab:green", ls="--", lw=1, label=kd["label"])
            ax.legend(fontsize=7)
        ax.set(xlabel=name.replace("_", " "), ylabel=f"{attack} AUC", title=f"Ablation: {name.replace('_', ' ')}")
    return _save(fig, path)


def _ablation_table(results: dict, attack: str) -> tuple[list[str], list[list[str]]]:
    """Each ablation student's leakage (AUC and TPR at 1% FPR of `attack`) and utility, after the plain KD student
    of its size (teacher_topk: its value is k, the plain KD student's is the full logits)."""
    header = ["ablation", "value", "model", f"{attack} AUC", f"{attack} TPR@1%FPR", "ROUGE-L"]
    by_id, lines = {m["id"]: m for m in results["models"]}, []

    def row(name: str, value, m: dict) -> list[str]:
        tpr = m.get("tpr_at_fpr", {}).get(attack, {}).get("0.01")
        return [name.replace("_", " "), str(value), m["label"], _fmt(m["auc"].get(attack)), _fmt(tpr, 3),
                _fmt(m.get("utility", {}).get("rouge_l"), 3)]

    for name, entries in (results.get("ablations") or {}).items():
        if not entries:
            continue
        if kd := _plain_kd(results, by_id[entries[0]["model_id"]]):
            lines.append(row(name, "all logits" if name == "teacher_topk" else "plain KD", kd))
        lines += [row(name, e["value"], by_id[e["model_id"]]) for e in entries]
    return header, lines


def _finite(obj):
    """NaN and ±inf become null, so results.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _img(path: Path | None) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></figure>'


def _html_table(header: list[str], lines: list[list[str]], grey: list[bool] | None = None) -> str:
    """An escaped table; lines where `grey` is true are greyed out (a degenerate model's figures)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    grey = grey or [False] * len(lines)
    body = "".join(("<tr class='degenerate'>" if g else "<tr>") + "".join(f"<td>{html.escape(str(c))}</td>" for c in r)
                   + "</tr>" for r, g in zip(lines, grey))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _health_table(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "ROUGE-L", "empty answers", "repeated 4-grams", "distinct-2", "held-out cross-entropy",
              "working model"]
    lines = [[m["label"], _fmt(m.get("utility", {}).get("rouge_l"), 3), _fmt(h.get("empty_rate"), 2),
             _fmt(h.get("repeated_4gram"), 2), _fmt(h.get("distinct_2"), 2), _fmt(h.get("cross_entropy"), 2),
             _working(m)] for m in results["models"] if (h := m.get("health"))]
    return header, lines


def no_finding_note(results: dict) -> str:
    """The sentence that withholds findings about degenerate models ("" when every model works)."""
    bad = [m for m in results["models"] if degenerate(m)]
    if not bad:
        return ""
    rule = results.get("degeneracy_rule", {})
    names = ", ".join(m["label"] for m in bad)
    return (f"No finding is stated about {names}: degenerate by the audit's rule ({_rule_text(rule)}), so its "
            "membership and memorization figures measure a model that cannot answer, not its technique.")


def _rule_text(rule: dict) -> str:
    if not rule:
        return "see kdfast/audit/degeneracy.py"
    return (f"more than {rule['max_empty']:.0%} empty answers, more than {rule['max_repeated_4gram']:.0%} repeated "
            f"4-grams, distinct-2 below {rule['min_distinct_2']}, or held-out cross-entropy more than "
            f"{rule['max_excess_cross_entropy']} nats above the pretrained base's"
            + (f" ({rule['base_cross_entropy']:.2f})" if rule.get("base_cross_entropy") is not None else ""))


def _memorization_table(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "members", "non-members", "gap", "approx. members", "utility ROUGE-L"]
    lines = [[m["label"], _fmt(m["memorization"]["member"], 3), _fmt(m["memorization"]["nonmember"], 3),
             _fmt(m["memorization"]["gap"], 3), _fmt(m["memorization"].get("member_approx"), 3),
             _fmt(m.get("utility", {}).get("rouge_l"), 3)]
            for m in results["models"] if m.get("memorization")]
    return header, lines


def _interval(ci) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "–"


def _tpr_table(results: dict, attack: str) -> tuple[list[str], list[list[str]]]:
    header = ["model", "AUC", "95% CI"] + [f"TPR@FPR≤{f}" for f in FPRS]
    lines = []
    for m in results["models"]:
        tpr = m.get("tpr_at_fpr", {}).get(attack, {})
        lines.append([m["label"], _fmt(m["auc"].get(attack)), _interval(m.get("auc_ci95", {}).get(attack))]
                    + [_fmt(tpr.get(f), 3) for f in FPRS])
    return header, lines


def _ci_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """The bootstrap 95% interval of every AUC, by model and attack."""
    header = ["model"] + results["attacks"]
    lines = [[m["label"]] + [_interval(m.get("auc_ci95", {}).get(a)) for a in results["attacks"]]
            for m in results["models"]]
    return header, lines


def _per_block_table(results: dict) -> tuple[list[str], list[list[str]], list[bool]]:
    """MoPe AUC by model and perturbed block, and which lines are degenerate models (only models it ran on)."""
    models = [m for m in results["models"] if m.get("mope_block")]
    blocks = sorted({b for m in models for b in m["mope_block"]}, key=int)
    lines = [[m["label"]] + [_fmt(m["mope_block"].get(b)) for b in blocks] for m in models]
    return ["model"] + [f"block {b}" for b in blocks], lines, [degenerate(m) for m in models]


def _conditioned_table(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["student", "τ", "teacher-memorized", "student mean accuracy on them", "student also > τ"]
    lines = [[mid, _fmt(r["tau"], 1), str(r["n_teacher"]), _fmt(r["student_mean"], 3), _fmt(r["student_fraction"], 3)]
            for mid, entries in results.get("teacher_conditioned", {}).items() for r in entries]
    return header, lines


def _agreement_table(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "Jaccard", "Cohen's κ", "both", "MIA only", "memorization only", "neither"]
    lines = [[mid, _fmt(a["jaccard"], 3), _fmt(a["kappa"], 3)]
            + [str(a[k]) for k in ("both", "mia_only", "mem_only", "neither")]
            for mid, a in results.get("agreement", {}).items()]
    return header, lines


def _examples_html(examples: list[dict]) -> str:
    blocks = []
    for ex in examples:
        outs = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in ex["outputs"].items())
        blocks.append(f"<div class='ex'><p><b>Prompt:</b> {html.escape(ex['instruction'])}</p>"
                      f"<p><b>Ground truth:</b> {html.escape(ex['response'])}</p><dl>{outs}</dl></div>")
    return "".join(blocks)


def _frontier_html(results: dict, image: str) -> str:
    from kdfast.audit.frontier import defense_lines, frontier_table

    points, table = results.get("frontier", []), results.get("defenses", [])
    if not points:
        return "<p class='note'>no model has both a utility and an AUC</p>"
    note = ("<p class='note'>Each model is a point: x its ROUGE-L (rouge_score, stemmed) on held-out prompts, y the "
            "AUC and the TPR at 1% FPR of the attack strongest on it.</p>")
    defended = _html_table(*defense_lines(table)) if table else ""
    return note + image + defended + _html_table(*frontier_table(points, table))


def _frontier_md(results: dict) -> str:
    from kdfast.audit.frontier import defense_lines, frontier_table

    points, table = results.get("frontier", []), results.get("defenses", [])
    if not points:
        return ""
    text = f"\n## Privacy–utility frontier\n\n{markdown_table(*frontier_table(points, table))}\n"
    if table:
        text += f"\n## Defenses\n\n{markdown_table(*defense_lines(table))}\n"
    return text


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}
tr.degenerate td{color:#aaa;background:#f4f4f4}.ex{border-left:3px solid #88a;padding-left:1em;margin:1em 0;\
font-size:13px}dt{font-weight:bold}.note{color:#555}"""


def _summary_md(results: dict, main_attack: str) -> str:
    """summary.md: the report's tables in Markdown, every text escaped, a degenerate model's figures struck."""
    split, note = results["split"], no_finding_note(results)
    grey = [degenerate(m) for m in results["models"]]
    auc_header, auc_lines = auc_table(results)
    ci_header, ci_lines = _ci_table(results)
    tpr_header, tpr_lines = _tpr_table(results, main_attack)
    block_header, block_lines, block_grey = _per_block_table(results)
    sections = [
        ("AUC by model and attack", (md_escape(note) + "\n\n" if note else "")
         + markdown_table(auc_header, _struck(auc_lines, grey))),
        ("Bootstrap 95% intervals of the AUCs", markdown_table(ci_header, _struck(ci_lines, grey, verdict=False))),
        ("TPR at 1% FPR (held-out TPR / realized FPR at the calibrated threshold)",
         markdown_table(*tpr_table(results))),
        (f"TPR at low FPR ({md_escape(main_attack)} attack)",
         markdown_table(tpr_header, _struck(tpr_lines, grey, verdict=False))),
        ("Per-block MoPe AUC", markdown_table(block_header, _struck(block_lines, block_grey, verdict=False))
         if block_lines else "not run"),
        ("Are the models working language models?", markdown_table(*_health_table(results))),
        ("Memorization and utility", markdown_table(*_memorization_table(results))),
    ]
    ablations = _ablation_table(results, main_attack)
    if ablations[1]:
        sections.append(("Ablations: leakage and utility", markdown_table(*ablations)))
    head = (f"# kdfast audit: {md_escape(results['name'])}\n\n{split['private']} members, {split['public']} public, "
            f"{split['nonmembers']} non-members; {md_escape(results['machine'])}; "
            f"{results['time_seconds'] / 60:.1f} min.\n")
    return head + "".join(f"\n## {title}\n\n{body}\n" for title, body in sections) + _frontier_md(results)


def write_report(results: dict, out: str | Path, main_attack: str = "loss") -> dict[str, Path]:
    """Write results.json, summary.md, the PNGs and report.html under `out`; returns their paths."""
    out = Path(out)
    redacted = results.get("redacted", False)
    if "frontier" not in results:  # a results.json written before the frontier existed
        results = {**results, "frontier": frontier_points(results["models"])}
    figures = {
        "heatmap": plot_heatmap(results, out / "heatmap_auc.png"),
        "roc": plot_roc_by_model(results, main_attack, out / "roc.png"),
        "memorization": plot_memorization(results, out / "memorization.png"),
        "per_block": plot_per_block(results, out / "per_block_auc.png"),
        "sizes": plot_sizes(results, main_attack, out / "student_size.png"),
        "ablations": plot_ablations(results, main_attack, out / "ablations.png"),
        "utility": plot_utility(results, main_attack, out / "utility_vs_leakage.png"),
        "frontier": plot_frontier(results.get("frontier", []), out / "frontier.png"),
    }
    atomic_write_json(out / "results.json", _finite(results))
    auc_header, auc_lines = auc_table(results)
    grey = [degenerate(m) for m in results["models"]]
    note = no_finding_note(results)
    note_html = f"<p class='note'>{html.escape(note)}</p>" if note else ""
    ablation_table = _ablation_table(results, main_attack)
    sections = [
        ("Membership inference: AUC by model and attack",
         note_html + _html_table(auc_header, auc_lines, grey) + _img(figures["heatmap"])),
        ("Are the models working language models?", _html_table(*_health_table(results), grey)
         + f"<p class='note'>Greedy answers to held-out prompts; a model is degenerate with "
           f"{html.escape(_rule_text(results.get('degeneracy_rule', {})))}.</p>"),
        ("TPR at 1% FPR by model and attack (in brackets: held-out TPR / realized FPR at the threshold set on "
         "the calibration half of the non-members)", _html_table(*tpr_table(results))),
        (f"ROC and TPR at low FPR ({main_attack} attack)",
         _html_table(*_tpr_table(results, main_attack)) + _img(figures["roc"])),
        ("Memorization and utility", _html_table(*_memorization_table(results)) + _img(figures["memorization"])
         + _img(figures["utility"])),
        ("Teacher-conditioned memorization", _html_table(*_conditioned_table(results))),
        ("Agreement of membership and memorization", _html_table(*_agreement_table(results))),
        ("Privacy–utility frontier", _frontier_html(results, _img(figures["frontier"]))),
        ("Per-block MoPe", _img(figures["per_block"]) or "<p class='note'>not run</p>"),
        ("Student size and ablations", (_img(figures["sizes"]) + _img(figures["ablations"]))
         + (_html_table(*ablation_table) if ablation_table[1] else "")
         or "<p class='note'>one student size and no ablations configured</p>"),
    ]
    if not redacted:
        sections.append(("Examples (member records and greedy outputs)", _examples_html(results.get("examples", []))))
    split = results["split"]
    intro = (f"<p>{html.escape(results['name'])}: {split['private']} members (teacher's private half), "
             f"{split['public']} public records (students' data), {split['nonmembers']} non-members. "
             f"Machine: {html.escape(results['machine'])}. Run time: {results['time_seconds'] / 60:.1f} min. "
             "AUC above 0.5 means the attack tells members from non-members; below 0.5 the score's sign is "
             "inverted for that model (shown raw).</p>"
             + ("<p class='note'>Redacted: no record text is shown.</p>" if redacted else ""))
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>kdfast audit: {html.escape(results['name'])}"
            f"</title><style>{CSS}</style></head><body><h1>Distillation privacy audit: {html.escape(results['name'])}"
            f"</h1>{intro}{body}</body></html>")
    atomic_write_text(out / "report.html", page)
    atomic_write_text(out / "summary.md", _summary_md(results, main_attack))
    return {"report": out / "report.html", "results": out / "results.json", "summary": out / "summary.md",
            **{k: v for k, v in figures.items() if v is not None}}


def read_results(run: str | Path) -> dict:
    """The results.json of a finished audit run folder."""
    path = Path(run) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; give the folder of a finished `kdfast audit` run")
    return json.loads(path.read_text())


def redacted(results: dict) -> dict:
    """The results without record text: `examples` (member records and the models' generations) is the only
    entry that holds any; everything else is figures, labels and settings."""
    return {**{k: v for k, v in results.items() if k != "examples"}, "redacted": True}


def export_run(run: str | Path, out: str | Path, main_attack: str = "loss") -> dict[str, Path]:
    """Write a shareable copy of audit `run` into the new folder `out`: report.html, summary.md, results.json and
    the figures, all redacted; no split, stage folder or per-record table (those hold the records and generations).
    An existing `out` that is not empty is refused. Returns the written paths."""
    out = Path(out)
    results = redacted(read_results(run))
    _refuse_used(out)
    with atomic_path(out) as tmp:  # a killed export leaves no half folder that a rerun would refuse
        written = write_report(results, tmp, main_attack)
        if out.exists():
            out.rmdir()  # empty when checked; fails rather than deletes anything that arrived since
    return {k: out / p.name for k, p in written.items()}


def _refuse_used(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        free = next(c for i in itertools.count(2) if not (c := out.with_name(f"{out.name}-{i}")).exists())
        raise FileExistsError(f"{out} exists and is not an empty folder: an export goes to a new one (e.g. {free})")
