#!/usr/bin/env bash
# The exact commands that make the shipped skip adapters (skipray/assets/smollm2-skip, ~1.5x, the default;
# skipray/assets/smollm2-skip-2x; skipray/assets/smollm2-skip-fast, the five-step hold). CPU, one torch thread
# per process (2 threads were no faster on 2 cores and collapse when anything else runs). Every step resumes:
# data shards that exist are skipped, and `skipray train --resume` continues from OUT/checkpoint (it re-reads the
# data, so new shards join).
#   bash scripts/train_default.sh            # everything, in order (tens of core-hours)
#   STAGE=train15 bash scripts/train_default.sh   # one stage: prompts data calibrate train15 eval15 policy15
#                                                 # train15p eval15p policy15b hold train15h eval15h train2x
#                                                 # eval2x hold2x data128 fast trainfast evalfast
#                                                 # static trainstatic evalstatic trainrkl evalrkl
#                                                 # trainjsd evaljsd hold5 trainhold5 evalhold5
#                                                 # factsdata subcal trainsub evalsub mixfacts
#                                                 # trainhold5f evalhold5f trainhold5f2 evalhold5f2
#                                                 # trainhold5r evalhold5r subcal12 factpos
#                                                 # package
# The shipped ~1.5x default is runs/skip15h: skip15 (1100 steps) -> skip15p (+500 steps with on-policy
# rollouts) -> skip15h (+400 steps on the hold schedule: full depth for the first 12 steps, then 11 layers).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
PY=.venv/bin/python
SK=.venv/bin/skipray
STEPS15=${STEPS15:-1100}
STEPS2X=${STEPS2X:-1100}
STEPS15P=${STEPS15P:-500}
STEPS15H=${STEPS15H:-400}
HELD=(--exclude examples/heldout_prompts.parquet --exclude examples/fact_questions.parquet --exclude examples/prompts.parquet)
stage() { [ -z "${STAGE:-}" ] || [ "$STAGE" = "$1" ]; }

if stage prompts; then  # the project's prompt lists and the held-out fact questions
    $PY examples/make_train_prompts.py
    $PY examples/make_fact_questions.py
fi
if stage data; then
    # two sampled full-depth answers per project prompt, with the teacher's top-16 log-probs per token
    $SK distill-data --prompts examples/train_prompts.parquet --out runs/data/project --shard-size 256 \
        --samples 2 --temperature 0.7 --topk 16 --max-new-tokens 64 --batch-size 32 --seed 1000
    # prompts the model writes itself (Magpie), none close to a held-out prompt or question, one answer each
    $SK distill-data --self-prompts "${SELF_PROMPTS:-6000}" "${HELD[@]}" --out runs/data/self --shard-size 500 \
        --samples 1 --temperature 0.7 --topk 16 --max-new-tokens 64 --batch-size 32 --seed 50000
fi
if stage calibrate; then  # the drop order: greedy teacher-forced KL, prompt at full depth (~7 min + ~2 min)
    $SK calibrate --data runs/data/project/part-00000.parquet --out runs/calibrate/skip15.json \
        --max-layers 30 --min-layers 10 --decay-tokens 36 --shape power --power 1.5
    $SK calibrate --data runs/data/project/part-00000.parquet --out runs/calibrate/skip2x.json \
        --from-order runs/calibrate/skip15.json --search-min-layers 4 \
        --max-layers 30 --min-layers 6 --decay-tokens 20 --shape power --power 1.5
fi
train() {  # OUT SCHEDULE STEPS [extra flags]
    local out=$1 sched=$2 steps=$3; shift 3
    $SK train --data runs/data --out "$out" --model smollm2-base --schedule-file "$sched" --lora-r 32 \
        --lora-alpha 64 --lr 4e-4 --steps "$steps" --batch-size 8 --warmup-steps 30 --save-every 25 \
        --kl-weight 1.0 --ce-weight 0.0 --max-len 192 "$@" $( [ -f "$out/checkpoint/trainer_state.pt" ] && echo --resume )
}
evaluate() {  # MODEL OUT
    $SK eval --model "$1" --prompts examples/heldout_prompts.parquet --limit 64 \
        --questions examples/fact_questions.parquet --schedule trained --schedule full \
        --schedule ref:bf16 --schedule ref:t0.3 --out "$2"
}
evaluate_lever() {  # MODEL OUT: the levers' evaluation (32 held-out prompts, every fact question)
    $SK eval --model "$1" --prompts examples/heldout_prompts.parquet --limit 32 \
        --questions examples/fact_questions.parquet --schedule trained --schedule full --out "$2"
}
stage train15 && train runs/skip15 runs/calibrate/skip15.json "$STEPS15"
stage eval15 && evaluate runs/skip15 runs/eval-skip15
if stage policy15; then  # on-policy rollouts: the ~1.5x adapter answers under its schedule, the full model
    # scores every token (top-16); prompts: the model-written ones and the project's, shuffled (~20 min)
    $PY - <<'EOF'
import glob, random
import pyarrow as pa, pyarrow.parquet as pq
ps = [p for f in sorted(glob.glob("runs/data/self/self-*.parquet")) for p in pq.read_table(f, columns=["prompt"]).column("prompt").to_pylist()]
ps += pq.read_table("examples/train_prompts.parquet", columns=["prompt"]).column("prompt").to_pylist()
uniq = list(dict.fromkeys(ps))
random.Random(0).shuffle(uniq)
pq.write_table(pa.table({"prompt": uniq}), "runs/policy_prompts.parquet")
EOF
    $SK distill-data --model runs/skip15 --policy trained --prompts runs/policy_prompts.parquet --limit 2000 \
        --out runs/data/policy15 --shard-size 500 --topk 16 --temperature 0.5 --max-new-tokens 64 --batch-size 32 \
        --seed 70000
fi
# continue the ~1.5x adapter on everything under runs/data, on-policy rollouts included
stage train15p && train runs/skip15p runs/calibrate/skip15.json "$STEPS15P" --lr 2e-4 --warmup-steps 20 \
    $( [ -f runs/skip15p/checkpoint/trainer_state.pt ] || echo --init-adapter runs/skip15 )
stage eval15p && evaluate runs/skip15p runs/eval-skip15p
if stage policy15b; then  # a second round of rollouts, from skip15p, on the next 1500 prompts of the same list
    $PY -c 'import pyarrow.parquet as pq; pq.write_table(pq.read_table("runs/policy_prompts.parquet").slice(2000), "runs/policy_prompts_b.parquet")'
    $SK distill-data --model runs/skip15p --policy trained --prompts runs/policy_prompts_b.parquet --limit 1500 \
        --out runs/data/policy15b --shard-size 500 --topk 16 --temperature 0.5 --max-new-tokens 64 --batch-size 32 \
        --seed 80000
fi
if stage hold; then  # the shipped ~1.5x schedule: the same drop order, full depth for the first 12 generation
    # steps (the adapter is off there, so those tokens are the base model's), then down to 11 layers by step 22
    # (power 6): 17.03 layers per token over 64 tokens, first token included
    $PY -c 'import json; s = json.load(open("runs/calibrate/skip15.json")); s.update(min_layers=11, decay_tokens=22, power=6.0); json.dump(s, open("runs/calibrate/skip15-hold.json", "w"))'
fi
stage train15h && train runs/skip15h runs/calibrate/skip15-hold.json "$STEPS15H" --lr 2e-4 --warmup-steps 20 \
    $( [ -f runs/skip15h/checkpoint/trainer_state.pt ] || echo --init-adapter runs/skip15p )
stage eval15h && evaluate runs/skip15h runs/eval-skip15h
stage train2x && train runs/skip2x runs/calibrate/skip2x.json "$STEPS2X" \
    $( [ -f runs/skip2x/checkpoint/trainer_state.pt ] || echo --init-adapter runs/skip15 )  # warm start
stage eval2x && evaluate runs/skip2x runs/eval-skip2x
if stage hold2x; then  # the ~2x package's schedule: full depth for the first 9 steps, then 6 layers by step 13
    # (power 8): 10.89 layers per token over 64 tokens; chosen zero-shot on the 450-step adapter (eval-hold2x)
    $PY -c 'import json; s = json.load(open("runs/calibrate/skip2x.json")); s.update(decay_tokens=13, power=8.0); json.dump(s, open("runs/calibrate/skip2x-hold.json", "w"))'
    $SK eval --model runs/skip2x --prompts examples/heldout_prompts.parquet --limit 64 \
        --questions examples/fact_questions.parquet --schedule runs/calibrate/skip2x-hold.json --schedule trained \
        --out runs/eval-hold2x-zeroshot
fi
if stage data128; then  # long answers, so training sees the decay: the base model's 128-token answers to
    # model-written prompts (none close to a held-out prompt or question), teacher top-16 per token
    $SK distill-data --model smollm2-base --self-prompts "${SELF128_PROMPTS:-20000}" "${HELD[@]}" \
        --out runs/data/self128 --shard-size 250 --samples 1 --temperature 0.7 --topk 16 --max-new-tokens 128 \
        --batch-size 32 --seed 90000
fi
if stage fast; then  # the fast-start schedule: the calibrated drop order, 30 -> 12 layers linearly over the
    # first 10 steps (19.31 layers per token over 16 tokens, 13.83 over 64, first token included)
    $PY -c 'import json; s = json.load(open("runs/calibrate/skip15.json")); s.update(min_layers=12, decay_tokens=10, shape="linear"); json.dump(s, open("runs/calibrate/skip-fast.json", "w"))'
fi
# the fast-start adapter: warm start from the hold adapter, trained on the 128-token answers only
stage trainfast && train runs/skipfast runs/calibrate/skip-fast.json "${STEPSF:-400}" --lr 2e-4 --warmup-steps 20 \
    --data runs/data/self128 $( [ -f runs/skipfast/checkpoint/trainer_state.pt ] || echo --init-adapter runs/skip15h )
stage evalfast && evaluate runs/skipfast runs/eval-skipfast
if stage static; then  # the honest baseline: 14 layers for every generated step from the first (the nearest
    # whole number at the fast-start schedule's FLOPs), same drop order, same data, steps and warm start
    $PY -c 'import json; s = json.load(open("runs/calibrate/skip15.json")); s.update(max_layers=14, min_layers=14, decay_tokens=0); json.dump(s, open("runs/calibrate/static14.json", "w"))'
fi
stage trainstatic && train runs/static14 runs/calibrate/static14.json "${STEPSF:-400}" --lr 2e-4 --warmup-steps 20 \
    --data runs/data/self128 $( [ -f runs/static14/checkpoint/trainer_state.pt ] || echo --init-adapter runs/skip15h )
stage evalstatic && evaluate runs/static14 runs/eval-static14
# the objective lever: the fast-start run again with reverse KL and with Jensen-Shannon instead of forward KL
# (DistillSpec, arXiv 2310.08461): same schedule, data, steps and warm start
for div in rkl:reverse jsd:jsd; do
    name=${div%%:*}
    stage "train$name" && train "runs/fast-$name" runs/calibrate/skip-fast.json "${STEPSF:-400}" --lr 2e-4 \
        --warmup-steps 20 --data runs/data/self128 --divergence "${div#*:}" \
        $( [ -f "runs/fast-$name/checkpoint/trainer_state.pt" ] || echo --init-adapter runs/skip15h )
    stage "eval$name" && evaluate_lever "runs/fast-$name" "runs/eval-fast-$name"
done
if stage hold5; then  # a five-step hold: full depth for steps 0-4, then down to 11 layers by step 7 (power 6),
    # the default's drop order (19.75 layers per token over 16 tokens, 13.19 over 64, first token included)
    $PY -c 'import json; s = json.load(open("runs/calibrate/skip-fast.json")); s.update(min_layers=11, decay_tokens=7, shape="power", power=6.0); json.dump(s, open("runs/calibrate/hold5.json", "w"))'
fi
stage trainhold5 && train runs/hold5 runs/calibrate/hold5.json "${STEPSF:-400}" --lr 2e-4 --warmup-steps 20 \
    --data runs/data/self128 $( [ -f runs/hold5/checkpoint/trainer_state.pt ] || echo --init-adapter runs/skip15h )
stage evalhold5 && evaluate_lever runs/hold5 runs/eval-hold5
if stage subcal; then  # the sublayer lever: attention and MLP blocks drop separately; greedy teacher-forced KL
    # over the 60 blocks per layer equivalent saved (6 answers of 24 tokens, ~20 min), the fast-start budget
    $SK calibrate --data runs/data/self128/self-00000.parquet --out runs/calibrate/sub-fast.json --sublayers \
        --from-order runs/calibrate/skip15.json --max-layers 30 --min-layers 12 --decay-tokens 10 --shape linear \
        --search-min-layers 11 --n 6 --length 24
fi
if stage subcal12; then  # the same search on twice as many answers of 32 tokens (~28 min)
    $SK calibrate --data runs/data/self128/self-00000.parquet --out runs/calibrate/sub-fast-n12.json --sublayers \
        --from-order runs/calibrate/skip15.json --max-layers 30 --min-layers 12 --decay-tokens 10 --shape linear \
        --search-min-layers 11 --n 12 --length 32
fi
stage trainsub && train runs/fast-sub runs/calibrate/sub-fast.json "${STEPSF:-400}" --lr 2e-4 --warmup-steps 20 \
    --data runs/data/self128 $( [ -f runs/fast-sub/checkpoint/trainer_state.pt ] || echo --init-adapter runs/skip15h )
stage evalsub && evaluate_lever runs/fast-sub runs/eval-fast-sub
if stage factsdata; then  # facts in the data: short factual questions the model writes itself from openings
    # ("Who", "What year", ...), none close to a held-out prompt or question, with the base model's greedy short
    # answers and its top-16 log-probs per token
    $SK distill-data --model smollm2-base --self-prompts "${FACT_PROMPTS:-8000}" "${HELD[@]}" \
        --self-prompt-starts "Who,Who was,What year,Which,What is the capital of,How many,Where is,When did,What is the name of,Which country" \
        --out runs/data/facts --shard-size 500 --samples 1 --temperature 0 --topk 16 --max-new-tokens 48 \
        --batch-size 32 --seed 120000
fi
if stage mixfacts; then  # the 128-token answers and the short factual answers in one training set
    mkdir -p runs/data/mixfacts
    for f in runs/data/self128/*.parquet; do ln -sf "../self128/$(basename "$f")" "runs/data/mixfacts/s128-$(basename "$f")"; done
    for f in runs/data/facts/*.parquet; do ln -sf "../facts/$(basename "$f")" "runs/data/mixfacts/facts-$(basename "$f")"; done
fi
# the facts lever on the five-step hold: +400 steps from the trained hold5 adapter on the mixed set, the first 12
# answer tokens weighted 4x (the answers complete at tokens 6-9); then the capacity lever: the same run with the
# adapter grown from rank 32 to 128 (same scaling, so it starts as the rank-32 adapter)
FACTS=(--data runs/data/mixfacts --lr 2e-4 --warmup-steps 20 --early-tokens 12 --early-weight 4)
stage trainhold5f && train runs/hold5f runs/calibrate/hold5.json "${STEPSF:-400}" "${FACTS[@]}" \
    $( [ -f runs/hold5f/checkpoint/trainer_state.pt ] || echo --init-adapter runs/hold5 )
stage evalhold5f && evaluate_lever runs/hold5f runs/eval-hold5f
# more training: +400 steps more from hold5f on the same mixed set (another data order)
stage trainhold5f2 && train runs/hold5f2 runs/calibrate/hold5.json "${STEPSF:-400}" "${FACTS[@]}" --seed 1 \
    $( [ -f runs/hold5f2/checkpoint/trainer_state.pt ] || echo --init-adapter runs/hold5f )
stage evalhold5f2 && evaluate_lever runs/hold5f2 runs/eval-hold5f2
stage trainhold5r && train runs/hold5f-r128 runs/calibrate/hold5.json "${STEPSF:-400}" "${FACTS[@]}" \
    --lora-r 128 --lora-alpha 256 $( [ -f runs/hold5f-r128/checkpoint/trainer_state.pt ] || echo --init-adapter runs/hold5 )
stage evalhold5r && evaluate_lever runs/hold5f-r128 runs/eval-hold5f-r128
if stage factpos; then  # where facts are decided: fact retention by the position at which the full model's
    # answer completes, for schedules at the short-answer budget, on three adapters (first 200 questions)
    for m in default:default-adapter runs/skipfast:fast-start-adapter; do
        $SK eval --model "${m%%:*}" --prompts examples/heldout_prompts.parquet --limit 4 \
            --questions examples/fact_questions.parquet --question-limit 200 --rep-tokens 64 --schedule trained \
            --schedule max-layers=30,min-layers=11,decay-tokens=7,shape=power,power=6 \
            --schedule max-layers=25,min-layers=11,decay-tokens=8,shape=power,power=40 \
            --schedule max-layers=22,min-layers=11,decay-tokens=10,shape=power,power=40 \
            --schedule max-layers=19,min-layers=12,decay-tokens=16,shape=power,power=40 --out "runs/factpos-${m#*:}"
    done
    $SK eval --model runs/hold5 --prompts examples/heldout_prompts.parquet --limit 4 \
        --questions examples/fact_questions.parquet --question-limit 200 --rep-tokens 64 --schedule trained \
        --out runs/factpos-hold5-adapter
fi
if stage package; then  # fp16 adapter + skipray.json into the package
    $PY scripts/package_adapter.py runs/skip15h skipray/assets/smollm2-skip
    [ -d runs/skip2x ] && $PY scripts/package_adapter.py runs/skip2x skipray/assets/smollm2-skip-2x \
        runs/calibrate/skip2x-hold.json
    # default-fast: the five-step hold with facts in the data (trainhold5f, then trainhold5f2)
    [ -d runs/hold5f2 ] && $PY scripts/package_adapter.py runs/hold5f2 skipray/assets/smollm2-skip-fast
fi
