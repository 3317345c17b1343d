"""Command-line options generated from :class:`~drrl_env.env.EnvConfig`, shared by every drrl command.

Each field of ``EnvConfig`` becomes ``--field-name`` with the field's docstring as its help, so a
new env argument reaches ``train_agent.py``, ``python -m oracle`` and the evaluation at once.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import types
import typing
from typing import Any

import numpy as np

from drrl_env.config import GUARDRAILS, REWARDS, SPLITS, EnvConfig
from drrl_env.lowrank import SPECTRAL_MODES

_CHOICES = {"spectral_mode": SPECTRAL_MODES, "split": SPLITS, "reward": REWARDS, "guardrail": GUARDRAILS}


def at_least(minimum: int):
    """An argparse ``type``: an integer ``>= minimum``, else argparse's one-line error naming the option."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {number}")
        return number

    parse.__name__ = f"integer >= {minimum}"
    return parse


def share_or_none(value: str) -> float | None:
    """One ``--flops-budget`` value: a share, or ``none`` for no budget."""
    if value.lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share such as 0.625, or 'none'; got {value!r}") from None


@functools.cache
def env_field_docs() -> dict[str, str]:
    """The attribute docstring of every ``EnvConfig`` field (the string literal under it)."""
    tree = ast.parse(inspect.getsource(EnvConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            if isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                docs[node.target.id] = following.value.value  # type: ignore[union-attr]
    return docs


def add_env_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> argparse._ArgumentGroup:
    """Add one option per ``EnvConfig`` field to ``parser``; ``defaults`` override the config's defaults."""
    group = parser.add_argument_group("environment (DRRL-Attention-v0 arguments)")
    hints = typing.get_type_hints(EnvConfig)
    docs = env_field_docs()
    for field in dataclasses.fields(EnvConfig):
        name, flag = field.name, "--" + field.name.replace("_", "-")
        default = defaults.get(name, field.default)
        hint = hints[name]
        help_text = " ".join(docs.get(name, "").split()).replace("%", "%%")  # argparse formats help with %
        if name == "flops_budget":
            shown = "none" if default is None else " ".join(f"{v:g}" for v in np.atleast_1d(default))
            group.add_argument(
                flag,
                dest=name,
                nargs="+",
                type=share_or_none,
                metavar="SHARE",
                default=default,
                help=f"{help_text} (default: {shown})",
            )
            continue
        if hint is bool:
            if default:
                group.add_argument(f"--no-{flag[2:]}", dest=name, action="store_false", help=f"turn off: {help_text}")
            else:
                group.add_argument(flag, dest=name, action="store_true", help=help_text)
            continue
        if typing.get_origin(hint) is tuple:
            group.add_argument(flag, dest=name, type=int, nargs="+", default=list(default), help=help_text)
            continue
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # e.g. int | None
            kind = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        else:
            kind = hint
        group.add_argument(
            flag,
            dest=name,
            type=kind,
            default=default,
            choices=_CHOICES.get(name),
            help=f"{help_text} (default: {default})",
        )
    return group


def env_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``gym.make`` keywords of the ``EnvConfig`` options parsed into ``args``."""
    kwargs = {field.name: getattr(args, field.name) for field in dataclasses.fields(EnvConfig)}
    kwargs["ranks"] = tuple(kwargs["ranks"])
    budget = kwargs["flops_budget"]
    if isinstance(budget, list):  # [None], [share] or [lo, hi]; anything else is refused by EnvConfig
        kwargs["flops_budget"] = budget[0] if len(budget) == 1 else tuple(budget)
    return kwargs
