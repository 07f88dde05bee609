"""The classification head (chapter 6.5), the `trainable` and `token` options, and LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llms_from_scratch import appendix_e as book_appendix_e
from omegaconf import OmegaConf
from torch import nn

from spam_lightning.model.classifier import (
    TRAINABLE,
    ClassifierStateError,
    first_trainable_block,
    load_classifier_state,
    make_classifier,
)
from spam_lightning.model.gpt import MODEL_CONFIGS, GPTModel
from spam_lightning.model.lora import (
    LinearWithLoRA,
    LoRALayer,
    merge_lora,
    replace_linear_with_lora,
)
from spam_lightning.model.pooling import POOLINGS, get_pooling

REPO = Path(__file__).resolve().parents[2]
TINY = MODEL_CONFIGS["gpt2-tiny"]
PAD = 50256
IDS = torch.tensor([[5211, 345, 423, 640]])


def tiny(n_layers: int = 2, **cfg: object) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel({**TINY, "n_layers": n_layers, **cfg})


def classifier(trainable: str = "last_block", **cfg: object) -> GPTModel:
    return make_classifier(tiny(**cfg), num_classes=2, trainable=trainable).eval()


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_head_swap_gives_two_logits_per_token() -> None:
    model = classifier()
    with torch.no_grad():
        assert model(IDS).shape == (1, 4, 2)
    assert model.out_head.bias is not None  # as the book's nn.Linear(emb_dim, num_classes)


def test_head_is_seeded_after_freezing() -> None:
    """Book order: freeze, torch.manual_seed(123), new head; the head is the same every run."""
    model = make_classifier(tiny(), num_classes=3, seed=123)
    torch.manual_seed(123)
    reference = nn.Linear(64, 3)
    assert torch.equal(model.out_head.weight, reference.weight)
    assert torch.equal(model.out_head.bias, reference.bias)


def _block(i: int) -> set[str]:
    return {name for name, _ in tiny().named_parameters() if name.startswith(f"trf_blocks.{i}.")}


HEAD = {"out_head.weight", "out_head.bias"}
NORM = {"final_norm.scale", "final_norm.shift"}


@pytest.mark.parametrize(
    ("trainable", "expected"),
    [
        ("last_layer", HEAD),
        ("last_block", _block(1) | NORM | HEAD),
        ("last_two_blocks", _block(0) | _block(1) | NORM | HEAD),
    ],
)
def test_exactly_the_expected_parameters_train(trainable: str, expected: set[str]) -> None:
    assert trainable_names(classifier(trainable)) == expected


def test_all_trains_everything() -> None:
    model = classifier("all")
    assert trainable_names(model) == {name for name, _ in model.named_parameters()}
    assert "tok_emb.weight" in trainable_names(model)


def test_lora_trains_only_adapters_and_the_new_head() -> None:
    model = classifier("lora")
    wrapped = [m for m in model.modules() if isinstance(m, LinearWithLoRA)]
    assert len(wrapped) == 2 * 6 + 1  # every Linear of both blocks, and the head
    assert not any(
        type(m) is nn.Linear for m in model.modules() if m not in {w.linear for w in wrapped}
    )
    adapters = {name for name, _ in model.named_parameters() if ".lora." in name}
    assert len(adapters) == 2 * len(wrapped)
    assert trainable_names(model) == adapters | {"out_head.linear.weight", "out_head.linear.bias"}


def test_last_layer_trunk_is_all_blocks() -> None:
    assert [first_trainable_block(t, 12) for t in TRAINABLE] == [12, 11, 10, None, None]


def test_trainable_errors() -> None:
    with pytest.raises(ValueError, match="last_layer, last_block, last_two_blocks, all, lora"):
        make_classifier(tiny(), trainable="last_three_blocks")
    with pytest.raises(ValueError, match="last_two_blocks needs >= 2 transformer blocks, got 1"):
        make_classifier(tiny(n_layers=1), trainable="last_two_blocks")
    with pytest.raises(ValueError, match="last_two_blocks"):
        first_trainable_block("last_two_blocks", 1)


def test_config_groups_match_the_options() -> None:
    for name in TRAINABLE:
        assert OmegaConf.load(REPO / f"conf/trainable/{name}.yaml").name == name
    lora = OmegaConf.load(REPO / "conf/trainable/lora.yaml")
    assert (lora.rank, lora.alpha) == (16, 16)
    for name, cls in POOLINGS.items():
        token = OmegaConf.load(REPO / f"conf/token/{name}.yaml")
        assert token.name == name and type(get_pooling(token)) is cls


# ----------------------------------------------------------------------------- pooling
def pool_logits(logits: torch.Tensor, lengths: torch.Tensor | None, token: str) -> torch.Tensor:
    if lengths is None:
        lengths = torch.full((logits.shape[0],), logits.shape[1])
    return get_pooling(token)(logits, lengths)



def test_pool_logits_positions() -> None:
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    lengths = torch.tensor([2, 4])
    assert torch.equal(pool_logits(logits, lengths, "last"), logits[:, -1])
    assert torch.equal(pool_logits(logits, lengths, "first"), logits[:, 0])
    assert torch.equal(
        pool_logits(logits, lengths, "flexible"), torch.stack([logits[0, 1], logits[1, 3]])
    )
    masked = torch.stack([logits[0, :2].mean(0), logits[1].mean(0)])
    assert torch.allclose(pool_logits(logits, lengths, "masked_mean"), masked)
    assert torch.allclose(pool_logits(logits, None, "masked_mean"), logits.mean(1))
    # the book's mean: every position, padding included, whatever the lengths
    assert torch.equal(pool_logits(logits, lengths, "mean"), logits.mean(1))
    assert torch.equal(pool_logits(logits, None, "mean"), logits.mean(1))
    with pytest.raises(ValueError, match="last, first, flexible, mean, masked_mean"):
        pool_logits(logits, lengths, "middle")


def padded(ids: list[int], length: int) -> torch.Tensor:
    return torch.tensor([ids + [PAD] * (length - len(ids))])


@pytest.mark.parametrize("token", ["flexible", "masked_mean"])
def test_padding_does_not_change_flexible_or_masked_mean(token: str) -> None:
    """A causal model's real tokens never see the right padding, and both options read only
    the real positions: the pooled logits are the same whatever the padded length."""
    model = classifier()
    ids = [5211, 345, 423, 640, 11]
    lengths = torch.tensor([len(ids)])
    with torch.no_grad():
        pooled = [pool_logits(model(padded(ids, n)), lengths, token) for n in (5, 8, 20, 64)]
        batch = torch.cat([padded(ids, 9), padded(ids[:3], 9)])
        both = pool_logits(model(batch), torch.tensor([5, 3]), token)
        alone = pool_logits(model(padded(ids[:3], 3)), torch.tensor([3]), token)
    for other in pooled[1:]:
        assert torch.allclose(other, pooled[0], atol=1e-5)
    assert torch.allclose(both, torch.cat([pooled[0], alone]), atol=1e-5)
    # whereas the chapter's `last` and the book's `mean` read padding positions
    for other in ("last", "mean"):
        with torch.no_grad():
            out = [pool_logits(model(padded(ids, n)), lengths, other) for n in (5, 8)]
        assert not torch.allclose(out[0], out[1], atol=1e-5), other


def test_masked_mean_ignores_pads() -> None:
    logits = torch.randn(1, 6, 2)
    changed = logits.clone()
    changed[:, 3:] = 1000.0  # garbage at the padding positions
    lengths = torch.tensor([3])
    assert torch.allclose(pool_logits(changed, lengths, "masked_mean"), logits[:, :3].mean(1))
    assert torch.allclose(pool_logits(changed, lengths, "mean"), changed.mean(1))


# ----------------------------------------------------------------------------- LoRA


def test_lora_layer_is_the_books() -> None:
    torch.manual_seed(0)
    layer = LoRALayer(64, 32, rank=8, alpha=4)
    torch.manual_seed(0)
    book = book_appendix_e.LoRALayer(64, 32, rank=8, alpha=4)
    assert layer.A.shape == (64, 8) and layer.B.shape == (8, 32)
    assert torch.equal(layer.A, book.A) and torch.equal(layer.B, torch.zeros(8, 32))  # its init
    with torch.no_grad():
        layer.B.normal_()
    book.load_state_dict(layer.state_dict())
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x), book(x)) and layer.alpha == book.alpha


def test_lora_starts_equal_to_the_base_model() -> None:
    base = classifier("last_block")
    lora = classifier("lora")
    with torch.no_grad():
        assert torch.equal(lora(IDS), base(IDS))
    replace_linear_with_lora(lora, rank=4, alpha=1)  # idempotent: no adapters on adapters
    assert sum(isinstance(m, LinearWithLoRA) for m in lora.modules()) == 13


def test_lora_training_moves_only_adapters_and_head() -> None:
    model = classifier("lora").train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # B moves on step 1; A gets a gradient once B is non-zero
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(IDS)[:, -1], torch.tensor([1]))
        loss.backward()
        optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable_names(model)


def test_merged_lora_equals_unmerged() -> None:
    model = classifier("lora")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALayer):
                module.B.normal_(0, 0.01)
        ids = torch.randint(0, 50257, (2, 7))
        unmerged = model(ids)
        merged_model = merge_lora(model)
        merged = merged_model(ids)
    assert merged_model is model
    assert not any(isinstance(m, (LinearWithLoRA, LoRALayer)) for m in model.modules())
    assert not any(".lora." in name for name in model.state_dict())
    assert (merged - unmerged).abs().max() <= 1e-5
    assert not torch.allclose(unmerged, classifier("last_block")(ids), atol=1e-3)  # B mattered


def lora_ranks_and_alphas(model: nn.Module) -> set[tuple[int, float]]:
    return {(m.A.shape[1], m.alpha) for m in model.modules() if isinstance(m, LoRALayer)}


def test_configured_lora_rank_and_alpha_are_the_ones_built(tmp_path: Path) -> None:
    """`trainable=lora trainable.rank=R trainable.alpha=A` builds adapters of rank R, scale A
    (issue 11: the rank used to fall back to 16 when it was 0)."""
    from _compose import compose_train

    from spam_lightning.model.gpt2 import build_model

    for rank, alpha in ((1, 0.5), (3, 8)):
        cfg = compose_train(
            ["model=gpt2-tiny", "trainable=lora", f"trainable.rank={rank}", f"trainable.alpha={alpha}"],
            tmp_path,
        )
        model = build_model(cfg, num_classes=2)
        assert lora_ranks_and_alphas(model) == {(rank, alpha)}
        assert sum(isinstance(m, LinearWithLoRA) for m in model.modules()) == 13


@pytest.mark.parametrize(
    ("rank", "alpha", "message"),
    [
        (0, 16, "LoRA rank must be an integer >= 1, got 0"),
        (-4, 16, "LoRA rank must be an integer >= 1, got -4"),
        (None, 16, "LoRA rank must be an integer >= 1, got None"),
        (2.5, 16, "LoRA rank must be an integer >= 1, got 2.5"),
        (4, 0, "LoRA alpha must be a finite number > 0, got 0"),
        (4, None, "LoRA alpha must be a finite number > 0, got None"),
    ],
)
def test_lora_rank_and_alpha_are_never_replaced_by_a_default(rank, alpha, message) -> None:
    with pytest.raises(ValueError, match=message):
        make_classifier(tiny(), trainable="lora", rank=rank, alpha=alpha)
    with pytest.raises(ValueError, match=message):
        LoRALayer(8, 8, rank=rank, alpha=alpha)


def test_rank_zero_is_refused_in_preflight(tmp_path: Path, sms_file: Path, monkeypatch) -> None:
    from _compose import compose_train

    from spam_lightning.train import train
    from spam_lightning.training.checks import ConfigError

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the configuration error")

    monkeypatch.setattr("spam_lightning.model.gpt2.build_gpt", no_model)
    cfg = compose_train(
        ["model=gpt2-tiny", "trainable=lora", "trainable.rank=0", f"data.source={sms_file}"],
        tmp_path,
    )
    with pytest.raises(ConfigError, match=r"trainable.rank=0: must be an integer >= 1 for trainable=lora"):
        train(cfg)
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- fine-tuned state


def test_load_classifier_state_round_trip() -> None:
    source = classifier("lora")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)
    target = classifier("lora")
    load_classifier_state(target, source.state_dict())
    for a, b in zip(target.state_dict().values(), source.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_wrong_class_count_or_size_is_named() -> None:
    three = make_classifier(tiny(), num_classes=3).state_dict()
    with pytest.raises(ClassifierStateError) as err:
        load_classifier_state(classifier(), three)
    assert "it has 3 classes, the model has 2" in str(err.value)
    assert "out_head.weight expected [2, 64] found [3, 64]" in str(err.value)

    wider = make_classifier(tiny(emb_dim=128, n_layers=1), num_classes=2).state_dict()
    with pytest.raises(ClassifierStateError) as err:
        load_classifier_state(classifier(), wider)
    message = str(err.value)
    assert "its emb_dim is 128, the model's is 64" in message
    assert "it has 1 transformer blocks, the model has 2" in message
    assert "missing (16): trf_blocks.1." in message
    assert "tok_emb.weight expected [50257, 64] found [50257, 128]" in message
