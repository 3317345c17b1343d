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
import types as types_module
import typing
from typing import Any

import numpy as np

from drrl_env.config import GUARDRAILS, KL_BASELINES, KL_CREDITS, REWARDS, SPLITS, EnvConfig
from drrl_env.lowrank import SPECTRAL_MODES

_CHOICES = {
    "spectral_mode": SPECTRAL_MODES,
    "split": SPLITS,
    "reward": REWARDS,
    "guardrail": GUARDRAILS,
    "kl_baseline": KL_BASELINES,
    "kl_credit": KL_CREDITS,
}


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
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstring of every field of the dataclass ``cls`` (the string literal under it)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            if isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                docs[node.target.id] = following.value.value  # type: ignore[union-attr]
    return docs


def env_field_docs() -> dict[str, str]:
    """The attribute docstring of every ``EnvConfig`` field."""
    return field_docs(EnvConfig)


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    defaults: dict[str, Any] | None = None,
    choices: dict[str, tuple] | None = None,
    types: dict[str, Any] | None = None,
    nargs: dict[str, str] | None = None,
) -> argparse._ArgumentGroup:
    """One option ``--field-name`` per field of the dataclass ``cls``, its docstring the help, in a group ``title``.

    ``defaults`` override the fields' defaults, ``choices`` and ``types`` the options' (by field
    name). A bool field becomes a switch (``--no-field`` when it defaults to True), a tuple field
    ``nargs="+"`` (or ``nargs[name]``), ``X | None`` an option of type ``X``; ``_``-prefixed fields are skipped.
    """
    defaults, choices, types, nargs = defaults or {}, choices or {}, types or {}, nargs or {}
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        name, flag = field.name, "--" + field.name.replace("_", "-")
        if name.startswith("_"):
            continue
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
            kind = types.get(name, typing.get_args(hint)[0])
            shown = " ".join(map(str, default))
            group.add_argument(
                flag,
                dest=name,
                type=kind,
                nargs=nargs.get(name, "+"),
                default=list(default),
                help=f"{help_text} (default: {shown})" if kind is str else help_text,
            )
            continue
        if typing.get_origin(hint) in (typing.Union, types_module.UnionType):  # e.g. int | None
            kind = next(arg for arg in typing.get_args(hint) if arg is not type(None))
            if typing.get_origin(kind) is tuple:  # tuple[int, ...] | None: a list, absent by default
                group.add_argument(flag, dest=name, type=typing.get_args(kind)[0], nargs="+", default=default,
                                   help=f"{help_text} (default: {default})")  # fmt: skip
                continue
        else:
            kind = hint
        group.add_argument(
            flag,
            dest=name,
            type=types.get(name, kind),
            default=default,
            choices=choices.get(name),
            help=f"{help_text} (default: {default})",
        )
    return group


def add_env_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> argparse._ArgumentGroup:
    """Add one option per ``EnvConfig`` field to ``parser``; ``defaults`` override the config's defaults."""
    return add_dataclass_arguments(parser, EnvConfig, "environment (DRRL-Attention-v0 arguments)", defaults, _CHOICES)


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    """``cls(**{field: args.field})`` for the fields :func:`add_dataclass_arguments` added (tuples from lists)."""
    values = {}
    for field in dataclasses.fields(cls):
        if not field.name.startswith("_") and hasattr(args, field.name):
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def env_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``gym.make`` keywords of the ``EnvConfig`` options parsed into ``args``."""
    kwargs = {field.name: getattr(args, field.name) for field in dataclasses.fields(EnvConfig)}
    kwargs["ranks"] = tuple(kwargs["ranks"])
    budget = kwargs["flops_budget"]
    if isinstance(budget, list):  # [None], [share] or [lo, hi]; anything else is refused by EnvConfig
        kwargs["flops_budget"] = budget[0] if len(budget) == 1 else tuple(budget)
    return kwargs
