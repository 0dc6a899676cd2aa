"""The SkipGPT pipeline behind `make run`: stage 1, stage 2 from it, then one summary table.

    python -m lab.methods.skipgpt.pipeline [--stage1-steps N] [--stage2-steps N] [--out DIR] [OVERRIDE ...]

Each stage is an ordinary `python run.py experiment=...` job in its own run directory under --out, so its
results.json, checkpoints and logs are what a user running the stages by hand gets. The dense baseline is
evaluated on the same held-out text inside each stage's evaluation.

When the data root (LAB_DATA_DIR) lacks the model or the TinyStories files, the pipeline prints a loud warning
and runs on self-generated data instead (lab.data.synthetic); its results are labelled synthetic.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from lab.core.rundir import PROJECT_ROOT, write_json

log = logging.getLogger("lab.pipeline")

REAL_FILES = ("models/stories260K-hf/config.json", "text/tinystories/tinystories_val.txt")


def real_data_root() -> Path | None:
    """Return the data root from LAB_DATA_DIR if it contains the files the default experiment reads, else None."""
    root = os.environ.get("LAB_DATA_DIR")
    if not root:
        return None
    root = Path(root)
    if all((root / f).is_file() for f in REAL_FILES) and list((root / "text/tinystories").glob("*train*")):
        return root
    return None


def synthetic_overrides(root: Path) -> list[str]:
    from lab.data import synthetic

    return [
        f"paths.data_dir={root}",
        f"model.name_or_path={root / synthetic.MODEL_DIR}",
        f"data.train_files={synthetic.TRAIN_FILE}",
        f"data.val_file={synthetic.VAL_FILE}",
        "data.seq_len=128",
        "data.source=synthetic",
    ]


def run_stage(experiment: str, run_dir: Path, overrides: list[str]) -> dict:
    command = [sys.executable, str(PROJECT_ROOT / "run.py"), f"experiment={experiment}", f"hydra.run.dir={run_dir}", *overrides]
    log.info("running: %s", " ".join(command))
    started = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT_ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{experiment} failed (exit {result.returncode}); its log is {run_dir}/run.log")
    log.info("%s finished in %.0f s", experiment, time.perf_counter() - started)
    return json.loads((run_dir / "results.json").read_text())


def summary_table(stage1: dict, stage2: dict) -> str:
    m1, m2 = stage1["metrics"], stage2["metrics"]
    rows = [
        ("data", stage2["data"]),
        ("dense perplexity", f"{m2['dense_ppl']:.3f}"),
        ("stage-1 perplexity (routers only)", f"{m1['ppl']:.3f}"),
        ("stage-2 perplexity (routers + LoRA)", f"{m2['ppl']:.3f}"),
        ("stage-2 / dense perplexity", f"{m2['ppl'] / m2['dense_ppl']:.3f}"),
        ("target sparsity", f"{m2['target_sparsity']:.2f}"),
        ("achieved sparsity (modules)", f"{m2['sparsity_module']:.3f}"),
        ("achieved attention sparsity", f"{m2['sparsity_attn']:.3f}"),
        ("achieved MLP sparsity", f"{m2['sparsity_mlp']:.3f}"),
        ("achieved sparsity (parameters)", f"{m2['sparsity_parameter']:.3f}"),
        ("prefill tokens/s dense", f"{m2['prefill_tokens_per_s_dense']:.0f}"),
        ("prefill tokens/s routed (skipping)", f"{m2['prefill_tokens_per_s_routed']:.0f}"),
        ("measured prefill speedup", f"{m2['speedup_prefill']:.3f}x"),
        ("evaluated tokens", f"{m2['eval_tokens']}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage1-steps", type=int, default=None, help="stage-1 optimizer steps (default: the experiment's)")
    parser.add_argument("--stage2-steps", type=int, default=None, help="stage-2 optimizer steps (default: the experiment's)")
    parser.add_argument("--out", type=Path, default=None, help="pipeline directory (default logs/pipeline/TIMESTAMP)")
    parser.add_argument("--synthetic", action="store_true", help="use self-generated data even if real data exists")
    parser.add_argument("--synthetic-pretrain-steps", type=int, default=200,
                        help="optimizer steps that pretrain the self-generated model (synthetic data only)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to both stages")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")

    out = args.out or PROJECT_ROOT / "logs" / "pipeline" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(args.overrides)
    root = None if args.synthetic else real_data_root()
    if root is None:
        banner = "#" * 100
        log.warning(
            "\n%s\n# NO REAL DATA: LAB_DATA_DIR=%r lacks %s.\n# Running on SYNTHETIC, self-generated data; "
            "the numbers below say only that the pipeline runs.\n%s",
            banner, os.environ.get("LAB_DATA_DIR"), " or ".join(REAL_FILES), banner,
        )
        from lab.data.synthetic import make_synthetic_root

        synthetic_root = make_synthetic_root(out / "synthetic_data", pretrain_steps=args.synthetic_pretrain_steps)
        overrides = synthetic_overrides(synthetic_root) + overrides
    else:
        log.info("data root: %s", root)

    steps1 = [f"trainer.max_steps={args.stage1_steps}"] if args.stage1_steps else []
    steps2 = [f"trainer.max_steps={args.stage2_steps}"] if args.stage2_steps else []
    stage1 = run_stage("skipgpt_stage1", out / "stage1", [*steps1, "eval.measure_speed=false", *overrides])
    stage2 = run_stage("skipgpt_stage2", out / "stage2", [*steps2, f"stage1_run={out / 'stage1'}", *overrides])

    table = summary_table(stage1, stage2)
    write_json(out / "summary.json", {"stage1": stage1, "stage2": stage2})
    (out / "summary.md").write_text(table + "\n")
    if stage2["data"] == "synthetic":
        table += "\n\nDATA: SYNTHETIC (the real data root was not found; see the warning above)"
    print(f"\nSkipGPT pipeline summary ({out})\n\n{table}\n")


if __name__ == "__main__":
    main()
