import pytest
import torch

from dmsae_ray.config import ConfigError, DataConfig
from dmsae_ray.model.data import iter_texts, load_token_data, valid_mask


def test_blocks_have_fixed_length_bos_and_disjoint_holdout(tiny_dir, tiny_lm):
    _, tok = tiny_lm
    cfg = DataConfig(
        dataset=str(tiny_dir["corpus"]),
        context_length=32,
        attribution_sequences=3,
        eval_sequences=2,
    )
    data = load_token_data(cfg, tok)
    assert data.attribution.shape == (3, 32) and data.eval.shape == (2, 32)
    assert (data.attribution[:, 0] == tok.bos_token_id).all()
    train = list(data.train_blocks())
    assert len(train) > 10 and all(b.shape == (32,) and b[0] == tok.bos_token_id for b in train)
    held = {tuple(b.tolist()) for b in torch.cat([data.attribution, data.eval])}
    assert not held & {tuple(b.tolist()) for b in train}
    # the same held-out tokens every time (every cycle scores the same set)
    again = load_token_data(cfg, tok)
    assert torch.equal(again.attribution, data.attribution)
    mask = valid_mask(data.attribution, data.specials)
    assert not mask[:, 0].any() and mask.float().mean() > 0.8


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["third"]}), tmp_path / "b.parquet")
    texts = list(iter_texts(DataConfig(dataset=str(tmp_path / "a.txt"))))
    assert texts == ["first doc", "second doc"]
    assert list(iter_texts(DataConfig(dataset=str(tmp_path / "b.parquet"), text_field="body"))) == [
        "third"
    ]
    with pytest.raises(ConfigError, match="data.text_field"):
        list(iter_texts(DataConfig(dataset=str(tmp_path / "b.parquet"))))


def test_missing_or_too_small_dataset_is_a_clear_error(tmp_path, tiny_lm):
    _, tok = tiny_lm
    with pytest.raises(FileNotFoundError, match="data.dataset"):
        list(iter_texts(DataConfig(dataset=str(tmp_path / "nope.jsonl"))))
    small = tmp_path / "small.txt"
    small.write_text("just a few words")
    with pytest.raises(ConfigError, match="gives only 0 blocks"):
        load_token_data(DataConfig(dataset=str(small), context_length=64), tok)
