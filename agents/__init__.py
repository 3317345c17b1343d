"""agents: learning and evaluation.

Learning: algorithms, networks, behaviour cloning, warm starts, callbacks, checkpoints, RLlib. Evaluation:
evaluate, results, figures, the zoo of policy specs, the leaderboard. Commands: ``train_agent.py``,
``python -m agents.evaluate``, ``agents.leaderboard``, ``agents.rllib``, ``agents.generate``,
``agents.perplexity``, ``agents.bc``, ``agents.record``, ``agents.replay``.
"""
