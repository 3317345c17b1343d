"""The leaderboard: one protocol for every entry, a folder per entry, the ranked table regenerated from them."""

import csv

import pytest

from agents import leaderboard
from agents.leaderboard import FIELDS, Protocol, entry_name, read_entries, run_entry, write_entry, write_leaderboard


@pytest.fixture
def tiny_protocol(tiny_layered_model_dir):
    overrides = dict(model=tiny_layered_model_dir, ranks=(4, 8, 12, 16), seq_len=32)
    return Protocol(corpora=("wiki",), budgets=(0.625, 0.5), episodes=1, overrides=overrides)


@pytest.mark.expensive
def test_entries_are_ranked_by_the_headroom_they_capture(tiny_protocol, tmp_path):
    for spec in ("uniform", "hindsight:fisher:2", "fixed:8"):
        records = run_entry(spec, tiny_protocol)
        assert [(r["task"], r["budget"]) for r in records] == [
            ("per-head", 0.625), ("per-head", 0.5), ("per-layer", 0.625), ("per-layer", 0.5)
        ]  # fmt: skip
        write_entry(tmp_path / entry_name(spec), records, f"python -m agents.leaderboard {spec}")
    with open(tmp_path / "uniform" / "results.csv", newline="") as handle:
        assert tuple(csv.DictReader(handle).fieldnames) == FIELDS
    assert "```bash\npython -m agents.leaderboard uniform\n```" in (tmp_path / "uniform" / "README.md").read_text()
    entries = read_entries(tmp_path)
    assert sorted(entries) == ["fixed-8", "hindsight-fisher-2", "uniform"]
    table = write_leaderboard(tmp_path).read_text()
    per_head = table.split("### per-head")[1].split("###")[0]
    rows = [line for line in per_head.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    names = [row.split("|")[2].strip() for row in rows]
    kl = {e: [r["kl"] for r in entries[e] if r["task"] == "per-head"] for e in entries}
    if all(h < u for h, u in zip(kl["hindsight-fisher-2"], kl["uniform"], strict=True)):
        assert names[0].startswith("[hindsight-fisher-2]") and "| 1.00 |" in rows[0]  # the ceiling captures it all
        assert "| 0.00 |" in rows[names.index("[uniform](uniform/README.md)")]  # the bar captures none


def test_entry_names_are_short_and_stable():
    assert entry_name("static:fisher") == "static-fisher"
    assert entry_name("runs/DRRL-Attention-v0__maskable_ppo__0__17/model.safetensors") == (
        "DRRL-Attention-v0__maskable_ppo__0__17"
    )
    assert entry_name("agents/bc.safetensors") == "bc"


@pytest.mark.parametrize(
    "argv, message",
    [([], "give policy specs"), (["uniform", "random", "--name", "x"], "--name names one entry"),
     (["fixed:abc"], "fixed")],
)  # fmt: skip
def test_bad_command_lines_get_one_line_before_any_work(argv, message, tmp_path, capsys):
    assert leaderboard.main([*argv, "--out", str(tmp_path / "board")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and message in error and "\n" not in error


@pytest.mark.expensive
def test_the_key_cache_task_ranks_its_entries_beside_the_prefill_tasks(tiny_layered_model_dir, tmp_path):
    from agents.leaderboard import run_kv_entries

    kv = dict(model=tiny_layered_model_dir, context=48, observe_tokens=8, horizon=8, ranks=(4, 8, 12, 16),
              recent_tokens=4)  # fmt: skip
    protocol = Protocol(corpora=("wiki",), kv_budgets=(0.75, 0.6), kv_prompts=2, kv_overrides=kv)
    specs = ("uniform", "static", "self_profile", "hindsight")
    records = run_kv_entries(specs, protocol)
    assert [(r["task"], r["budget"]) for r in records["static"]] == [("key-cache", 0.75), ("key-cache", 0.6)]
    prefill = {name: float("nan") for name in FIELDS} | {"task": "per-head", "corpus": "wiki", "budget": 0.5, "kl": 1.0}
    write_entry(tmp_path / "uniform", [prefill], "python -m agents.leaderboard uniform")  # a prefill task's cell
    for spec in specs:
        write_entry(tmp_path / spec, records[spec], f"python -m agents.leaderboard {spec} --tasks key-cache")
    entries = read_entries(tmp_path)
    assert {r["task"] for r in entries["uniform"]} == {"per-head", "key-cache"}  # the other task's cells kept
    table = write_leaderboard(tmp_path).read_text()
    section = table.split("### key-cache")[1].split("###")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert len(rows) == 4 and any("- (ceiling)" in row for row in rows if "[hindsight]" in row)
    assert "### per-head" in table and "[uniform]" in table.split("### per-head")[1].split("###")[0]
