"""Can the agent see what makes an input different? The teacher's per-input deviations against the observation.

The hindsight teacher (``hindsight:fisher``) allocates each input's ranks from that input's own
layer profile; the static allocation is one allocation for all inputs. Their difference at a
step, ``offset = teacher index - static index`` (in candidate steps), has an input-independent part
(its mean per layer: a correction of the static allocation any policy can learn from the layer
index) and a per-input part (the residual around that mean): what adaptivity has to predict. This
script fits a ridge regression of the per-input part on each block of the env's observation at
that step, leave-episodes-out (6 folds by episode), and prints its R^2: near 0 means the
observation does not carry what makes the teacher deviate on this input.

    python experiments/teacher_predictability.py --dataset DATASET_FOLDER

``DATASET_FOLDER`` is a hindsight-teacher dataset (``$DRRL_CACHE_DIR/datasets/hindsight-fisher-*``,
as ``train_agent.py`` builds; or ``python -m oracle --policy hindsight:fisher``) with one fixed budget.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from agents.zoo import make_policy
from drrl_env.features import ObservationLayout
from oracle.dataset import env_config_of, load_trajectories, read_metadata

RIDGE = 10.0
FOLDS = 6


Predictor = Callable[[np.ndarray], np.ndarray]


def ridge_fit(features: np.ndarray, target: np.ndarray, ridge: float = RIDGE) -> Predictor:
    """A ridge regression of ``target`` on standardized ``features``, as a function of new features."""
    mean, scale = features.mean(0), features.std(0) + 1e-9
    xs = (features - mean) / scale
    weights = np.linalg.solve(xs.T @ xs + ridge * np.eye(xs.shape[1]), xs.T @ (target - target.mean()))
    return lambda new: ((new - mean) / scale) @ weights + target.mean()


def held_out_predictions(
    features: np.ndarray,
    target: np.ndarray,
    episode: np.ndarray,
    fit: Callable[[np.ndarray, np.ndarray], Predictor] = ridge_fit,
) -> np.ndarray:
    """Predictions of ``target`` by ``fit``, each made with its episode held out.

    The episodes are split into ``FOLDS`` folds; every fold is predicted by a fit on the others, so no
    prediction has seen its own input.
    """
    prediction = np.zeros_like(target)
    for held_out in np.array_split(np.unique(episode), FOLDS):
        test = np.isin(episode, held_out)
        prediction[test] = fit(features[~test], target[~test])(features[test])
    return prediction


def loo_r2(features: np.ndarray, target: np.ndarray, episode: np.ndarray) -> float:
    """R^2 of a ridge regression's predictions of ``target`` for held-out episodes (:func:`held_out_predictions`)."""
    prediction = held_out_predictions(features, target, episode)
    return float(1 - ((target - prediction) ** 2).sum() / ((target - target.mean()) ** 2).sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="hindsight-teacher dataset folder (one fixed budget)")
    args = parser.parse_args(argv)
    config = env_config_of(read_metadata(args.dataset))
    lo, hi = config["flops_budget"]
    if lo != hi or config.get("per_head") or config.get("segment_len"):
        raise SystemExit("error: --dataset must have one fixed budget, one rank per layer and one segment per layer")
    static = make_policy(f"static:{lo:g}:fisher", config).allocation(lo)  # candidate index per layer
    rows = load_trajectories(args.dataset).to_dict()
    observation = np.asarray(rows["observation"], dtype=np.float64)
    action = np.asarray(rows["action"]).reshape(len(observation), -1)[:, 0]
    layer, episode = np.asarray(rows["layer"], dtype=int), np.asarray(rows["episode"], dtype=int)
    offset = (action - np.asarray(static)[layer]).astype(np.float64)
    per_layer = np.array([offset[layer == i].mean() for i in range(layer.max() + 1)])
    per_input = offset - per_layer[layer]
    values, times = np.unique(offset.astype(int), return_counts=True)
    counts = {int(value): int(count) for value, count in zip(values, times, strict=True)}
    print(f"{len(np.unique(episode))} episodes, {len(offset)} steps; teacher - static offsets: {counts}")
    explained = offset.var() - per_input.var()
    print(f"variance of the offset {offset.var():.3f}: per layer {explained:.3f}, per input {per_input.var():.3f}")
    slices = ObservationLayout(len(config["ranks"]), 1, sensitivity=config.get("sensitivity_samples", 0) > 0).slices
    blocks = {name: observation[:, part] for name, part in slices.items()}
    if "sensitivity" in slices:  # its last K entries: the water-fill of the input's own profile, one-hot
        end = slices["sensitivity"].stop
        blocks["water-fill choice"] = observation[:, end - len(config["ranks"]) : end]
    blocks["whole observation"] = observation
    for name, features in blocks.items():
        print(f"R^2 of the per-input offset from {name:20s} {loo_r2(features, per_input, episode):+.3f}")


if __name__ == "__main__":
    main()
