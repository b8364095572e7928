"""Render docs/benchmarks.md tables from benchmarks/results/*.json.

    python benchmarks/make_tables.py   # prints the generated sections; docs/benchmarks.md embeds them
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from common import RESULTS

METRICS = [("balanced_accuracy", "bal. ACC (mAcc)"), ("qwk", "QWK"), ("accuracy", "ACC"), ("auroc", "AUROC"), ("ece", "ECE")]


def ms(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    return f"{statistics.mean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")


def load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def throughput() -> str:
    r = load("throughput")
    if not r:
        return "_not run_\n"
    out = [f"Machine: {r['machine']}.\n", "| model | fp32 | fp32 + channels_last | bf16 autocast | bf16 + channels_last |", "|---|---|---|---|---|"]
    by = {}
    for row in r["rows"]:
        by.setdefault(row["model"], {})[(row["bf16"], row["channels_last"])] = row["images_per_s"]
    for m, d in by.items():
        out.append(f"| {m} | " + " | ".join(f"{d.get(k, '–')}" for k in ((False, False), (False, True), (True, False), (True, True))) + " |")
    return "\n".join(out) + "\n"


def kd() -> str:
    r = load("retinamnist_kd")
    if not r:
        return "_not run_\n"
    import re

    groups: dict[str, list[dict]] = {}
    for key, summ in r["runs"].items():
        method = re.sub(r"_s\d+$", "", key)
        students = [(n, row) for n, row in summ.items() if row["role"] == "student"]
        for name, row in students:
            label = method if len(students) == 1 else f"{method} ({name})"
            groups.setdefault(label, []).append(row["test"])
    out = [f"Machine: {r['machine']}. Students: {r['epochs']} epochs; teacher: {r['teacher_epochs']} epochs.\n",
           "| run | n | " + " | ".join(h for _, h in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for label, rows in groups.items():
        out.append(f"| {label} | {len(rows)} | " + " | ".join(ms([x[k] for x in rows]) for k, _ in METRICS) + " |")
    t = r.get("timing")
    if t:
        so = t["student_only_epoch_s"]
        out += ["", "| epoch time (fastest epoch over the seeds) | seconds | ratio to student-only |", "|---|---|---|",
                f"| student-only ResNet-18 | {so:.1f} | 1.00 |",
                f"| KD, teacher outputs cached | {t['kd_cached_epoch_s']:.1f} | {t['kd_cached_epoch_s'] / so:.2f} |",
                f"| KD, teacher run live | {t['kd_uncached_epoch_s']:.1f} | {t['kd_uncached_epoch_s'] / so:.2f} |"]
    return "\n".join(out) + "\n"


def explain() -> str:
    r = load("explain")
    if not r:
        return "_not run_\n"
    out = [f"Machine: {r['machine']}.\n", "| model | layer (channels) | Score-CAM full | Score-CAM top-k | top-k speed-up | top-k Spearman to full | Grad-CAM | avg. map | GradientShap |",
           "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        m = row["met_ms"]
        topk = next(k for k in m if k.startswith("scorecam_top"))
        out.append(f"| {row['model']} | {row['layer']} ({row['channels']}) | {m['scorecam_full']:.1f} | {m[topk]:.1f} ({topk[12:]}) | "
                   f"{row['topk_speedup']:.2f}× | {row['topk_spearman_to_full']:.3f} | {m['gradcam']:.1f} | {m['avgmap']:.1f} | {m['shap_gradientshap']:.1f} |")
    out += ["", "MET in ms per image (warm-up discarded).", "", "| model | ours (logit_softmax) ms | pytorch-grad-cam ScoreCAM ms | time ratio ours/theirs | max abs map diff | Spearman |",
            "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        v = row.get("vs_pytorch_grad_cam")
        if v:
            out.append(f"| {row['model']} | {v['ours_ms']:.1f} | {v['theirs_ms']:.1f} | {v['time_ratio_ours_over_theirs']:.2f} | {v['max_abs_map_diff']:.4f} | {v['spearman']:.4f} |")
    ag = r.get("agreement_kd_s0")
    if ag:
        out += ["", "Teacher (ResNet-50) vs KD student (ResNet-18), 4 test images per grade, per grade then macro:", "",
                "| method | top-20% IoU per grade | IoU macro | Spearman per grade | Spearman macro |", "|---|---|---|---|---|"]
        for meth, d in next(iter(ag.values())).items():
            f = lambda xs: ", ".join("–" if x is None else f"{x:.2f}" for x in xs)  # noqa: E731
            out.append(f"| {meth} | {f(d['iou']['per_class'])} | {d['iou']['macro']:.3f} | {f(d['spearman']['per_class'])} | {d['spearman']['macro']:.3f} |")
    return "\n".join(out) + "\n"


def deploy() -> str:
    r = load("deploy")
    if not r:
        return "_not run_\n"
    out = [f"Machine: {r['machine']}.\n", "| student | batch | PyTorch ms | ONNX Runtime ms | ORT speed-up | max abs diff |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        out.append(f"| {row['model']} | {row['batch']} | {row['pytorch_ms']} | {row['onnxruntime_ms']} | {row['speedup_ort']}× | {row['max_abs_diff']:.1e} |")
    return "\n".join(out) + "\n"


def memory() -> str:
    r = load("memory")
    if not r:
        return "_not run_\n"
    out = [f"Machine: {r['machine']}.\n", "| method | input px | batch | peak RSS (MB) |", "|---|---|---|---|"]
    for row in r["rows"]:
        out.append(f"| {row['method']} | {row['input']} | {row['batch']} | {row['peak_rss_mb'] if row['peak_rss_mb'] else 'failed: ' + str(row['error'])[:80]} |")
    return "\n".join(out) + "\n"


def _grouped(r: dict) -> str:
    import re

    groups: dict[str, list[dict]] = {}
    for key, summ in r["runs"].items():
        method = re.sub(r"_s\d+$", "", key)
        for name, row in summ.items():
            if row["role"] == "student":
                # experts of different seeds carry different participant names; pool them
                label = method if name == method or method == "expert" else f"{method} ({name})"
                groups.setdefault(label, []).append(row["test"])
    out = ["| run | n | " + " | ".join(h for _, h in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for label, rows in groups.items():
        out.append(f"| {label} | {len(rows)} | " + " | ".join(ms([x[k] for x in rows]) for k, _ in METRICS) + " |")
    return "\n".join(out) + "\n"


def umkd() -> str:
    r = load("umkd")
    if not r:
        return "_not run yet: `python benchmarks/umkd_bench.py`_\n"
    out = [f"Machine: {r['machine']}. Students {r['epochs']} epochs" + (", bf16 autocast" if r.get("bf16") else "")
           + "; experts 10 epochs (fp32).\n"]
    for proto in ("source", "target"):
        runs = {k[len(f"umkd_{proto}_"):]: v for k, v in r["runs"].items() if k.startswith(f"umkd_{proto}_")}
        if not runs:
            continue
        out += [f"**{proto}-imbalanced**\n", _grouped({"runs": runs})]
        t = {k[len(proto) + 1:-len("_epoch_s")]: v for k, v in r.get("timing", {}).items() if k.startswith(proto + "_")}
        base = "kd" if "kd" in t else "student_only"  # KD runs only with the ablations
        if base in t:
            out += [f"| method (seed 0) | epoch s | ratio to {base.replace('_', '-')} |", "|---|---|---|"]
            out += [f"| {m} | {v:.1f} | {v / t[base]:.2f} |" for m, v in t.items()]
            out.append("")
    return "\n".join(out)


def torchdistill() -> str:
    r = load("torchdistill")
    if not r:
        return "_not run yet: `python benchmarks/torchdistill_compare.py`_\n"
    import re

    kd = load("retinamnist_kd") or {"runs": {}}
    out = [f"Machine: {r['machine']}. torchdistill {r['torchdistill']}, {r['epochs']} epochs, test split, "
           "checkpoint chosen on validation balanced accuracy.\n",
           "| run | n | " + " | ".join(h for _, h in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for method in ("kd", "dkd"):
        ours = [v["resnet18"]["test"] for k, v in kd["runs"].items() if re.sub(r"_s\d+$", "", k) == method]
        theirs = [v["test"] for k, v in r["runs"].items() if re.sub(r"_s\d+$", "", k) == method]
        for who, rows in (("medistill", ours), ("torchdistill", theirs)):
            out.append(f"| {who} {method} | {len(rows)} | " + " | ".join(ms([x[k] for x in rows]) for k, _ in METRICS) + " |")
    t = r.get("timing")
    if t:
        base = t["torchdistill_kd"]
        out += ["", f"One KD training epoch each, back to back in one process ({t['machine']}):", "",
                "| loop | images/s | relative to torchdistill |", "|---|---|---|",
                f"| torchdistill 1.1.5 (teacher run every batch) | {base:.1f} | 1.00 |",
                f"| medistill, teacher run every batch | {t['medistill_kd_cache_off']:.1f} | {t['medistill_kd_cache_off'] / base:.2f} |",
                f"| medistill, teacher outputs cached | {t['medistill_kd_cache_on']:.1f} | {t['medistill_kd_cache_on'] / base:.2f} |"]
    return "\n".join(out) + "\n"


def dual() -> str:
    r = load("dual_student")
    if not r:
        return "_not run yet: `python benchmarks/dual_student_bench.py`_\n"
    t = r.get("timing", {})
    head = (f"Machine: {r['machine']}. Epoch time, teacher outputs cached for both: single-student KD "
            f"{t.get('kd_single_epoch_s', 0):.1f} s, dual-student {t.get('dual_student_epoch_s', 0):.1f} s, "
            f"ratio **{t.get('ratio', 0):.2f}×** (the paper reports 1.63× without a cache).\n\n")
    return head + (_grouped(r) if r["runs"] else "_ablation runs not run yet_\n")


SECTIONS = {"THROUGHPUT": throughput, "KD": kd, "EXPLAIN": explain, "DEPLOY": deploy, "MEMORY": memory, "UMKD": umkd, "DUAL": dual,
            "TORCHDISTILL": torchdistill}


def main() -> None:
    doc = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    text = doc.read_text()
    for key, fn in SECTIONS.items():
        start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
        if start in text:
            a, b = text.index(start) + len(start), text.index(end)
            text = text[:a] + "\n" + fn() + text[b:]
    doc.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
