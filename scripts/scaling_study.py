"""The scaling study behind `model: auto` (docs/scaling.md): fixed step counts, exact val loss.

    python scripts/scaling_study.py speed --threads 2 L3W128 L4W192 ...   # ms per step of each shape
    python scripts/scaling_study.py run --shape L4W192 --steps 5000 --dropout 0.1 --data FILE --results R.jsonl

A shape is written L<layers>W<width> (head size 32, block 128, batch 16, RoPE, Muon, WSD with half
the steps decaying: the CPU config's recipe). `run` trains for a fixed number of steps on one
thread, then scores the whole validation split exactly and appends one JSON line. The loss of a
fixed step count does not depend on how busy the machine is, so two runs can go at once.
"""

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import minigpt
from minigpt import config as config_mod, data, sizing
from minigpt.bench import compare_training, make_trainer
from minigpt.device import resolve_device, set_threads

BATCH, LEARNING_RATE = sizing.CPU_BATCH, sizing.LEARNING_RATE["muon"]  # the study's recipe, which auto uses on a CPU


def shape_config(shape: str, steps: int, dropout: float, data_path: str, out_dir: str, threads: int,
                 batch_size: int = BATCH, learning_rate: float = LEARNING_RATE) -> dict:
    layers, width = map(int, re.fullmatch(r"L(\d+)W(\d+)", shape).groups())
    return {
        "model": {"n_layer": layers, "n_head": width // 32, "n_embd": width, "block_size": 128,
                  "dropout": dropout, "position": "rope"},
        "data": {"path": data_path},
        "train": {"optimizer": "muon", "batch_size": batch_size, "learning_rate": learning_rate, "min_lr": 1e-4,
                  "warmup_iters": min(100, steps // 4), "lr_schedule": "wsd", "decay_fraction": 0.5,
                  "weight_decay": 0.1, "max_iters": steps, "eval_interval": steps, "eval_iters": 20,
                  "log_interval": 50, "sample_chars": 0, "threads": threads, "out_dir": out_dir},
    }


def speed(args) -> None:
    set_threads(args.threads)
    device = resolve_device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            cfg = config_mod.load(shape_config(shape, 100, 0.0, args.data, tmp, args.threads, args.batch_size))
            prepared = data.prepare(cfg.data, cfg.model.block_size)
            trainer = make_trainer(shape, cfg, prepared, device)
            compare_training([trainer], device, warmup_steps=5, rounds=3, round_seconds=2.0)
            print(json.dumps({"shape": shape, "params": trainer.run.model.num_params(), "threads": args.threads,
                              "batch_size": args.batch_size, "ms_per_step": round(trainer.best_step_s * 1000, 2),
                              "tokens_per_s": round(args.batch_size * 128 / trainer.best_step_s)}), flush=True)


def run(args) -> None:
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        out = Path(tmp) / "run"
        cfg = shape_config(args.shape, args.steps, args.dropout, args.data, str(out), 1,
                           args.batch_size, args.learning_rate)
        start = time.perf_counter()
        result = minigpt.train(cfg, overrides=args.set or [], progress=False, init_from=args.init_from)
        train_s = time.perf_counter() - start
        model = minigpt.load(out / ("best.pt" if args.best else "last.pt"), device="cpu")
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(out / "last.pt", Path(args.keep) / f"{Path(args.data).stem}-{args.shape}-{args.steps}-{args.dropout}.pt")
        score = model.evaluate(split="val")
        record = {"corpus": Path(args.data).name, "shape": args.shape, "params": model.module.num_params(),
                  "steps": args.steps, "dropout": args.dropout, "batch_size": args.batch_size,
                  "learning_rate": args.learning_rate, "val_loss": score.loss if hasattr(score, "loss") else None,
                  "val_bpc": score.bpc, "train_est": result.history[-1].get("train_loss"),
                  "val_est": result.history[-1].get("val_loss"), "train_s_1thread": round(train_s, 1),
                  "steps_taken": result.step, "best_step": min(result.history, key=lambda h: h["val_loss"])["step"],
                  "init_from": args.init_from, "set": args.set}
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def read_results(path: str, speeds: dict[str, float]) -> list[dict]:
    """The study's runs, each with its budget in minutes of this machine (steps at the measured ms/step, 2 threads,
    with the 15% of a budget that start-up, evaluations and the margin take)."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    # Only the study's recipe: fine-tuning, early stopping and the recipe's own runs (weight decay, learning rate,
    # batch size) have tables of their own in scaling.md.
    rows = [r for r in rows if not r.get("init_from") and not r.get("set") and r["corpus"] != "licences.txt"
            and r.get("batch_size", BATCH) == BATCH and r.get("learning_rate", LEARNING_RATE) == LEARNING_RATE]
    for r in rows:
        r["minutes"] = r["steps"] * speeds[r["shape"]] / 1000 / 60 / TRAINED_FRACTION
        r["tokens_per_param"] = r["steps"] * 2048 / r["params"]
    return sorted(rows, key=lambda r: (r["corpus"], r["params"], r["steps"], r["dropout"]))


TRAINED_FRACTION = 0.85  # minigpt.sizing's: steps = 0.85 * budget / step time


def table(args) -> None:
    rows = read_results(args.results, json.loads(args.speeds))
    print("| corpus | shape | parameters | dropout | steps | minutes (2-core Zen 5) | characters per parameter "
          "| exact val loss (nats) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['corpus']} | {r['shape']} | {r['params'] / 1e6:.2f}M | {r['dropout']:g} | {r['steps']:,} | "
              f"{r['minutes']:.1f} | {r['tokens_per_param']:.1f} | {r['val_loss']:.4f} |")


def plot(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_results(args.results, json.loads(args.speeds))
    corpora = sorted({r["corpus"] for r in rows})
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.2), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for shape in sorted({r["shape"] for r in rows if r["corpus"] == corpus},
                            key=lambda s: next(r["params"] for r in rows if r["shape"] == s)):
            best: dict[float, dict] = {}
            for r in rows:
                if r["corpus"] == corpus and r["shape"] == shape:
                    key = round(r["minutes"], 2)
                    if key not in best or r["val_loss"] < best[key]["val_loss"]:
                        best[key] = r
            points = sorted(best.values(), key=lambda r: r["minutes"])
            params = points[0]["params"] / 1e6
            ax.plot([p["minutes"] for p in points], [p["val_loss"] for p in points], "o-",
                    label=f"{shape} ({params:.2f}M)")
            for p in points:
                if p["dropout"]:
                    ax.annotate(f"d{p['dropout']:g}", (p["minutes"], p["val_loss"]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log")
        ax.set_xlabel("budget, minutes of a 2-core Zen 5 (log)")
        ax.set_ylabel("best exact val loss (nats)")
        ax.set_title(corpus)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("speed")
    p.add_argument("shapes", nargs="+")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--data", required=True)
    p.set_defaults(func=speed)
    p = sub.add_parser("run")
    p.add_argument("--shape", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--learning-rate", type=float, default=LEARNING_RATE)
    p.add_argument("--data", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--scratch", default=None)
    p.add_argument("--keep", default=None, help="copy each run's last.pt into this directory")
    p.add_argument("--init-from", default=None, help="fine-tune from this checkpoint")
    p.add_argument("--set", action="append", help="a further config override (repeatable)")
    p.add_argument("--best", action="store_true", help="score best.pt (early stopping) instead of last.pt")
    p.set_defaults(func=run)
    for name, func in (("table", table), ("plot", plot)):
        p = sub.add_parser(name)
        p.add_argument("--results", required=True)
        p.add_argument("--speeds", required=True, help='JSON: {"L3W128": 35.4, ...} ms per step on 2 threads')
        p.add_argument("--out", default="docs/scaling.png")
        p.set_defaults(func=func)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
