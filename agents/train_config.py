"""The options of ``train_agent.py`` as dataclasses: one ``--field-name`` option per field, its docstring the help."""

from __future__ import annotations

from dataclasses import dataclass

from agents.policies import DEFAULT_HISTORY

DEFAULT_COMPARE = ("uniform", "static:fisher", "hindsight:fisher", "fixed:32", "energy:0.9", "oracle")
VEC_ENVS = ("sync", "subproc")


@dataclass
class TrainConfig:
    """How train_agent.py trains (the env's options come from ``EnvConfig``)."""

    algo: str = "maskable_ppo"
    """RL algorithm, a name of the registry agents.algorithms.ALGORITHMS"""
    total_timesteps: int = 4500
    """env steps of training (with --resume: the total, steps already done included)"""
    seed: int = 0
    """seed of the agent and of the episodes"""
    n_envs: int = 1
    """parallel envs"""
    vec: str = "sync"
    """vector env: 'sync' (in-process) or 'subproc' (one process per env)"""
    n_steps: int = 150
    """rollout length per env and update for on-policy algorithms; it must be a multiple of the episode length
    (layers x segments), so that checkpoints fall at episode boundaries, which --resume needs"""
    hyperparams: str | None = None
    """keyword arguments of the algorithm's constructor as a JSON object, SB3's names, e.g.
    '{"learning_rate": 1e-4, "target_kl": 0.01}' (n_steps has its own option; batch_size defaults to
    min(64, n_steps x n_envs))"""
    policy: str = "mlp"
    """policy network: 'mlp' or 'transformer'"""
    history: int = DEFAULT_HISTORY
    """states the transformer policy attends over"""
    warm_start: str = "hindsight"
    """'hindsight': behaviour-clone the hindsight oracle first (the water-fill of each episode's budget over
    the Fisher estimate of what each layer's rank costs on that input), on a dataset of --warm-start-episodes
    episodes built once per env configuration and cached under $DRRL_CACHE_DIR/datasets; 'none': start from
    scratch. --bc-dataset or --bc-model replace it"""
    warm_start_episodes: int = 24
    """episodes of the hindsight dataset of --warm-start hindsight (about 10 s each on the 2-core CPU at 1x128)"""
    bc_dataset: str | None = None
    """oracle dataset (python -m oracle): behaviour-clone on it first"""
    bc_model: str | None = None
    """start from this behaviour-cloned agent file (.safetensors, from python -m agents.bc)"""
    bc_epochs: int = 30
    """behaviour-cloning epochs with --bc-dataset"""
    bc_entropy_coef: float = 0.05
    """entropy bonus of behaviour cloning (--warm-start, --bc-dataset); > 0 leaves PPO room to explore (measured:
    0.05 cloned the hindsight oracle as faithfully as 0, with a lower KL; docs/results.md)"""
    logdir: str = "runs"
    """folder of the runs"""
    checkpoint_every: int = 0
    """checkpoint every N env steps (0: only at the end)"""
    resume: str | None = None
    """run folder to continue from its newest good checkpoint, with the options it was started with;
    --total-timesteps (the total), --checkpoint-every, --eval-every, --vec, --device and the comparison options may
    change, others given with other values are refused"""
    trust_pickle: bool = False
    """allow loading SB3 .zip models (--bc-model, zip policies in --compare): they are pickles, and a crafted one
    runs code when loaded; agent .safetensors files need no trust"""
    eval_every: int = 0
    """log the test PPL of the agent every N env steps (0: never)"""


@dataclass
class CompareConfig:
    """The comparison train_agent.py prints after training."""

    compare: tuple[str, ...] = DEFAULT_COMPARE
    """policy specs to compare the agent with on the test split (none: skip the comparison)"""
    eval_episodes: int = 4
    """test episodes per policy"""
    timing_repeats: int = 2
    """timed forward replays per policy for ms/token"""
