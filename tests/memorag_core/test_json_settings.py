"""read_json_object: the one reader of JSON settings arguments (--config, --plan, --storage-options)."""

import pytest

from memorag_core.errors import InvalidInputError, read_json_object
from memorag_core.retrieval.queries import load_plan_config


def test_a_settings_file_or_inline_object_is_read_and_every_failure_names_the_flag(tmp_path):
    good = tmp_path / "plan.json"
    good.write_text('{"rerank_candidates": 30}')
    assert read_json_object(good, "--plan") == {"rerank_candidates": 30}
    assert read_json_object('{"a": 1}', "--plan", inline=True) == {"a": 1}
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "bad.json").write_text("{oops")
    cases = [(tmp_path / "missing.json", "No such file"), (tmp_path / "list.json", "expected a JSON object, got list"),
             (tmp_path / "bad.json", "cannot read a JSON object")]
    for path, cause in cases:
        with pytest.raises(InvalidInputError, match=f"--plan.*{cause}"):
            read_json_object(path, "--plan")
    with pytest.raises(InvalidInputError, match="--config"):
        read_json_object('{"a": 1}', "--config")  # not inline: a path that does not exist
    assert load_plan_config(str(good)).rerank_candidates == 30
    assert load_plan_config('{"prf_alpha": 0.5}').prf_alpha == 0.5  # `ask --plan` takes an object inline too
    with pytest.raises(InvalidInputError, match="retrieval plan settings"):
        load_plan_config(str(tmp_path / "list.json"))
