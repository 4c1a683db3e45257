#!/usr/bin/env bash
# Training speed of config/default.yaml on one GPU with AMP and torch.compile off and on:
# benchmark.py (the exact step train.py runs) at the config's batch of 64 and at 1024.
#
#   bash benchmark_gpu.sh [out_dir]          # about 3 minutes on an H200; writes out_dir/summary.md
#
# PYTHON (default python) and DEVICE (default cuda) can be set in the environment.
set -u
out=${1:-runs/benchmark_gpu}
python=${PYTHON:-python}
device=${DEVICE:-cuda}
mkdir -p "$out"
run() {  # batch amp compile channels_last
  local name="bs$1_$2_compile-$3_cl-$4"
  "$python" benchmark.py --config config/default.yaml --device "$device" --seconds 3 --train.batch_size="$1" \
    --train.amp="$2" --train.compile="$3" --train.channels_last="$4" --json "$out/$name.json" \
    | grep -E "^config|training images" || echo "$name failed"
}
run 64 off false false
run 64 bf16 true false
run 64 off true false
run 64 bf16 false false
run 64 fp16 false false
run 1024 off false false
run 1024 bf16 true false
run 1024 bf16 true true
"$python" - "$out" <<'EOF'
import glob, json, os, sys
rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(sys.argv[1], "bs*.json")))]
rows.sort(key=lambda r: (r["train_batch_size"], r["amp"] != "off", r["compile"], r["channels_last"]))
lines = ["| batch | amp | compile | channels_last | train img/s | sample img/s per eval | peak MB |", "|---|---|---|---|---|---|---|"]
lines += [f"| {r['train_batch_size']} | {r['amp']} | {r['compile']} | {r['channels_last']} | {r['train_img_per_s']:.0f} | "
          f"{r['sample_img_per_s_per_eval']:.0f} | {r['peak_memory_mb']:.0f} |" for r in rows]
if rows:
    lines.insert(0, f"{rows[0]['gpu'] or rows[0]['cpu']}, torch {rows[0]['torch']}, config/default.yaml\n")
open(os.path.join(sys.argv[1], "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
