#!/usr/bin/env bash
# The runs behind docs/findings.md (tables in docs/results/). Run from the repository root in an environment set up by
# scripts/install.sh; writes data/, runs/results*/ and results/. STAGES picks what runs (default: all):
#
#   budgets   the issue-14 table: the main command's agents (hindsight-teacher BC, then MaskablePPO) trained in
#             each spectral mode, then every policy at equal FLOPs at three budgets on three held-out corpora
#             (python -m agents.evaluate --budgets); results/budgets-joint and results/budgets-separate.
#             About 75 minutes on 2 CPU cores.
#   residual  train_agent.py --residual: MaskablePPO choosing offsets from the static allocation, rewarded by
#             log(KL_static / KL) on each episode's batch, then the equal-FLOPs table at its budget
#             (results/residual). About 12 minutes.
#   per_head  one rank per key/value head group, the agent shown its input's 16-sample Fisher profile: per-head
#             hindsight-teacher BC (budgets drawn from 0.5-0.75), then MaskablePPO; then uniform, static,
#             hindsight:fisher and both agents at three budgets on three held-out corpora, joint mode
#             (results/per-head). About 30 minutes.
#   per_head_delta  the per-head agent shown Eq. S instead (its input's attention-output change times a
#             scale fitted on validation text: one forward pass per input, no backward), taught by the Eq. S
#             hindsight teacher whose plan it sees, PPO at learning rate 1e-5, and PPO from scratch (9000 steps);
#             evaluated like per_head beside hindsight:scaled_delta, energy and random, in joint
#             (results/per-head-delta) and separate mode (results/per-head-delta-separate; DELTA_MODES picks).
#             About 40 minutes per mode.
#   ppo_vs_bc does PPO improve on a clone? The README main command's env (budget 0.625) and teacher, cloned from
#             only 8 of its episodes (80 BC epochs), then MaskablePPO from it with its logits at temperature 0.3
#             and the per-step credit of the additive model (--kl-credit model; 9000 steps, 50 episodes per update);
#             the clone and the agent beside uniform and the teacher on 48 test episodes (results/ppo-vs-bc/table.md).
#             About 20 minutes.
#   paper     the paper's MDP (no budget, per-step Eq. 13 reward, Eq. 9 guardrail): oracle dataset -> BC ->
#             MaskablePPO (and a beta=0 ablation agent) -> every policy on three corpora in both modes, with
#             the Table II ablations; results/. About 80 minutes.
set -euo pipefail
# DRY_RUN=1 prints each command instead of running it (tests/test_reproduce.py parses every one of them)
run() { if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
# `--compare` with no policies skips train_agent.py's closing comparison: each stage evaluates afterwards
stages="${STAGES:-budgets residual per_head per_head_delta paper}"
start=$(date +%s)

if [[ " $stages " == *" budgets "* ]]; then
  # the per-layer recipe (--preset per-layer): 1 x 128 tokens, budget 0.625, kl reward, no guardrail, 4500 PPO steps
  budget_options=(--env DRRL-Attention-PerLayer-v0)
  baselines=(uniform static:fisher hindsight:fisher fixed:32 energy:0.9 stable_rank threshold:0.1 gumbel:0.05
             random oracle)
  for mode in joint separate; do
    run rm -rf "runs/results-$mode"
    run python train_agent.py --preset per-layer --spectral-mode "$mode" --logdir "runs/results-$mode" --run-name train \
      --compare
    run="runs/results-$mode/train"
    run cp "$run/bc_model.safetensors" "runs/results-$mode/bc.safetensors"
    run cp "$run/model.safetensors" "runs/results-$mode/bc_ppo.safetensors"
    run python -m agents.evaluate "${budget_options[@]}" --modes "$mode" --budgets 0.75 0.625 0.5 \
      --timing-repeats 1 --fig4-lengths --out "results/budgets-$mode" --logdir "runs/results-$mode" \
      --policies "${baselines[@]}" "runs/results-$mode/bc.safetensors" "runs/results-$mode/bc_ppo.safetensors"
  done
fi

if [[ " $stages " == *" residual "* ]]; then
  run rm -rf runs/results-residual
  run python train_agent.py --preset residual --logdir runs/results-residual --run-name train --compare
  run=runs/results-residual/train
  run cp "$run/model.safetensors" runs/results-residual/residual.safetensors
  run python -m agents.evaluate --env DRRL-Attention-PerLayer-v0 --modes joint --budgets 0.625 \
    --timing-repeats 1 --fig4-lengths --out results/residual --logdir runs/results-residual \
    --policies uniform static:fisher hindsight:fisher runs/results-residual/residual.safetensors
fi

if [[ " $stages " == *" per_head "* ]]; then
  per_head_options=(--sensitivity-estimate fisher)  # DRRL-Attention-v0 with the 16-sample Fisher signal
  run rm -rf runs/results-per-head
  run python train_agent.py "${per_head_options[@]}" --warm-start hindsight --hyperparams '{}' --flops-budget 0.5 0.75 \
    --logdir runs/results-per-head --run-name train --compare
  run=runs/results-per-head/train
  run cp "$run/bc_model.safetensors" runs/results-per-head/bc.safetensors
  run cp "$run/model.safetensors" runs/results-per-head/bc_ppo.safetensors
  run python -m agents.evaluate "${per_head_options[@]}" --modes joint --budgets 0.75 0.625 0.5 --timing-repeats 0 \
    --out results/per-head --logdir runs/results-per-head --policies uniform static:fisher energy:0.9 \
    hindsight:fisher runs/results-per-head/bc.safetensors runs/results-per-head/bc_ppo.safetensors
fi

if [[ " $stages " == *" per_head_delta "* ]]; then
  for mode in ${DELTA_MODES:-joint separate}; do
    name=per-head-delta$([[ $mode == joint ]] || echo "-$mode")  # joint keeps the folder name it was first run with
    run rm -rf "runs/results-$name"
    run python train_agent.py --spectral-mode "$mode" --flops-budget 0.5 0.75 --logdir "runs/results-$name" \
      --run-name train --compare
    run="runs/results-$name/train"
    run cp "$run/bc_model.safetensors" "runs/results-$name/bc.safetensors"
    run cp "$run/model.safetensors" "runs/results-$name/bc_ppo.safetensors"
    # PPO from scratch on the same env, with the updates that let it beat random (50 episodes each, paired reward)
    run python train_agent.py --preset scratch --spectral-mode "$mode" --flops-budget 0.5 0.75 \
      --logdir "runs/results-$name" --run-name scratch --compare
    run cp "runs/results-$name/scratch/model.safetensors" "runs/results-$name/ppo_scratch.safetensors"
    run python -m agents.evaluate --modes "$mode" \
      --budgets 0.75 0.625 0.5 --timing-repeats 0 --out "results/$name" --logdir "runs/results-$name" \
      --policies uniform static:fisher energy:0.9 random hindsight:fisher hindsight:scaled_delta \
      "runs/results-$name/bc.safetensors" "runs/results-$name/bc_ppo.safetensors" \
      "runs/results-$name/ppo_scratch.safetensors"
  done
fi

if [[ " $stages " == *" ppo_vs_bc "* ]]; then
  # a clone that misses its teacher: 80 BC epochs on 8 teacher episodes (the main command's env, seeds of its warm start)
  env_options=(--env DRRL-Attention-v0)  # the main command's env as it is
  run rm -rf runs/results-ppo-vs-bc data/teacher-8
  run mkdir -p results/ppo-vs-bc runs/results-ppo-vs-bc
  run python -m oracle --policy hindsight --estimate scaled_delta --episodes 8 --seed 500000 --out data/teacher-8 \
    "${env_options[@]}"
  run python -m agents.bc --dataset data/teacher-8 --epochs 80 --entropy-coef 0.05 --out runs/results-ppo-vs-bc/bc \
    --logdir runs/results-ppo-vs-bc/bc-logs
  run python train_agent.py "${env_options[@]}" --bc-model runs/results-ppo-vs-bc/bc.safetensors --bc-temperature 0.3 \
    --kl-baseline waterfill_log_ratio --kl-credit model --total-timesteps 9000 --n-steps 1500 \
    --hyperparams '{"learning_rate": 3e-4, "batch_size": 300, "n_epochs": 10, "gamma": 1.0}' \
    --logdir runs/results-ppo-vs-bc --run-name train --eval-episodes 48 --timing-repeats 0 \
    --compare uniform hindsight:scaled_delta runs/results-ppo-vs-bc/bc.safetensors | run tee results/ppo-vs-bc/table.md
fi

if [[ " $stages " == *" paper "* ]]; then
  # the paper's MDP (DRRL-Attention-Paper-v0)
  env_options=(--env DRRL-Attention-Paper-v0)
  steps="${STEPS:-12000}"
  run rm -rf runs/results
  run python -m oracle --episodes 24 --out data/oracle-wiki-256 "${env_options[@]}"
  # the run names are the agents' ids in the tables and figures (maskable_ppo:bc_ppo, maskable_ppo:beta0)
  run python train_agent.py --preset paper --total-timesteps "$steps" --bc-dataset data/oracle-wiki-256 \
    --logdir runs/results --run-name bc_ppo --checkpoint-every 3000 --compare
  run python train_agent.py --preset paper --total-timesteps "$steps" --beta 0 --logdir runs/results \
    --run-name beta0 --compare
  run python -m agents.evaluate "${env_options[@]}" --modes separate joint --runs runs/results --ablations \
    --policies full fixed:32 energy:0.9 random stable_rank threshold:0.1 gumbel:0.05 oracle \
    runs/results/bc_ppo/model.safetensors static:match runs/results/beta0/model.safetensors
fi
echo "stages: $stages  total: $(( $(date +%s) - start )) s"
