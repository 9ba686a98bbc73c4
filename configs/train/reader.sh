#!/usr/bin/env bash
# The training runs of the shipped reader smollm2-135m-instruct-memory3 and of the runs tried
# beside it (A–L, then stage 2 from J: runs Q and T; docs/training.md), then the kept-token probes and the reader section of
# BENCHMARKS.md. Each run continues the previous one's adapter (init_adapter in its config) and
# resumes when run again. About 10 hours on 2 CPU cores.
#   bash configs/train/reader.sh            all runs, probes and the report
#   RUNS="sft-smollm2-reader-20" bash configs/train/reader.sh   some runs only (no probes)
set -euo pipefail
OUT=${OUT:-~/.cache/memory3/runs}
ALL="sft-smollm2-reader-20 sft-smollm2-reader-20-k32 sft-smollm2-reader-20-k32-wiki
sft-smollm2-reader-20-k32-mix sft-smollm2-reader-20-k32-vq sft-smollm2-reader-20-k32-vq2
sft-smollm2-reader-20-k32-vq3 sft-smollm2-reader-20-k32-vq4 sft-smollm2-reader-20-k48-irr
sft-smollm2-reader-20-k48-ctl sft-smollm2-reader-20-k32-from-j sft-smollm2-reader-20-k32-tc96"
for run in ${RUNS:-$ALL}; do
  memory3 train sft --config "configs/train/$run.json" --out "$OUT/$run"
done
[ -n "${RUNS:-}" ] && exit 0
# run Q: J (shipped as smollm2-135m-instruct-memory3-j) continued with stage 2 on train-split
# Wikipedia summaries, every 64-token chunk reading its retrieved references
memory3 train pair --corpus wikipedia --split train --seq-len 256 --out ~/.cache/memory3/datasets/wiki-train-256
memory3 train continual --config configs/train/continual-smollm2-reader-30-k64.json \
  --out "$OUT/continual-smollm2-reader-30-k64"
# run T, the shipped reader: Q continued with 120 more steps of stage 2, each chunk reading only
# its own reference (one memory per chunk, as the reader is served)
memory3 train continual --config configs/train/continual-smollm2-reader-30-k64-more-k1.json \
  --out "$OUT/continual-smollm2-reader-30-k64-more-k1"
probe() {  # run, kept-token settings
  local run=$1; shift
  memory3 train probe --model "$OUT/$run/adapter" --kept "$@" > "benchmarks/results/$run.kept-sweep.jsonl"
}
probe sft-smollm2-reader-20 32 0 16
for run in k32-wiki k32-mix k32-vq k32-vq2 k32-vq4; do probe "sft-smollm2-reader-20-$run" 16 8 0; done
probe sft-smollm2-reader-20-k32-vq3 16 8 0 48
probe sft-smollm2-reader-20-k48-ctl 32
python benchmarks/research/reader_report.py
