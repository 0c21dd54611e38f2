#!/usr/bin/env bash
# Two P1 runs side by side on a 2-GPU machine, one per GPU, each in its own working folder (an A/B pair).
#   DATA_PATH=... TOKENIZER_PATH=... OUT=results/ bash bench/p1_pair.sh "TAG SCRIPT [VAR=value ...]" ["TAG SCRIPT ..."]
# SCRIPT is a copy of train_gpt.py (e.g. `git show BRANCH:train_gpt.py > b.py`); each run gets the P1 command's
# settings (131,072 tokens per step: one rank's share of the default 1,048,576; no test-time training), then its own
# VAR=value ones (SEED, TRAIN_BATCH_TOKENS and TTT_EPOCHS may differ from P1's; the wallclock, the accumulation, the
# scoring mode and the paths may not). Logs and stdout go to $OUT; a table ends the output. LIMIT: seconds a run
# may take (540). KEEP_ARTIFACTS=1: each run's artifact goes to $OUT too, as TAG.ptz.
set -u
[ $# -ge 1 ] || { sed -n 2,8p "$0"; exit 2; }
for spec in "$@"; do
  if [[ " $spec" =~ \ (MAX_WALLCLOCK_SECONDS|GRAD_ACCUM_STEPS|EVAL_MODE|DATA_PATH|TOKENIZER_PATH|RUN_ID|CUDA_VISIBLE_DEVICES)= ]]; then
    echo "p1_pair: '$spec' sets ${BASH_REMATCH[1]}, which P1 fixes" >&2; exit 2
  fi
done
OUT=${OUT:-bench/results/pair}; mkdir -p "$OUT"; OUT=$(realpath "$OUT")
DATA_PATH=$(realpath "$DATA_PATH"); TOKENIZER_PATH=$(realpath "$TOKENIZER_PATH")
run() {  # gpu tag script [VAR=value ...]
  local gpu=$1 tag=$2 script=$(realpath "$3"); shift 3
  local w; w=$(mktemp -d); mkdir -p "$w/logs"; cp "$script" "$w/train_gpt.py"
  ( cd "$w" && env SEED=1337 TRAIN_BATCH_TOKENS=131072 TTT_EPOCHS=0 TRAIN_LOG_EVERY=250 VAL_LOSS_EVERY=1000 "$@" \
    CUDA_VISIBLE_DEVICES=$gpu DATA_PATH=$DATA_PATH TOKENIZER_PATH=$TOKENIZER_PATH RUN_ID=p1_$tag \
    MAX_WALLCLOCK_SECONDS=240 GRAD_ACCUM_STEPS=1 EVAL_MODE=flat PYTHONUNBUFFERED=1 timeout ${LIMIT:-540} \
    python3 train_gpt.py > "$OUT/$tag.out" 2>&1; echo "rc $?" >> "$OUT/$tag.out"; cp "logs/p1_$tag.txt" "$OUT/" 2>/dev/null
    [ -z "${KEEP_ARTIFACTS:-}" ] || cp final_model.int6.ptz "$OUT/$tag.ptz" 2>/dev/null )
}
gpu=0; tags=()
for spec in "$@"; do read -r -a a <<< "$spec"; run $gpu "${a[@]}" & tags+=("${a[0]}"); gpu=$((gpu + 1)); sleep 2; done
wait
# seed and tokens per step are read back from the run's own hyperparameter line: the table shows what ran
# roundtrip: the flat score P1 compares; ttt: the score after score-first test-time training ('-' when off)
printf "%-22s %5s %7s %8s %6s %8s %11s %11s %9s\n" tag seed tokens ms/step steps pre_bpb roundtrip ttt bytes
for t in "${tags[@]}"; do o=$OUT/$t.out; v() { local r; r=$(grep -oP "$1" "$o" | head -1); echo "${r:--}"; }
  printf "%-22s %5s %7s %8s %6s %8s %11s %11s %9s\n" "$t" "$(v '"seed": \K\d+')" "$(v '"train_batch_tokens": \K\d+')" \
    "$(v '^training: \d+ steps.*step_avg:\K[\d.]+')" "$(v '^training: \K\d+')" "$(v '^pre_export.*val_bpb:\K[\d.]+')" \
    "$(v '^final_roundtrip_flat .*val_bpb:\K[\d.]+')" "$(v '^final_roundtrip_flat_ttt .*val_bpb:\K[\d.]+')" \
    "$(v '^Total submission size.*: \K\d+')"
  tail -1 "$o"; grep -E "WARNING|Traceback|^[A-Za-z]+Error" "$o" | head -3
done
