"""A markdown table of finished ``aptune train`` runs: accuracy, density and the structure each kept.

    python benchmarks/summarize_runs.py runs/decisions            # every RUN/report.json below the folder
    python benchmarks/summarize_runs.py runs/decisions --json out.json

Rows are grouped by the run folder's name without its ``-sN`` seed suffix; each group ends with the mean over
its seeds. Kept heads and hidden channels come from ``RUN/model/aptune_structure.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def summarize(root: Path) -> list[dict]:
    rows = []
    for report_path in sorted(root.glob("*/report.json")):
        run = report_path.parent
        report = json.loads(report_path.read_text())
        row = {
            "run": run.name,
            "variant": re.sub(r"-s\d+$", "", run.name),
            "seed": report["train_config"]["seed"],
            "best_validation": report["metrics"]["best_validation"],
            "test_at_best": report["metrics"].get("test_at_best"),
            "density": report["density"],
            "train_time_s": report["train_time_s"],
        }
        structure = run / "model" / "aptune_structure.json"
        if structure.is_file():
            saved = json.loads(structure.read_text())
            row["heads"] = sum(saved["shape"]["heads"])
            row["heads_before"] = sum(saved["base_shape"]["heads"])
            row["hidden"] = saved["shape"]["hidden"]
            row["hidden_before"] = saved["base_shape"]["hidden"]
            row["neurons"] = sum(saved["shape"]["neurons"])
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| run | seed | best val | test | density | heads kept | hidden kept | FFN neurons kept | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row, key, fmt="{:.4f}"):
        value = row.get(key)
        return "n/a" if value is None else fmt.format(value)

    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["variant"], []).append(row)
    for variant, members in groups.items():
        for r in members:
            lines.append(
                f"| {r['run']} | {r['seed']} | {cell(r, 'best_validation')} | {cell(r, 'test_at_best')} | "
                f"{r['density']:.3f} | {r.get('heads', 'n/a')}/{r.get('heads_before', 'n/a')} | "
                f"{r.get('hidden', 'n/a')}/{r.get('hidden_before', 'n/a')} | {r.get('neurons', 'n/a')} | "
                f"{r['train_time_s']:.0f} |"
            )
        tests = [r["test_at_best"] for r in members if r.get("test_at_best") is not None]
        vals = [r["best_validation"] for r in members]
        lines.append(
            f"| **{variant} mean** | {len(members)} | {statistics.mean(vals):.4f} | "
            f"{statistics.mean(tests):.4f} | | | | | |"
            if tests
            else f"| **{variant} mean** | {len(members)} | {statistics.mean(vals):.4f} | n/a | | | | | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="a folder whose subfolders are aptune train output folders")
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = summarize(Path(args.root))
    if not rows:
        raise SystemExit(f"no */report.json under {args.root}")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
