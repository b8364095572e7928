"""``medistill report``: one self-contained HTML file for one or several run directories.

Figures are drawn with matplotlib and embedded as base64 PNGs; the page loads nothing from the
network and needs no JavaScript.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from medistill import plots as P
from medistill.errors import NotARunError
from medistill.eval.tables import CI_NOTE, STUDENT_ROLES, degenerate_notes, role_label, with_ci
from medistill.io import write_text
from medistill.plots import png_data_uri
from medistill.rundir import read_run_json, read_run_jsonl, student_dir

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1150px;color:#1d2433;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;border-bottom:1px solid #d5dae3;padding-bottom:.25rem;margin-top:2.2rem}
h3{font-size:1.05rem}table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}
td,th{border:1px solid #d5dae3;padding:.3rem .55rem;text-align:right}th{background:#eef1f6}
td:first-child,th:first-child{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:1rem}
.grid figure{margin:0}.note{color:#5a6478;font-size:.85rem}img{max-width:100%}
"""


def _img_file(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return html.escape(str(v))


def _latency(r: dict[str, Any]) -> str:
    """Median batch-1 latency with its interquartile range over the repeats (one number alone hides
    how noisy a busy machine made it)."""
    lat = (r.get("latency") or {}).get("cpu_batch1") or {}
    if lat.get("median_ms") is None:
        return "–"
    spread = f" ({lat['q1_ms']:.2f}–{lat['q3_ms']:.2f})" if lat.get("q1_ms") is not None else ""
    return f"{lat['median_ms']:.2f}{spread}"


def _verdict_section(distilled: Path, record: dict[str, Any], alone: Path | None) -> str:
    """"Did distillation help?": the paired differences, then per-class recall alone vs distilled."""
    from medistill.eval.compare import verdict_line

    parts = ["<h3 id='did-it-help'>Did distillation help?</h3><ul>"
             + "".join(f"<li>{html.escape(verdict_line(s, r))}</li>" for s, r in record["students"].items()) + "</ul>"]
    for s, r in record["students"].items():
        try:
            a = json.loads((student_dir(distilled, s) / "metrics.json").read_text())
            b = json.loads((student_dir(alone, r["alone"]) / "metrics.json").read_text()) if alone else None
        except (OSError, json.JSONDecodeError):
            continue
        if not b:
            continue
        names = a.get("class_names") or [str(i) for i in range(len(a["test"]["per_class_recall"]))]
        rows = "".join(f"<tr><td>{html.escape(str(c))}</td><td>{_fmt(rb)}</td><td>{_fmt(ra)}</td><td>{_fmt(n, 0)}</td></tr>"
                       for c, rb, ra, n in zip(names, b["test"]["per_class_recall"], a["test"]["per_class_recall"],
                                               a["test"].get("support") or [None] * len(names)))
        parts.append(f"<h4>{html.escape(s)}: per-class recall, alone vs distilled (test)</h4><table><tr><th>class</th>"
                     f"<th>alone</th><th>distilled</th><th>test images</th></tr>{rows}</table>")
    return "".join(parts)


def _model_table(rows: dict[str, dict[str, Any]]) -> str:
    keys = ["accuracy", "balanced_accuracy", "macro_f1", "qwk", "auroc", "ece"]
    if all(r["test"].get("qwk") is None for r in rows.values()):   # nominal data: QWK means nothing
        keys.remove("qwk")
    names = {"accuracy": "OA", "balanced_accuracy": "mAcc", "macro_f1": "macro-F1", "qwk": "QWK", "auroc": "AUROC", "ece": "ECE"}
    head = ("<table><tr><th>model</th><th>role</th><th>params (M)</th><th>MFLOPs</th><th>CPU latency b1, ms: median (IQR)</th>"
            + "".join(f"<th>{names[k]}</th>" for k in keys) + "</tr>")
    body = []
    for n, r in rows.items():
        t, mdl = r["test"], r.get("model", {})
        body.append(f"<tr><td>{html.escape(n)}</td><td>{html.escape(role_label(r.get('role', 'student'), rows, r))}</td><td>{mdl.get('params', 0) / 1e6:.2f}</td>"
                    f"<td>{mdl.get('flops', 0) / 1e6:.1f}</td><td>{_latency(r)}</td>"
                    + "".join(f"<td>{html.escape(with_ci(t, k))}</td>" for k in keys)
                    + "</tr>")
    n = next((r["test"]["ci95"].get("resamples") for r in rows.values() if r.get("test", {}).get("ci95")), None)
    return head + "".join(body) + "</table>" + (f"<p class='note'>{html.escape(CI_NOTE.format(n=n))}</p>" if n else "")


def _run_section(run: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    parts = [f"<section class='run'><h2>Run {html.escape(run.name)}</h2><p class='note'>{html.escape(str(run.resolve()))}</p>"]
    summary = read_run_json(run / "summary.json") if (run / "summary.json").is_file() else {}
    from medistill.eval.compare import read_comparison
    from medistill.rundir import resolve_in_run

    record = read_comparison(run)
    if record:
        alone = Path(resolve_in_run(record["alone_run"], run))
        parts.append(_verdict_section(run, record, alone if alone.is_dir() else None))
    parts.append("<h3 id='models'>Teacher vs students</h3>" + _model_table(summary))
    described = (read_run_json(run / "run_info.json").get("description") or []) if (run / "run_info.json").is_file() else []
    if described:
        parts.append("<h3 id='this-run'>This run</h3><ul>" + "".join(f"<li>{html.escape(d)}</li>" for d in described)
                     + "</ul>")
    notes = degenerate_notes(summary) if summary else []
    parts += [f"<p class='note'><b>Warning:</b> {html.escape(n)}</p>" for n in notes]
    log_path = run / "metrics.jsonl"
    if log_path.is_file():
        log = read_run_jsonl(log_path)
        if log:
            parts.append(f"<h3 id='curves'>Training curves</h3><img alt='training curves' src='{png_data_uri(P.curves_figure(log))}'>")
            diag = log[-1].get("diagnostics") or {}
            if diag:
                parts.append("<h3>Diagnostics (last epoch, mean per true class)</h3><table><tr><th>term.diagnostic</th><th>mean</th><th>per class</th></tr>"
                             + "".join(f"<tr><td>{html.escape(t)}.{html.escape(k)}</td><td>{_fmt(v['mean'])}</td><td>{', '.join(_fmt(x) for x in v['per_class'])}</td></tr>"
                                       for t, d in diag.items() for k, v in d.items()) + "</table>")
    students = {n: r for n, r in summary.items() if r.get("role") in STUDENT_ROLES}
    names = read_run_json(run / "split.json").get("class_names") if (run / "split.json").is_file() else None
    if summary:
        names = names or [str(i) for i in range(len(next(iter(summary.values()))["test"]["confusion_matrix"]))]
        parts.append(f"<h3 id='recall'>Per-class recall</h3><img alt='per-class recall' src='{png_data_uri(P.recall_figure(summary, names))}'>")
        figs = [f"<figure><img alt='confusion {html.escape(n)}' src='{png_data_uri(P.confusion_figure(r['test']['confusion_matrix'], names, n))}'></figure>"
                for n, r in summary.items()]
        parts.append("<h3 id='confusion'>Confusion matrices (test)</h3><div class='grid'>" + "".join(figs) + "</div>")
        rel = [f"<figure><img alt='reliability {html.escape(n)}' src='{png_data_uri(P.reliability_figure(student_dir(run, n) / 'predictions_test.csv', n))}'></figure>"
               for n in students if (student_dir(run, n) / "predictions_test.csv").is_file()]
        if rel:
            parts.append("<h3 id='calibration'>Reliability diagrams (test, 15 bins)</h3><div class='grid'>" + "".join(rel) + "</div>")
        parts.append(_operating_points(summary))
    parts.append(_data_section(run))
    exp = run / "explain"
    if (exp / "explain.md").is_file():
        parts.append("<h3 id='explanations'>Explanations</h3>" + _md_table_html((exp / "explain.md").read_text()))
        for png in sorted(exp.glob("grid_*.png")) + sorted(exp.glob("layers_*.png")):
            parts.append(f"<figure><figcaption>{html.escape(png.stem)}</figcaption><img alt='{html.escape(png.stem)}' src='{_img_file(png)}'></figure>")
    parts.append("</section>")
    return "".join(parts), summary


def _data_section(run: Path) -> str:
    """What the run's data check said (split.json notes) and, after ``medistill audit RUN``, the
    audit's findings with the first likely label errors."""
    notes = read_run_json(run / "split.json").get("notes", []) if (run / "split.json").is_file() else []
    path = run / "audit" / "audit.json"
    if not notes and not path.is_file():
        return ""
    out = ["<h3 id='data-audit'>Data audit</h3>"] + [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    if path.is_file():
        a = read_run_json(path)
        ex, nr = a["exact"], a["near"]
        rows = [("label conflicts (same pixels, two labels)", ex["label_conflict_groups"],
                 ", ".join(f"{n} {k}" for k, n in ex["label_conflicts"].items())),
                ("exact copies across splits", sum(ex["across_splits"].values()),
                 ", ".join(f"{n} {k}" for k, n in ex["across_splits"].items())),
                (f"near-duplicates (pHash ≤ {nr['threshold_bits']} bits)", nr["pairs"],
                 f"{nr['across_splits']} across splits, {nr['different_labels']} with different labels")]
        li = a.get("label_issues")
        if li:
            rows.append(("likely label errors", sum(li["flagged"].values()),
                         ", ".join(f"{n} in {k}" for k, n in li["flagged"].items()) + f" ({li['csv']})"))
        out.append("<table><tr><th>finding</th><th>count</th><th>detail</th></tr>" + "".join(
            f"<tr><td>{html.escape(f)}</td><td>{n}</td><td>{html.escape(d or 'none')}</td></tr>" for f, n, d in rows) + "</table>")
        if li and li["top"]:
            out.append("<p class='note'>Most likely label errors (review before trusting these labels):</p><table><tr>"
                       "<th>rank</th><th>split</th><th>image</th><th>given</th><th>suggested</th><th>p(given)</th></tr>" + "".join(
                           f"<tr><td>{r['rank']}</td><td>{r['split']}</td><td>{html.escape(str(r['image']))}</td>"
                           f"<td>{html.escape(r['given'])}</td><td>{html.escape(r['suggested'])}</td><td>{r['p_given']}</td></tr>"
                           for r in li["top"][:10]) + "</table>")
    return "".join(out)


def _operating_points(summary: dict[str, dict[str, Any]]) -> str:
    """Binary tasks: sensitivity, specificity, PPV, NPV and F1 at the argmax and at the threshold
    chosen on validation, with AUPRC; per-class sensitivity/specificity otherwise."""
    rows = []
    for n, r in summary.items():
        t = r.get("test", {})
        for point, op in (t.get("operating_points") or {}).items():
            label = "argmax" if op["threshold"] is None else f"P(class 1) ≥ {op['threshold']:.3f}"
            rows.append(f"<tr><td>{html.escape(n)}</td><td>{html.escape(label)}</td>"
                        + "".join(f"<td>{_fmt(op[k])}</td>" for k in ("sensitivity", "specificity", "ppv", "npv", "f1"))
                        + f"<td>{_fmt(t.get('auprc'))}</td></tr>")
    if rows:
        return ("<h3 id='operating'>Operating points (test; the threshold was chosen on validation)</h3><table><tr><th>model"
                "</th><th>decision</th><th>sensitivity</th><th>specificity</th><th>PPV</th><th>NPV</th><th>F1</th>"
                "<th>AUPRC</th></tr>" + "".join(rows) + "</table>")
    per = [(n, r["test"]) for n, r in summary.items() if r.get("test", {}).get("per_class_sensitivity")]
    if not per:
        return ""
    return ("<h3 id='operating'>Per-class sensitivity / specificity / ECE (test)</h3><table><tr><th>model</th><th>per class"
            "</th></tr>" + "".join(
                f"<tr><td>{html.escape(n)}</td><td>" + ", ".join(
                    f"{_fmt(se, 2)}/{_fmt(sp, 2)}/{_fmt(e, 3)}" for se, sp, e in
                    zip(t["per_class_sensitivity"], t["per_class_specificity"], t["per_class_ece"])) + "</td></tr>"
                for n, t in per) + "</table>")


def _md_table_html(md: str) -> str:
    """Render the pipe tables and paragraphs of explain.md (a tiny subset of markdown)."""
    out, rows = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
            continue
        if rows:
            out.append("<table>" + "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>" for c in r) + "</tr>"
                                           for i, r in enumerate(rows)) + "</table>")
            rows = []
        if line.startswith("#"):
            out.append(f"<h4>{html.escape(line.lstrip('# '))}</h4>")
        elif line.strip():
            out.append(f"<p class='note'>{html.escape(line)}</p>")
    return "".join(out)


def _paired_across(runs: list[Path]) -> str:
    """Several runs, some of students trained alone: each other run against each alone run that
    shares its test images, paired."""
    from medistill.errors import MedistillError
    from medistill.eval.compare import compare_runs

    def alone_only(r: Path) -> bool:
        roles = {v.get("role") for v in read_run_json(r / "summary.json").values()}
        return roles <= {"trained alone"} or ("student" in roles and roles <= {"student"})

    alones = [r for r in runs if alone_only(r)]
    parts = []
    for r in runs:
        for a in alones:
            if r in alones:
                continue
            try:
                rec = {"alone_run": str(a), "students": compare_runs(r, a)}
            except MedistillError:
                continue     # another split or other students: not comparable, nothing to pair
            parts.append(f"<h4>{html.escape(r.name)} vs {html.escape(a.name)}</h4>" + _verdict_section(r, rec, a))
    return "".join(parts)


def build_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write ``report.html`` (into the single run dir, or ``out``) and return its path."""
    runs = [Path(r) for r in run_dirs]
    for r in runs:
        if not (r / "summary.json").is_file():
            raise NotARunError(f"{r}: no summary.json (not a finished medistill run)")
    sections, all_rows = [], {}
    for r in runs:
        sec, rows = _run_section(r)
        sections.append(sec)
        for n, v in rows.items():
            all_rows[f"{r.name}/{n}" if len(runs) > 1 else n] = v
    title = "medistill report" + (f": {runs[0].name}" if len(runs) == 1 else f": {len(runs)} runs")
    comparison = (f"<h2 id='comparison'>Comparison</h2>{_paired_across(runs)}{_model_table(all_rows)}"
                  if len(runs) > 1 else "")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            "<p class='note'>OA = accuracy; mAcc = balanced accuracy (mean per-class recall); checkpoints selected on "
            "validation, metrics on the untouched test split.</p>" + comparison + "".join(sections) + "</body></html>")
    dest = Path(out) if out else (runs[0] / "report.html" if len(runs) == 1 else Path("report.html"))
    write_text(dest, page)
    return dest
