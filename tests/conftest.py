import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it
# SB3's learn() without a logger makes a folder /tmp/SB3-<time> per call; one folder for the whole session instead
os.environ.setdefault("SB3_LOGDIR", tempfile.mkdtemp(prefix="drrl-tests-sb3-"))

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
"""the repository root"""

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
"""pytest-xdist's workers (README: ``-n auto``), which share the cores"""
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))

SCALE_TOKENS = 512
"""validation tokens an Eq. S scale is fitted on in tests (2048 in use): the same code, a quarter of the one-off cost"""


@pytest.fixture(autouse=True)
def small_scale_fit(monkeypatch):
    from drrl_env.profiles import delta_scale

    monkeypatch.setattr(delta_scale, "SCALE_TOKENS", SCALE_TOKENS)


def tiny_llama(seed: int = 0, vocab_size: int = 128, num_layers: int = 3) -> LlamaForCausalLM:
    """A randomly initialised Llama with GQA (4 query heads over 2 key/value heads, head_dim 16)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 (plain multi-head attention: 4 heads, head_dim 16)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=256)
    return GPT2LMHeadModel(config).eval().requires_grad_(False)


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    return TINY_MODELS[request.param]()


@pytest.fixture(scope="session")
def default_model():
    from drrl_env.lm.models import load_causal_lm

    return load_causal_lm()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (GQA, head_dim 16, 2 layers) saved with SmolLM2's tokenizer, as a local model."""
    from transformers import AutoTokenizer

    from drrl_env.lm.models import default_model_path

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab_size=49152, num_layers=2).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(path)
    return str(path)


PAPER_MDP = dict(flops_budget=None, reward="eq13", guardrail="eq9", eps0=0.5)
"""The paper's MDP (no budget, the per-step Eq. 13 reward, the Eq. 9 guardrail): what the greedy oracle scores.
DRRL-Attention-Paper-v0 is this with separate spectra, one rank per layer and no signal (LAYER_MDP)."""
LAYER_MDP = dict(
    per_head=False,
    spectral_mode="separate",
    guardrail="exact",
    kl_shaping_weight=1.0,
    sensitivity_samples=0,
    sensitivity_estimate="fisher",
)
"""One rank per layer, separate spectra, the exact guardrail, shaped KL reward, no signal: the env most mechanics
tests are written in (EnvConfig's defaults before the recommended MDP became the default)."""


def layer_mdp(**kwargs):
    """``gym.make`` keywords of LAYER_MDP with ``kwargs`` over them."""
    return {**LAYER_MDP, **kwargs}


TINY_SIZES = dict(ranks=(4, 8, 12, 16), seq_len=32, batch_size=2)
"""a registered id shrunk to the tiny models (head_dim 16)"""


@pytest.fixture
def tiny_env_kwargs(tiny_model_dir):
    return dict(model=tiny_model_dir, **TINY_SIZES, **LAYER_MDP)


def sharpen_first_layer(model):
    """Scale layer 0's W_Q and W_K of a Llama by 8 (in place): sharp attention there, so low ranks cost something."""
    attention = model.model.layers[0].self_attn
    attention.q_proj.weight.data.mul_(8.0)
    attention.k_proj.weight.data.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def tiny_layered_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama of ``tiny_model_dir`` with layer 0's W_Q, W_K scaled by 8: sharp attention there, flat in layer 1.

    A random tiny model attends almost uniformly, so every rank is as good as another; here the
    best rank depends on the layer and the segment, which a policy can learn from the state.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-layered")
    model = sharpen_first_layer(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)
