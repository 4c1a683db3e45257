"""Train several variants of a config side by side, score each with evaluate.py, and tabulate.

    python sweep.py docs/sweeps/round3.yaml            # runs behind docs/cpu_recipe.md
    python sweep.py docs/sweeps/round3.yaml --jobs 4 --device cuda --only default,lr3e-3

The sweep file names a base config, the evaluation and the runs, each a set of dotted overrides:

    config: config/default.yaml
    out_dir: runs/sweep                  # one folder per run inside
    evaluate: [--num_samples, "1000"]    # evaluate.py's arguments (with --split val unless given); its
                                         # sampler defaults to the run's config
    runs:
      base: {}
      lr4e-3: {train.lr: 0.004}

Each run is `train.py` then `evaluate.py` in a subprocess (output in <out_dir>/<run>/sweep.log);
`--train.time_budget=10m` gives every variant the same wall-clock budget (compute-matched: each
trains as many steps as fit at its own speed, and the table shows them);
--jobs of them at a time. The table (markdown) goes to <out_dir>/summary.md, rewritten as runs
finish, so a sweep cut short keeps what it measured. Wall times of runs that share the machine
are not comparable: on a CPU, time runs one at a time (--jobs 1).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from configuration import ConfigError, load_config, read_yaml, run_cli, split_overrides
from mnist_downloader import DownloadError, ensure_mnist_present, mirrors_from
from fileio import atomic_write

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ["run", "overrides", "batch x steps", "train s", "FID", "floor FID", "conf > 0.9", "entropy",
           "precision", "recall"]


def load_sweep(path):
    spec = read_yaml(path, "sweep file", hint="")
    if not isinstance(spec, dict) or "config" not in spec:
        raise ConfigError(f"{path}: needs `config: path/to/base.yaml`")
    if not isinstance(spec.get("runs"), dict) or not spec["runs"]:
        raise ConfigError(f"{path}: needs a `runs:` mapping of name -> {{dotted.key: value}}")
    spec.setdefault("out_dir", "runs/sweep")
    spec.setdefault("evaluate", ["--num_samples", "1000"])
    if "--split" not in spec["evaluate"]:  # choosing between variants is tuning: never on the test set
        spec["evaluate"] = list(spec["evaluate"]) + ["--split", "val"]
    for name, overrides in spec["runs"].items():
        spec["runs"][name] = [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()]
        load_config(spec["config"], spec["runs"][name])  # a typo fails now, not after an hour
    return spec


def run_one(name, overrides, spec, device, extra):
    out = os.path.join(spec["out_dir"], name)
    os.makedirs(out, exist_ok=True)
    cfg = load_config(spec["config"], overrides + split_overrides(extra)[1] + [f"train.out_dir={out}"])
    row = {"run": name, "overrides": " ".join(overrides) or "(base)"}
    with open(os.path.join(out, "sweep.log"), "w") as log:
        def call(args):
            log.write(f"$ {' '.join(args)}\n")
            log.flush()
            return subprocess.run([sys.executable] + args, stdout=log, stderr=subprocess.STDOUT).returncode

        tic = time.perf_counter()
        rc = call([os.path.join(HERE, "train.py"), "--config", spec["config"], "--overwrite", "--device", device,
                   f"--train.out_dir={out}"] + [f"--{o}" for o in overrides] + extra)
        row["train s"] = f"{time.perf_counter() - tic:.0f}"
        if os.path.exists(os.path.join(out, "config.yaml")):  # the step count a time budget chose, if any
            cfg = load_config(os.path.join(out, "config.yaml"))
        row["batch x steps"] = f"{cfg['train']['batch_size']} x {cfg['train']['steps']}"
        if rc == 0:
            rc = call([os.path.join(HERE, "evaluate.py"), "--ckpt", os.path.join(out, "last.pt"), "--data", cfg["data"]["root"],
                       "--verify_data", str(cfg["data"]["verify"]), "--device", device] + [str(a) for a in spec["evaluate"]])
    if rc != 0:
        row["FID"] = f"failed (exit {rc}, see {out}/sweep.log)"
        return row
    result_files = sorted((os.path.getmtime(os.path.join(out, f)), f) for f in os.listdir(out)
                          if f.startswith("eval_") and f.endswith(".json"))
    with open(os.path.join(out, result_files[-1][1])) as f:
        result = json.load(f)
    s, floor = result["samples"], result["floor"]
    row.update({"FID": f"{s['fid']:.1f}", "floor FID": f"{floor['fid']:.1f}",
                "conf > 0.9": f"{s['frac_confident']:.3f}", "entropy": f"{s['class_entropy']:.3f}",
                "precision": f"{s['precision']:.3f}", "recall": f"{s['recall']:.3f}"})
    return row


def table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file (YAML), e.g. docs/sweeps/round3.yaml")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="device for training and evaluation (default: %(default)s)")
    p.add_argument("--only", help="comma-separated run names (default: all)")
    p.add_argument("--mirror", action="append", metavar="URL_OR_DIR", help="MNIST mirror, as for train.py")
    args, extra = p.parse_known_args(argv)  # anything else is passed to every train.py, e.g. --train.steps=50
    spec = load_sweep(args.sweep)
    names = list(spec["runs"]) if not args.only else args.only.split(",")
    unknown = [n for n in names if n not in spec["runs"]]
    if unknown:
        raise ConfigError(f"--only names unknown runs {unknown}; the sweep has {list(spec['runs'])}")
    data = load_config(spec["config"])["data"]
    ensure_mnist_present(data["root"], mirrors_from(args.mirror), verify=data["verify"])  # once, before runs race
    os.makedirs(spec["out_dir"], exist_ok=True)
    summary = os.path.join(spec["out_dir"], "summary.md")
    rows = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, n, spec["runs"][n], spec, args.device, extra): n for n in names}
        for future in futures:
            rows[futures[future]] = future.result()
            done = [rows[n] for n in names if n in rows]
            atomic_write(summary, lambda f: f.write(table(done).encode()))
            print(f"{futures[future]}: FID {rows[futures[future]]['FID']}", flush=True)
    print(table([rows[n] for n in names]), end="")
    print(f"wrote {summary}")


if __name__ == "__main__":
    run_cli(main, DownloadError)
