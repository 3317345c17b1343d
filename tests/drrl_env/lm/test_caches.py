"""A cache entry that is truncated or invalid is named, deleted and rebuilt, never a raw error on every run."""

import numpy as np
import pytest
import torch

from drrl_env.lm.files import read_cache_entry


def test_a_truncated_or_invalid_entry_is_named_deleted_and_rebuilt(tmp_path, capsys):
    from drrl_env.profiles.delta_scale import _load_scale

    good = tmp_path / "scale.npy"
    np.save(good, np.ones((2, 3)))
    assert read_cache_entry(good, _load_scale, "Eq. S scale").shape == (2, 3)
    truncated = tmp_path / "cut.npy"
    truncated.write_bytes(good.read_bytes()[:40])
    nan = tmp_path / "nan.npy"
    np.save(nan, np.array([[np.nan, 1.0]]))
    for path in (truncated, nan):
        assert read_cache_entry(path, _load_scale, "Eq. S scale") is None
        assert str(path) in capsys.readouterr().err and not path.exists()  # named, deleted: the caller rebuilds
    assert read_cache_entry(tmp_path / "absent.npy", _load_scale, "Eq. S scale") is None


def test_calibration_grams_and_profiles_validate_what_they_read(tmp_path):
    from safetensors.torch import save_file

    from drrl_env.profiles.calibration import _load_grams
    from drrl_env.profiles.validation import _load_profile

    save_file({"query": torch.ones(1, 2, 4, 4), "key": torch.full((1, 2, 4, 4), float("inf"))}, tmp_path / "g.st")
    with pytest.raises(ValueError, match="finite"):
        _load_grams(tmp_path / "g.st")
    (tmp_path / "p.json").write_text('{"key": {}, "cost": [[0.1, NaN]], "head_dim": 64}')
    with pytest.raises(ValueError, match="finite"):
        _load_profile(tmp_path / "p.json")
    (tmp_path / "cut.json").write_text('{"key": {}, "cost": [[0.1, ')
    with pytest.raises(ValueError):
        _load_profile(tmp_path / "cut.json")


def test_the_cache_follows_links_except_into_the_project(tmp_path, monkeypatch):
    from drrl_env.lm.models import PROJECT_ROOT, cache_dir

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "ok").symlink_to(elsewhere)
    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path / "ok"))
    assert cache_dir() == tmp_path / "ok"
    (tmp_path / "bad").symlink_to(PROJECT_ROOT / "drrl_env")
    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="is a link into the project"):
        cache_dir()
