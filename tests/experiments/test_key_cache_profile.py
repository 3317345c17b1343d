"""experiments/key_cache_profile.py on a tiny Llama: the decode-regime profile, its allocation and the comparison."""

import ast

import numpy as np
import torch

from drrl_env.generation.decode import generate, teacher_forced_logits
from drrl_env.lm.models import load_causal_lm
from drrl_env.lm.scoring import next_token_kl
from experiments import key_cache_profile


def test_continuation_kl_is_zero_at_full_width_and_grows_as_ranks_fall(tiny_layered_model_dir):
    loaded = load_causal_lm(tiny_layered_model_dir, device="cpu")  # sharp attention in layer 0
    prompt = torch.randint(0, 1000, (1, 160), generator=torch.Generator().manual_seed(0))  # beyond the 64-key window
    full, wide, narrow = key_cache_profile.continuation_kl(loaded, prompt, 8, ["full", 12, 2])
    assert full == 0.0 and 0 <= wide < narrow
    continuation = generate(loaded, prompt, "full", max_new_tokens=8, do_sample=False)[:, 160:]
    reference = teacher_forced_logits(loaded, prompt, continuation, "full")
    expected = next_token_kl(reference, teacher_forced_logits(loaded, prompt, continuation, 2))
    assert np.isclose(narrow, expected)


def test_script_prints_profile_allocation_and_comparison(tiny_model_dir, capsys):
    key_cache_profile.main(
        ["--model", tiny_model_dir, "--profile-context", "100", "--profile-tokens", "4", "--ranks", "4", "8", "12",
         "--mean-rank", "8", "--context", "100", "--prompts", "1", "--tokens", "4", "--hindsight",
         "--self-profile", "2", "--blend", "0.5"]
    )  # fmt: skip
    out = capsys.readouterr().out
    allocation = ast.literal_eval(out.split("allocation: ")[1].split(" mean")[0])  # a printed Python list
    assert len(allocation) == 2 and np.mean(allocation) <= 8 and set(allocation) <= {4, 8, 12, 16}
    assert "uniform 8:" in out and "allocated, profile at 100:" in out
    assert "hindsight (each prompt's own profile):" in out and "self-profile (each prompt's first 2" in out
    assert "blend 0.5 x validation + 0.5 x self-profile:" in out
