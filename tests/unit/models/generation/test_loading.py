"""Which names are local directories, and a missing one is an error naming its key."""

from __future__ import annotations

import pytest

from nemo_rl.models.generation.loading import is_local_path, load_generation_model


def test_local_paths_and_hub_ids_are_told_apart(tmp_path):
    assert is_local_path("results/sft_tiny/step_150/hf")  # more than one "/"
    assert is_local_path("./model") and is_local_path("/abs/model")
    assert is_local_path(str(tmp_path))
    assert not is_local_path("meta-llama/Llama-3.2-1B")  # a Hub id, not on disk


def test_a_missing_directory_names_the_callers_key(tmp_path):
    names = {"checkpoint": "generation.model_name", "base_model": "generation.base_model"}
    with pytest.raises(FileNotFoundError, match=r"generation.model_name .*nowhere: no such directory"):
        load_generation_model(str(tmp_path / "nowhere"), names=names)
