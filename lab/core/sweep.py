"""Sweep summary: one table of each job's overrides, status and final metrics, written when a multirun ends.

Registered as a Hydra callback in conf/hydra/default.yaml. It writes `SWEEP_DIR/summary.csv`, prints the
table, and exits with status 1 when any job did not finish, naming those jobs in one line. Jobs of a multirun
catch their own errors (run.py), so one failing job never stops the others. The same table for an existing
sweep: `python -m lab.core.sweep SWEEP_DIR`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (`-m`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def finished_job_loss(run_dir: str) -> float | None | bool:
    """The held-out loss of a finished run in `run_dir` (None if it recorded none), or False if not finished."""
    status_file = Path(run_dir) / "status.json"
    if not status_file.exists() or json.loads(status_file.read_text()).get("status") != "finished":
        return False
    results_file = Path(run_dir) / "results.json"
    return json.loads(results_file.read_text()).get("metrics", {}).get("loss") if results_file.exists() else None


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job run directories of a sweep (named by job number), in job order."""
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def job_overrides(run_dir: Path) -> list[str]:
    """The job's own overrides, from the newest `.hydra/<start time>/overrides.yaml`."""
    records = sorted(run_dir.glob(".hydra/*/overrides.yaml"))
    if not records:
        return []
    return [str(item) for item in OmegaConf.load(records[-1])]


def job_row(run_dir: Path) -> dict:
    """One summary row: job number, status, overrides, scalar final metrics, and the error line if any."""
    status_file = run_dir / "status.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {"status": "unknown"}
    row = {
        "job": int(run_dir.name),
        "status": status.get("status", "unknown"),
        "overrides": job_overrides(run_dir),
    }
    results_file = run_dir / "results.json"
    if results_file.exists():
        metrics = json.loads(results_file.read_text()).get("metrics", {})
        row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    error = status.get("error", "")
    row["error"] = error.strip().splitlines()[-1] if error else ""
    return row


def summarize(sweep_dir: str | Path) -> list[dict]:
    """Write SWEEP_DIR/summary.csv and return its rows. The `overrides` column lists only the overrides
    that differ between jobs; those every job shares are in `SWEEP_DIR/common_overrides.txt`."""
    sweep_dir = Path(sweep_dir)
    rows = [job_row(d) for d in job_dirs(sweep_dir)]
    common = set.intersection(*(set(row["overrides"]) for row in rows)) if rows else set()
    for row in rows:
        row["overrides"] = " ".join(o for o in row["overrides"] if o not in common)
    (sweep_dir / "common_overrides.txt").write_text(" ".join(sorted(common)) + "\n")
    columns = ["job", "status", "overrides"]
    columns += sorted({k for row in rows for k in row} - {*columns, "error"}) + ["error"]
    with open(sweep_dir / "summary.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table (floats with 4 significant digits), without the error column."""
    if not rows:
        return "(no jobs)"
    columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c != "error"]

    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def failure_line(rows: list[dict], sweep_dir: Path) -> str | None:
    """One line naming the jobs that did not finish, or None when all finished."""
    failed = [row for row in rows if row["status"] != "finished"]
    if not failed:
        return None
    parts = [f"job {r['job']} ({r['overrides'] or 'no overrides'}): {r['status']}" + (f", {r['error']}" if r["error"] else "") for r in failed]
    return f"{len(failed)} of {len(rows)} jobs did not finish in {sweep_dir}: " + "; ".join(parts)


class SweepSummary(Callback):
    """Hydra callback: summarize the sweep when the multirun ends; exit 1 if any job did not finish."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = summarize(sweep_dir)
        print(f"sweep summary ({sweep_dir / 'summary.csv'}):\n{format_table(rows)}", flush=True)
        line = failure_line(rows, sweep_dir)
        if line:
            print(f"error: {line}", file=sys.stderr, flush=True)
            sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description="Print and write (summary.csv) the summary of a finished sweep.")
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory, e.g. logs/TASK/multiruns/STAMP")
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        sys.exit(f"error: sweep directory {args.sweep_dir} does not exist")
    rows = summarize(args.sweep_dir)
    print(format_table(rows))
    line = failure_line(rows, args.sweep_dir)
    if line:
        print(f"error: {line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
