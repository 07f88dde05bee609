"""Loaders for Lightning: the base every text dataset shares (tokenizing, padding, bucketing,
resumable shuffling) and chapter 6's SMS spam; subclasses only prepare and read their splits."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from spam_lightning.data.source import (
    BUNDLED,
    DEFAULT_URLS,
    DOWNLOAD,
    SOURCE_KEYWORDS,
    DataError,
    checked_path,
    source_sha256,
)
from spam_lightning.data.table import (
    Table,
    load_prepared,
    prepare,
    settings_problems,
    split_settings,
)
from spam_lightning.data.tokens import (
    PAD_TOKEN_ID,
    PADDING_MODES,
    Collator,
    encode_texts,
    resolve_max_length,
)
from spam_lightning.rules import SEED_RANGE, bool_problems, choice_problems, is_int, is_seed

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
_DATASETS = {"train": "train_dataset", "validation": "val_dataset", "test": "test_dataset"}


class TokenDataset(Dataset):
    """One tokenized split; items are ``(token_ids, label, index)``. Plain lists: picklable."""

    def __init__(self, token_ids: list[list[int]], labels: list[int], texts: list[str]) -> None:
        self.token_ids, self.labels, self.texts = token_ids, labels, texts

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, index: int) -> tuple[list[int], int, int]:
        return self.token_ids[index], self.labels[index], index

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]


class LengthGroupedSampler(BatchSampler):
    """``data.bucketing``: ``sampler``'s order (DDP swaps in its own), chunks of
    ``mega_batch_mult * batch_size`` sorted by length and cut into batches, the batch order
    shuffled by ``generator``: every kept example once per epoch, little padding, reproducible."""

    def __init__(self, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool,
                 lengths: Sequence[int], mega_batch_mult: int = 50,
                 generator: torch.Generator | None = None, seed: int = 123) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.lengths, self.mega_batch_mult = [int(n) for n in lengths], mega_batch_mult
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[list[int]]:
        bs, order, batches = self.batch_size, list(self.sampler), []
        if self.drop_last:
            order = order[: len(order) - len(order) % bs]
        chunk = self.mega_batch_mult * bs
        for start in range(0, len(order), chunk):
            group = sorted(order[start : start + chunk], key=self.lengths.__getitem__, reverse=True)
            batches.extend(group[j : j + bs] for j in range(0, len(group), bs))
        for k in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[k]


class BookShuffleSampler(RandomSampler):
    """``DataLoader(shuffle=True)``'s own order (one seed drawn from the global RNG per
    ``iter()``), resumable mid-epoch: a checkpoint records that seed, the examples used and the
    global RNG, and the resumed first ``iter()`` replays the rest with the RNG put back."""

    def __init__(self, data_source: Sized) -> None:
        super().__init__(data_source)
        self.epoch_seed: int | None = None
        self._resume: dict[str, Any] | None = None  # resume_at's state, for the next iter()

    def __iter__(self) -> Iterator[int]:
        resume, self._resume = self._resume, None
        if resume is not None:
            seed, skip = int(resume["seed"]), int(resume["skip"])
            torch.set_rng_state(resume["rng"])
        else:
            seed, skip = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        self.epoch_seed = seed
        generator = torch.Generator().manual_seed(seed)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()[skip:]

    def resume_at(self, state: dict[str, Any]) -> None:
        self._resume = state


def int_problems(**options: tuple[Any, int]) -> list[str]:
    """``data.NAME=value: must be an integer >= low`` for each ``NAME=(value, low)`` that is not."""
    return [f"data.{k}={v!r}: must be an integer >= {low}" for k, (v, low) in options.items()
            if not is_int(v, low)]


def seed_problems(**options: Any) -> list[str]:
    """``data.NAME=value: must be an integer in [0, 2**32 - 1]`` for each seed numpy refuses."""
    return [f"data.{k}={v!r}: must be {SEED_RANGE}" for k, v in options.items() if not is_seed(v)]


def split_problems(split_seed: Any, train_frac: Any, val_frac: Any) -> list[str]:
    """A seed; fractions in (0, 1) summing < 1 (an empty validation or test split breaks eval)."""
    problems: list[str] = []
    allowed = "a number with 0 < value < 1"
    for option, value in (("data.train_frac", train_frac), ("data.val_frac", val_frac)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{option}={value!r}: must be {allowed} (got {type(value).__name__})")
        elif not 0.0 < float(value) < 1.0:  # also rejects nan
            problems.append(f"{option}={value!r}: must be {allowed}")
    if not problems and float(train_frac) + float(val_frac) >= 1.0:
        problems.append(
            f"data.train_frac={train_frac!r} + data.val_frac={val_frac!r} = "
            f"{float(train_frac) + float(val_frac):g}: must be < 1 (the test split gets the rest, "
            f"1 - train_frac - val_frac)"
        )
    return seed_problems(split_seed=split_seed) + problems


class TextClassificationDataModule(L.LightningDataModule):
    """Any labelled text dataset as token batches. Subclasses implement ``prepare_data`` (files,
    once per node) and ``load_splits`` (the three splits, ``class_names``); ``setup`` tokenizes."""

    def __init__(self, data_dir: str = "data", max_length: int | str | None = None,
                 context_length: int = 1024, padding: str = "longest", bucketing: bool = False,
                 batch_size: int = 8, num_workers: int = 0, seed: int = 123,
                 pad_token_id: int = PAD_TOKEN_ID, problems: Sequence[str] = ()) -> None:
        """Every impossible option (and a subclass's ``problems``): one ValueError, before work."""
        super().__init__()
        problems = choice_problems("data.padding", padding, PADDING_MODES) + int_problems(
            batch_size=(batch_size, 1), num_workers=(num_workers, 0),
            context_length=(context_length, 1), pad_token_id=(pad_token_id, 0), seed=(seed, 0),
        ) + bool_problems(**{"data.bucketing": bucketing}) + list(problems)
        if padding == "none" and is_int(batch_size, 2):
            problems.append(f"data.padding=none cannot batch sequences of different lengths, but "
                            f"data.batch_size={batch_size}: use data.batch_size=1 and trainer."
                            f"accumulate_grad_batches={batch_size} for an effective batch of "
                            f"{batch_size}")
        if bucketing and padding != "batch":
            problems.append(f"data.bucketing=true groups examples of similar length, which only "
                            f"saves work with data.padding=batch (got data.padding={padding})")
        self._max_length: int | None = None
        if max_length is not None and is_int(context_length, 1):
            try:
                self._max_length = resolve_max_length(max_length, [], context_length)
            except ValueError as err:
                problems.append(str(err))
        if problems:  # a line each, as validate_config lists them
            raise ValueError("\n  - ".join(problems))
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.max_length_option = max_length
        self.context_length, self.padding, self.bucketing = int(context_length), padding, bucketing
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.seed, self.pad_token_id = int(seed), int(pad_token_id)
        self.class_names: list[str] = []
        # data.bucketing only: one generator for the whole fit, saved in checkpoints. The plain
        # shuffled loader draws from the global torch RNG, as the chapter's does.
        self._train_generator = torch.Generator().manual_seed(self.seed)
        self.train_dataset = self.val_dataset = self.test_dataset = None  # TokenDatasets after setup
        self._book_sampler: BookShuffleSampler | None = None
        self._pending_resume: dict[str, Any] | None = None
        self.tokenizer: Any = None  # None: GPT-2's (tiktoken); else use_tokenizer's
        self._features: dict[str, Dataset] = {}  # split -> what use_features gave

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Before ``setup``: a model's tokenizer (``encode(texts, limit)``) instead of GPT-2's."""
        self.tokenizer = tokenizer
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.context_length = min(self.context_length, int(tokenizer.model_max_length))

    def _encode(self, texts: list[str], limit: int | None) -> list[list[int]]:
        if self.tokenizer is None:
            return encode_texts(texts, max_length=limit)  # GPT-2's
        return self.tokenizer.encode(texts, limit)

    @property
    def num_classes(self) -> int:
        if not self.class_names:
            raise AttributeError("num_classes is known after setup(): the classes come from the "
                                 "data")
        return len(self.class_names)

    @property
    def max_length(self) -> int:
        if self._max_length is None:
            raise AttributeError("max_length is known after setup(): data.max_length=null means the "
                                 "longest training sequence")
        return self._max_length

    def load_splits(self) -> dict[str, Table]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        splits = self.load_splits()
        # an encoder's tokenizer truncates within its special tokens: no longer than it can read
        limit = None if self.tokenizer is None else self.context_length
        raw = {split: self._encode(splits[split].texts, limit) for split in SPLITS}
        max_length = self._resolved_max_length(raw["train"], splits["train"])
        datasets = []
        for split in SPLITS:
            data = splits[split]
            ids = [seq[:max_length] for seq in raw[split]]  # val/test: the train max_length
            if self.tokenizer is not None and any(len(seq) > max_length for seq in raw[split]):
                ids = self._encode(data.texts, max_length)  # cut inside the special tokens
            if (empty := next((i for i, seq in enumerate(ids) if not seq), None)) is not None:
                raise DataError(f"{data.name}, line {data.line(empty)}: empty text")
            datasets.append(TokenDataset(ids, data.labels, data.texts))
        if len(datasets[0]) < self.batch_size:
            raise DataError(f"{splits['train'].name}: {len(datasets[0])} training rows < "
                            f"data.batch_size={self.batch_size}, so drop_last leaves no training "
                            f"batch")
        self._max_length = max_length
        self.train_dataset, self.val_dataset, self.test_dataset = datasets
        logger.info("data: train %d, validation %d, test %d rows; %d classes; max_length %d; "
                    "padding %s", *map(len, datasets), len(self.class_names), max_length,
                    self.padding)

    def _resolved_max_length(self, train_ids: list[list[int]], train: Table) -> int:
        """``data.max_length`` for these training tokens; null with a text longer than the
        context: a DataError naming that text's file and line, the token counts and the fix."""
        try:
            return resolve_max_length(self.max_length_option, train_ids, self.context_length)
        except ValueError as err:
            if self.max_length_option is not None or not train_ids:
                raise DataError(str(err)) from err
            row = max(range(len(train_ids)), key=lambda i: len(train_ids[i]))
            longer = sum(len(ids) > self.context_length for ids in train_ids)
            raise DataError(
                f"{train.name}, line {train.line(row)}: a training text of {len(train_ids[row])} "
                f"tokens ({longer} of {len(train_ids)} are longer than the model's context length "
                f"{self.context_length}); data.max_length=null pads to the longest training "
                f"text. Set data.max_length=model (truncate to {self.context_length} tokens) or "
                f"an integer <= {self.context_length}, or shorten the texts") from err

    def token_dataset(self, split: str) -> TokenDataset:
        """A split's tokens (``train``, ``val``/``validation``, ``test``), after ``setup``."""
        if problems := choice_problems("split", split, _SPLIT_ALIASES):
            raise ValueError(problems[0])
        if (ds := getattr(self, _DATASETS[_SPLIT_ALIASES[split]])) is None:
            raise RuntimeError("call prepare_data() and setup() before asking for dataloaders")
        return ds

    def use_features(self, split: str, features: Dataset) -> None:
        """Serve ``split`` as ``features`` (the frozen trunk's, with its own ``collate``) from now on."""
        self._features[_SPLIT_ALIASES[split]] = features

    def _loader(self, split: str, generator: torch.Generator | None, **kwargs: Any) -> DataLoader:
        ds = self.token_dataset(split)
        features = self._features.get(_SPLIT_ALIASES[split])
        if kwargs.pop("bucketing", False):
            kwargs["batch_sampler"] = LengthGroupedSampler(
                RandomSampler(ds, generator=generator), self.batch_size, drop_last=True,
                lengths=ds.lengths, generator=generator)
        else:
            kwargs["batch_size"] = self.batch_size
        collate_fn = Collator(self.padding, self.max_length, self.pad_token_id)
        return DataLoader(ds if features is None else features, generator=generator,
                          collate_fn=collate_fn if features is None else features.collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          **kwargs)

    def train_dataloader(self) -> DataLoader:
        """The chapter's ``DataLoader(shuffle=True, drop_last=True)``: each ``iter()`` draws from
        the global torch RNG, as in the book (``data.bucketing``: a generator of its own)."""
        if self.bucketing:
            return self._loader("train", self._train_generator, bucketing=True)
        if self._book_sampler is None:
            self._book_sampler = BookShuffleSampler(self.token_dataset("train"))
            if self._pending_resume is not None:
                self._book_sampler.resume_at(self._pending_resume)
                self._pending_resume = None
        return self._loader("train", None, sampler=self._book_sampler, drop_last=True)

    def book_dataloader(self, split: str) -> DataLoader:
        """The chapter's loaders for its evaluations: ``train`` shuffled from the global RNG (the
        book's ``train_loader`` iterated again; the epoch's sampler untouched), others in order."""
        if _SPLIT_ALIASES.get(split) == "train":
            return self._loader("train", None, shuffle=True, drop_last=True)
        return self._loader(split, None, shuffle=False)

    def eval_dataloader(self, split: str) -> DataLoader:
        """Any split in order, nothing dropped; its own generator keeps the global RNG untouched."""
        return self._loader(split, torch.Generator().manual_seed(self.seed), shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def state_dict(self) -> dict[str, Any]:
        """The bucketing generator and, mid-epoch (SIGTERM), the epoch's seed, how far it got and
        the global RNG: a resumed fit continues the same order."""
        state: dict[str, Any] = {"train_generator_state": self._train_generator.get_state(),
                                 "max_length": self._max_length}
        trainer, sampler = getattr(self, "trainer", None), self._book_sampler
        if trainer is not None and sampler is not None and sampler.epoch_seed is not None:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
            if 0 < done < trainer.num_training_batches:  # mid-epoch
                state["book_shuffle"] = {"seed": sampler.epoch_seed, "skip": done * self.batch_size,
                                         "rng": torch.get_rng_state()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_generator_state" in state_dict:
            self._train_generator.set_state(state_dict["train_generator_state"])
        if "book_shuffle" in state_dict and self._book_sampler is not None:
            self._book_sampler.resume_at(state_dict["book_shuffle"])
        elif "book_shuffle" in state_dict:  # for train_dataloader's sampler
            self._pending_resume = state_dict["book_shuffle"]
        saved = state_dict.get("max_length")
        if saved is not None and self._max_length is not None and saved != self._max_length:
            logger.warning("checkpoint was trained with max_length %d, this data gives %d", saved,
                           self._max_length)


class SpamDataModule(TextClassificationDataModule):
    """The UCI SMS Spam Collection, balanced and split as in chapter 6. ``source``: ``bundled``
    (the verified copy in the package), ``download`` (from ``urls``) or a file / the UCI zip;
    ``balance=False``: every message (4,825 ham, 747 spam) split as the chapter splits."""

    def __init__(self, source: str | None = BUNDLED, urls: Sequence[str] = DEFAULT_URLS,
                 data_dir: str = "data/sms_spam", max_length: int | str | None = None,
                 context_length: int = 1024, padding: str = "longest", bucketing: bool = False,
                 batch_size: int = 8, num_workers: int = 0, seed: int = 123,
                 pad_token_id: int = PAD_TOKEN_ID, on_bad_rows: str = "error",
                 split_seed: int = 123, train_frac: float = 0.7, val_frac: float = 0.1,
                 split: str = "chapter", balance: bool = True) -> None:
        urls = [str(u) for u in (urls or ())]  # plain values: hparams go into checkpoints
        source = BUNDLED if source is None else str(source)
        problems = split_problems(split_seed, train_frac, val_frac)
        problems += settings_problems(on_bad_rows, split)
        problems += bool_problems(**{"data.balance": balance})
        if source == DOWNLOAD and not urls:
            problems.append("data.source=download, but data.urls is empty: nothing to download "
                            "from (use data.source=bundled, the default, or a path)")
        super().__init__(data_dir, max_length, context_length, padding, bucketing, batch_size,
                         num_workers, seed, pad_token_id, problems)
        self.settings = split_settings(split_seed, train_frac, val_frac, on_bad_rows, split, balance)
        if source not in SOURCE_KEYWORDS:  # one stat: missing, unreadable, a loop, not a file
            source = str(checked_path("data.source", source, "no such file (expected bundled, "
                                      "download, or the path of an SMSSpamCollection file or the "
                                      "zip holding it)"))
        self.save_hyperparameters()
        self.source, self.urls, self.class_names = source, urls, ["ham", "spam"]
        self.split_options = {"split_seed": int(split_seed), "train_frac": float(train_frac),
                              "val_frac": float(val_frac), "on_bad_rows": on_bad_rows,
                              "split": split, "balance": balance}

    def prepare_data(self) -> None:
        prepare(self.source, self.data_dir, self.urls, **self.split_options)

    def load_splits(self) -> dict[str, Table]:
        """The prepared CSVs, refused unless ``meta.json`` records this source's sha256."""
        source = {"sha256": source_sha256(self.source)}
        tables = load_prepared(self.data_dir, self.settings, source, "data",
                               f"data.source={self.source}", "Text", "Label")
        return {s: replace(t, labels=[int(v) for v in t.labels]) for s, t in tables.items()}
