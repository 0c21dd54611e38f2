#!/usr/bin/env bash
# Two P1 runs side by side on a 2-GPU machine, one per GPU, each in its own working folder (an A/B pair).
#   DATA_PATH=... TOKENIZER_PATH=... OUT=results/ bash bench/p1_pair.sh "TAG SCRIPT [VAR=value ...]" ["TAG SCRIPT ..."]
# SCRIPT is a copy of train_gpt.py (e.g. `git show BRANCH:train_gpt.py > b.py`); the settings are the P1
# command's plus the pair's own. Each run's log and stdout go to $OUT; a table of both ends the output.
set -u
[ $# -ge 1 ] || { sed -n 2,5p "$0"; exit 2; }
OUT=${OUT:-bench/results/pair}; mkdir -p "$OUT"; OUT=$(realpath "$OUT")
DATA_PATH=$(realpath "$DATA_PATH"); TOKENIZER_PATH=$(realpath "$TOKENIZER_PATH")
run() {  # gpu tag script [VAR=value ...]
  local gpu=$1 tag=$2 script=$(realpath "$3"); shift 3
  local w; w=$(mktemp -d); mkdir -p "$w/logs"; cp "$script" "$w/train_gpt.py"
  ( cd "$w" && env "$@" CUDA_VISIBLE_DEVICES=$gpu DATA_PATH=$DATA_PATH TOKENIZER_PATH=$TOKENIZER_PATH RUN_ID=p1_$tag \
    SEED=${SEED:-1337} MAX_WALLCLOCK_SECONDS=240 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 EVAL_MODE=flat \
    TRAIN_LOG_EVERY=250 VAL_LOSS_EVERY=1000 PYTHONUNBUFFERED=1 timeout ${LIMIT:-430} python3 train_gpt.py \
    > "$OUT/$tag.out" 2>&1; echo "rc $?" >> "$OUT/$tag.out"; cp "logs/p1_$tag.txt" "$OUT/" 2>/dev/null )
}
gpu=0; tags=()
for spec in "$@"; do read -r -a a <<< "$spec"; run $gpu "${a[@]}" & tags+=("${a[0]}"); gpu=$((gpu + 1)); sleep 2; done
wait
printf "%-22s %8s %6s %8s %11s %9s\n" tag ms/step steps pre_bpb roundtrip bytes
for t in "${tags[@]}"; do o=$OUT/$t.out; v() { grep -oP "$1" "$o" | head -1 || true; }
  printf "%-22s %8s %6s %8s %11s %9s\n" "$t" "$(v '^training: \d+ steps.*step_avg:\K[\d.]+')" "$(v '^training: \K\d+')" \
    "$(v '^pre_export.*val_bpb:\K[\d.]+')" "$(v '^final_roundtrip\S* .*val_bpb:\K[\d.]+')" "$(v '^Total submission size.*: \K\d+')"
  tail -1 "$o"; grep -E "WARNING|Traceback|^[A-Za-z]+Error" "$o" | head -3
done
