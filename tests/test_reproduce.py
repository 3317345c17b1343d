"""scripts/reproduce_results.sh still speaks the commands' language: every command it runs parses."""

import os
import shlex
import subprocess

import pytest

from drrl_env.config import EnvConfig
from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "reproduce_results.sh"


def dry_run() -> list[list[str]]:
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "DRY_RUN": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines() if line.startswith("python")]


COMMANDS = dry_run()


def test_the_script_runs_every_stage():
    assert len(COMMANDS) >= 15 and any(argv[1] == "train_agent.py" for argv in COMMANDS)


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(argv[:4]) for argv in COMMANDS])
def test_each_command_of_the_script_parses_into_a_valid_env(argv):
    if argv[1] == "train_agent.py":
        from train_agent import parse_options

        EnvConfig(**parse_options(argv[2:]).env)
    elif argv[1:3] == ["-m", "agents.evaluate"]:
        from agents.evaluate import parse_plan

        plan, base = parse_plan(argv[3:])
        EnvConfig(**{**base, "flops_budget": (plan.budgets or [base["flops_budget"]])[0]})
    elif argv[1:3] == ["-m", "oracle"]:
        from oracle.__main__ import build_parser

        build_parser(argv[3:]).parse_args(argv[3:])
    elif argv[1:3] == ["-m", "agents.bc"]:
        from agents.bc import build_parser

        build_parser().parse_args(argv[3:])
    else:
        pytest.fail(f"a command the test does not know: {argv[:3]}")
