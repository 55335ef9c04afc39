"""Join the records of several ``iapo testbed`` runs into one table and one pair of figures.

    python experiments/testbed/merge_testbed.py RUN_DIR RUN_DIR ... --out DIR

Writes DIR/testbed.md (the summary line and one row per trained run), DIR/testbed.json (every
record and learning curve), DIR/testbed_points.png and DIR/testbed_learning_curves.png. A run
directory listed later supersedes an earlier one's record of the same (case, transform, target KL,
option): a rerun after a change to the trainer replaces the row it reran, and the script says which.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from iapo_jax.testbed import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    joined: dict[tuple, tuple[dict, list]] = {}  # insertion order: the order of first appearance
    for run in args.runs:
        payload = json.loads((run / "testbed.json").read_text())
        for record, curve in zip(payload["records"], payload["curves"]):
            key = (record["case"], record["transform"], record["target_kl"], record["option"])
            if key in joined:
                print(f"{run}: supersedes the earlier record of {key}")
            joined[key] = (record, curve)
    records = [record for record, _ in joined.values()]
    curves = [curve for _, curve in joined.values()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "testbed.json").write_text(json.dumps({"records": records, "curves": curves}, indent=1) + "\n")
    table, summary = report.markdown_table(records), report.summary_line(records)
    (args.out / "testbed.md").write_text(f"{summary}\n\n{table}\n")
    report.plot_points(records, args.out / "testbed_points.png")
    report.plot_learning_curves(records, curves, args.out / "testbed_learning_curves.png")
    print(f"{summary}\nwritten to {args.out}")


if __name__ == "__main__":
    main()
