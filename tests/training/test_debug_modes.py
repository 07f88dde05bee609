"""Issue 24 item 15: the debug modes cost what their batches cost. `debug=fdr` on gpt2-small took
368 s, almost all of it the frozen-trunk cache of every training, validation and test example;
`debug=overfit` evaluated every split in full at the end. Measured here as the rows that pass
through the frozen trunk (the embedding), and the rows of the final evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
from _compose import compose_train

from spam_lightning.model.gpt import GPTModel

BATCH = 8  # data.batch_size of the SMS config
SMOKE = ["model=gpt2-tiny", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# mode -> (its smoke suffix, batches of each split the final evaluation reads, most batches that
# may pass through the frozen trunk in all: the loops', the chapter monitor's and the final ones)
MODES = {"fdr": ([], 1, 10), "limit": ([], 2, 25), "overfit": (["trainer.max_epochs=1"], 3, 25)}


@pytest.mark.parametrize("mode", [pytest.param(m, marks=[pytest.mark.slow] if m != "fdr" else [])
                                  for m in MODES])  # each about 10 s
def test_debug_modes_read_only_their_batches(
    mode: str, tmp_path: Path, sms_file: Path, tiny_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spam_lightning.train import train

    rows = []
    embed = GPTModel.embed

    def counted(self, in_idx):
        rows.append(in_idx.shape[0])
        return embed(self, in_idx)

    monkeypatch.setattr(GPTModel, "embed", counted)
    extra, final_batches, most = MODES[mode]
    cfg = compose_train([*SMOKE, f"debug={mode}", f"data.source={sms_file}",
                         f"paths.data_dir={tiny_data_dir}", *extra], tmp_path)
    metrics = train(cfg)
    # the final evaluation: its batches of each split, not the 1,045 / 149 / 300 examples
    assert [metrics[f"{s}_count"] for s in ("train", "val", "test")] == [final_batches * BATCH] * 3
    # the frozen trunk ran over the batches the loops read, not over every example (1,494)
    assert metrics["trunk_cache"] is False
    assert sum(rows) <= most * BATCH, (sum(rows), len(rows))
