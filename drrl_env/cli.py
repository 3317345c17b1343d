"""Command-line options generated from an env's config dataclass, shared by every drrl command.

Each field of ``EnvConfig`` (the DRRL-Attention ids) or ``KVCacheConfig`` (``DRRL-KVCache-v0``) becomes
``--field-name`` with the field's docstring as its help, so a new env argument reaches ``train_agent.py``,
``python -m oracle`` and the evaluation at once.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import types as types_module
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from drrl_env.attention.lowrank import SPECTRAL_MODES
from drrl_env.config import (
    ENV_ID,
    GUARDRAILS,
    KL_BASELINES,
    KL_CREDITS,
    REWARDS,
    SENSITIVITY_ESTIMATES,
    SPLITS,
    VARIANTS,
    EnvConfig,
)
from drrl_env.kvcache import KV_BASELINES, KV_BASES, KVCACHE_ENV_ID, KVCacheConfig

ENV_IDS = (*sorted(VARIANTS), KVCACHE_ENV_ID)
"""every registered id: the DRRL-Attention variants (EnvConfig) and the key-cache env (KVCacheConfig)"""

_CHOICES = {
    "spectral_mode": SPECTRAL_MODES,
    "split": SPLITS,
    "reward": REWARDS,
    "guardrail": GUARDRAILS,
    "kl_baseline": KL_BASELINES,
    "kl_credit": KL_CREDITS,
    "sensitivity_estimate": SENSITIVITY_ESTIMATES,
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


def config_class(env_id: str) -> type:
    """The config dataclass of the registered ``env_id``: ``KVCacheConfig`` or ``EnvConfig``."""
    if env_id == KVCACHE_ENV_ID:
        return KVCacheConfig
    if env_id not in VARIANTS:
        raise ValueError(f"env id must be one of {list(ENV_IDS)}, got {env_id!r}")
    return EnvConfig


BUDGET_FIELDS = ("flops_budget", "cache_budget")
"""the budget option of each config (a share, a (lo, hi) range or none)"""


def share_or_none(value: str) -> float | None:
    """One ``--flops-budget`` (``--cache-budget``) value: a share, or ``none`` for no budget."""
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
    name). A bool field becomes a pair of switches (``--field``, ``--no-field``), a tuple field
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
        if name in BUDGET_FIELDS:
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
        if hint is bool:  # --field and --no-field
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=f"{help_text}"
            )
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


def preparse(argv: Sequence[str] | None, flag: str, choices: Sequence[str], default: str) -> str:
    """The value of ``flag`` in ``argv`` (``sys.argv[1:]`` if None) before the full parse, which it shapes.

    A value outside ``choices`` is argparse's one-line error (exit 2), naming the flag and the choices.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(flag, choices=list(choices), default=default)
    known, _ = parser.parse_known_args(argv)
    return getattr(known, flag.lstrip("-").replace("-", "_"))


def env_id_of(argv: Sequence[str] | None, default: str = ENV_ID, ids: Sequence[str] | None = None) -> str:
    """The registered id ``--env`` names in ``argv`` (``default`` if none), read before the full parse.

    ``ids``: the ids the command takes (default: the DRRL-Attention variants).
    """
    return preparse(argv, "--env", list(ids or sorted(VARIANTS)), default)


def add_env_arguments(
    parser: argparse.ArgumentParser, env_id: str = ENV_ID, ids: Sequence[str] | None = None, **defaults: Any
) -> argparse._ArgumentGroup:
    """``--env ID`` and one option per field of ``env_id``'s config; their defaults: ``env_id``'s, then ``defaults``.

    ``env_id`` is a registered id (:data:`ENV_IDS`; a variant's defaults are :data:`drrl_env.config.VARIANTS`'),
    ``ids`` the ones the command takes (default: the DRRL-Attention variants); a command that lets the user
    choose it reads ``--env`` first with :func:`env_id_of`, so the options' defaults and ``--help`` follow it.
    """
    if env_id == KVCACHE_ENV_ID:
        choices = {"split": SPLITS, "basis": KV_BASES, "kl_baseline": KV_BASELINES}
        group = add_dataclass_arguments(parser, KVCacheConfig, f"environment ({env_id} arguments)", defaults, choices)
    else:
        group = add_dataclass_arguments(
            parser, EnvConfig, f"environment ({env_id} arguments)", {**VARIANTS[env_id], **defaults}, _CHOICES
        )
    group.add_argument(
        "--env",
        choices=list(ids or sorted(VARIANTS)),
        default=env_id,
        help=f"registered env id whose settings the options above start from (default: {env_id}; docs/env.md)",
    )
    return group


def dataclass_from_options(cls: type, options: Mapping[str, Any]) -> Any:
    """``cls(**{field: options[field]})`` for the fields :func:`add_dataclass_arguments` added (tuples from lists).

    ``options`` is a parsed command line as a mapping (``vars(args)``).
    """
    values = {}
    for field in dataclasses.fields(cls):
        if not field.name.startswith("_") and field.name in options:
            value = options[field.name]
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def env_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``gym.make`` keywords (every field of the config of ``options["env"]``) of the env options in ``options``.

    ``options`` is a parsed command line as a mapping (``vars(args)``); without ``env``, the DRRL-Attention ids'.
    """
    cls = config_class(options.get("env") or ENV_ID)
    kwargs = {field.name: options[field.name] for field in dataclasses.fields(cls)}
    kwargs["ranks"] = tuple(kwargs["ranks"])
    name = "cache_budget" if cls is KVCacheConfig else "flops_budget"
    budget = kwargs[name]
    if isinstance(budget, list):  # [None], [share] or [lo, hi]; anything else is refused by the config
        kwargs[name] = budget[0] if len(budget) == 1 else tuple(budget)
    if isinstance(kwargs.get("reference_ranks"), list):
        kwargs["reference_ranks"] = tuple(kwargs["reference_ranks"])
    return kwargs
