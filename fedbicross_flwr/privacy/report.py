"""The privacy audit's files in the run folder.

``privacy-audit.json``        every number of the audit (per client and means)
``privacy-audit.md``          the same as Markdown tables
``privacy-audit.csv``         membership inference, one row per model (upload / personalized)
``privacy-audit-pairs.png``   the synthetic images closest to a training image, with their
                              nearest training and test images (when the method synthesizes)
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from fedbicross_flwr.storage.atomic import open_text, write_json, write_text

PAIRS_PICTURE = "privacy-audit-pairs.png"


def membership_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of membership-inference rows (see ``privacy_audit.audit_row``)."""
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = ["| client | members | non-members | loss AUC | loss TPR@1%FPR | calibrated AUC "
             "| calibrated TPR@1%FPR |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['partition-id']} | {r['n-members']} | {r['n-nonmembers']} | "
              f"{f(r['loss-auc'])} | {f(r['loss-tpr-at-1pct-fpr'])} | {f(r['calibrated-auc'])} "
              f"| {f(r['calibrated-tpr-at-1pct-fpr'])} |" for r in rows]
    return "\n".join(lines)


def _share(t: dict[str, Any] | None) -> str:
    if not t or t["share"] is None:
        return "-"
    return (f"{100 * t['share']:.1f} % ({t['closer_to_train']}/{t['n']}; 95 % CI "
            f"{100 * t['ci_low']:.1f}-{100 * t['ci_high']:.1f} %; binomial p = "
            f"{t['p_value']:.3g} against {100 * t['reference']:.0f} %"
            + (f"; {t['ties']} ties left out" if t["ties"] else "") + ")")


def markdown(report: dict[str, Any]) -> str:
    """``privacy-audit.md``."""
    out = [f"# Privacy audit of {report['run']}", "",
           f"Method {report['method']}, dataset {report['dataset']}, "
           f"{report['num-clients']} clients, alpha {report['alpha']}, seed {report['seed']}; "
           f"audit wall time {report['wall-time-s']} s.", "",
           "## (a) Membership inference on the uploads", "",
           membership_table(report["uploads"]["rows"]), ""]
    syn = report["synthetic"]
    out += ["## (b) Synthetic images: nearest training vs nearest test image (pixel SSIM)", ""]
    if syn["available"]:
        sub = (f"; the {syn['subsampled']} pool subsampled to {syn['pool-size']} images "
               f"(seed {syn['subsample-seed']})" if syn["subsampled"] else "")
        out += [f"- synthetic images: {syn['images']}; pools: {syn['train-images']} training "
                f"images of the clients, {syn['test-images']} official-test images{sub}",
                f"- closer to a training image than to any test image: "
                f"{_share(syn['synthetic'])}",
                f"- the same for official-validation images (real non-members, the reference "
                f"check): {_share(syn['control-official-val'])}",
                f"- mean SSIM to the nearest training image {syn['ssim-nearest-train-mean']:.3f}"
                f" (max {syn['ssim-nearest-train-max']:.3f}), to the nearest test image "
                f"{syn['ssim-nearest-test-mean']:.3f}",
                f"- closest pairs: `{PAIRS_PICTURE}`", ""]
    else:
        out += [f"Not audited: {syn['reason']}.", ""]
    per = report["personalized"]
    out += ["## (c) Membership inference on the personalized models", ""]
    if per["available"]:
        out += [f"{per['source'].capitalize()}; reproduces the run's clients.csv: "
                f"{'yes' if per['reproduced'] else 'NO'} (largest accuracy difference before "
                f"{per['max-abs-diff-acc-before']}, after {per['max-abs-diff-acc-after']}).",
                "", membership_table(per["rows"]), ""]
    else:
        out += [f"Not audited: {per['reason']}.", ""]
    out += ["AUC 0.5 and TPR@1%FPR 0.01 are chance; a share of 50 % is what equally sized "
            "pools give when the synthetic images copy no training image.", ""]
    return "\n".join(out)


def write_report(run_dir: Path, report: dict[str, Any],
                 pictures: dict[str, Any] | None) -> list[Path]:
    """Write the audit's files; returns their paths."""
    from fedbicross_flwr.privacy.nearest import save_pairs_picture

    paths = [run_dir / "privacy-audit.json", run_dir / "privacy-audit.md",
             run_dir / "privacy-audit.csv"]
    write_json(paths[0], report)
    write_text(paths[1], markdown(report))
    rows = [{"model": "upload", **r} for r in report["uploads"]["rows"]]
    if report["personalized"]["available"]:
        rows += [{"model": "personalized", **r} for r in report["personalized"]["rows"]]
    with open_text(paths[2], newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if pictures is not None:
        paths.append(save_pairs_picture(run_dir / PAIRS_PICTURE, pictures["synthetic"],
                                        pictures["train"], pictures["test"],
                                        pictures["result"], pictures["n_pairs"]))
    return paths
