"""python -m jobs.select_heads: a head set JSON chosen on calibration questions, tied to the model."""

from __future__ import annotations

import pytest

from memorag_core.errors import InvalidInputError


def test_select_heads_writes_a_head_set_for_the_model(tiny_lm_dir, shared_data_dir, tmp_path):
    from jobs.select_heads import main, parse_range
    from memorag_core.models import LoadOptions, load_causal_lm
    from memorag_core.retrieval.rerank import HeadSet

    lines = (shared_data_dir / "hotpotqa_dev_300.jsonl").read_text().splitlines()[:2]
    data = tmp_path / "dev.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "heads" / "tiny.json"
    main(["--dataset", str(data), "--questions", "1-2", "--model", str(tiny_lm_dir), "--count", "3",
          "--out", str(out)])
    hs = HeadSet.load(out)
    assert len(hs.heads) == 3 and hs.meta["calibration"] == "1-2" and hs.meta["questions"] == 2
    assert len(hs.meta["recall_alone"]) == 3
    model, _ = load_causal_lm(str(tiny_lm_dir), LoadOptions(device="cpu"))
    hs.check(model)
    assert parse_range("1-100") == (0, 100)
    with pytest.raises(InvalidInputError, match="1-100"):
        parse_range("100")
