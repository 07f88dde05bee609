"""Data: the SMS Spam Collection (chapter 6), any text-classification CSV and IMDB as token
batches. Names load lazily: ``.tokens`` (inference) and ``.table`` never import Lightning."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "datamodule": ["SpamDataModule", "TextClassificationDataModule", "TokenDataset",
                   "LengthGroupedSampler"],
    "csv_data": ["CSVDataModule", "IMDBDataModule", "IMDB_URLS", "prepare_imdb"],
    "source": ["DEFAULT_URLS", "DataError", "DownloadError", "EXPECTED_SHA256", "EXPECTED_SIZE"],
    "table": ["prepare", "read_table", "read_split_csv", "read_text_table"],
    "tokens": ["PAD_TOKEN_ID", "PADDING_MODES", "Collator", "collate", "encode_texts",
               "get_tokenizer", "resolve_max_length"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if (module := _MODULE_OF.get(name)) is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    return value
