"""Parity with TRL 1.16: TRL's own loss code and ours on the same tiny model, tokenizer and batch.

The world: a word-level tokenizer trained here on a few sentences, and two tiny
``LlamaForCausalLM`` (hidden 32, 2 layers, vocab 300) with different seeds as policy and
reference. TRL collates the batch and computes its loss through the trainer's own
``compute_loss`` / ``get_batch_loss_metrics``; we compute the sequence logps with a plain forward
pass of untouched copies of the same models (TRL patches the models it is given with its fused
LM head) and feed them to our pure functions.

TRL reports only the batch mean, so each loss is compared per pair (TRL run on each pair alone)
and on the whole batch. Where we deliberately differ from TRL the test says so and checks the
paper's formula instead (cDPO label smoothing, ORPO's NLL, the token-mean NLL).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from posttrain.losses.kto import kl_completion_order, kto_kl_baseline, kto_loss
from posttrain.losses.preference import (
    PreferenceLogps,
    combine_losses,
    cpo_loss,
    dpo_loss,
    orpo_loss,
    sft_loss,
    simpo_loss,
)

TOLERANCE = 1e-5
RELATIVE_TOLERANCE = 1e-6
BETA = 0.3  # not TRL's default 0.1, so a dropped beta would show

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "is the sky blue",
    "yes it is blue today",
    "no it is grey",
    "what is two plus two",
    "four of course",
    "five maybe",
    "tell me a story",
    "once upon a time there was a fox",
]
PAIRS = [
    {"prompt": "is the sky blue", "chosen": " yes it is blue today", "rejected": " no"},
    {"prompt": "what is two plus two", "chosen": " four", "rejected": " five maybe it is"},
    {"prompt": "tell me a story", "chosen": " once upon a time there was a fox", "rejected": " the cat sat"},
    {"prompt": "the dog", "chosen": " ran in the park", "rejected": " sat on the mat today"},
]
UNPAIRED = [
    {"prompt": "is the sky blue", "completion": " yes it is blue today", "label": True},
    {"prompt": "what is two plus two", "completion": " five maybe it is", "label": False},
    {"prompt": "tell me a story", "completion": " once upon a time there was a fox", "label": True},
    {"prompt": "the dog", "completion": " sat on the mat today", "label": False},
    {"prompt": "is the sky grey", "completion": " no it is blue", "label": True},
    {"prompt": "what is four", "completion": " a cat", "label": False},
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"])
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_llama(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
        # Larger than the default 0.02 so policy and reference disagree by a few nats per
        # sequence and every loss sits away from its flat regions.
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def sequence_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed logps of the tokens where ``completion_mask`` is 1 [R], and their count [R]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = completion_mask[:, 1:].to(token_logps.dtype)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def max_diff(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


def assert_close(name: str, ours: torch.Tensor | float, theirs: torch.Tensor | float) -> None:
    """Agreement to 1e-5, plus fp32 rounding of large values: the two sides' logps differ by
    ~1e-6 (TRL's chunked fused head vs a plain log_softmax) and squared losses such as SPPO's
    (values ~75) magnify that by 2|x|."""
    diff = max_diff(ours, theirs)
    scale = torch.as_tensor(theirs, dtype=torch.float64).abs().max().item()
    print(f"parity {name}: max abs diff {diff:.2e} (largest value {scale:.3g})")
    assert diff <= TOLERANCE + RELATIVE_TOLERANCE * scale, f"{name}: ours {ours} vs TRL {theirs} (diff {diff:.2e})"


def last_metrics(trainer) -> dict[str, float]:
    """The metrics TRL logged on its last loss call (under "eval" when the model is in eval mode)."""
    mode = "train" if trainer.model.training else "eval"
    return {key: values[-1] for key, values in trainer._metrics[mode].items() if values}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    warnings.filterwarnings("ignore")
    return {
        "tokenizer": build_tokenizer(),
        "policy": build_llama(0),
        "ref": build_llama(1),
        "output_dir": str(tmp_path_factory.mktemp("trl")),
        "trainers": {},  # one trainer per (kind, config) for the whole module
    }


def cached_trainer(world: dict, kind: str, config: dict, build):
    """Trainers are built once per module and shared by the tests that use the same config
    (the loss calls here never step the optimiser, so sharing cannot leak state)."""
    key = (kind, repr(sorted(config.items())))
    if key not in world["trainers"]:
        world["trainers"][key] = build()
    return world["trainers"][key]


def common_args(world: dict) -> dict:
    # bf16=False: TRL's configs default to bf16 mixed precision even on CPU (CPU autocast), which
    # moves logps by ~0.05 nats; parity is about the maths, so both sides run in fp32.
    return dict(output_dir=world["output_dir"], report_to=[], use_cpu=True, save_strategy="no", seed=0, bf16=False)


# --------------------------------------------------------------------------------------------
# DPOTrainer


def make_dpo_trainer(world: dict, fresh: bool = False, **config: object) -> DPOTrainer:
    def build() -> DPOTrainer:
        args = DPOConfig(per_device_train_batch_size=len(PAIRS), **common_args(world), **config)
        return DPOTrainer(
            model=copy.deepcopy(world["policy"]),
            ref_model=copy.deepcopy(world["ref"]),
            args=args,
            train_dataset=Dataset.from_list(PAIRS),
            processing_class=world["tokenizer"],
        )

    return build() if fresh else cached_trainer(world, "dpo", config, build)


@pytest.fixture(scope="module")
def dpo_world(world: dict) -> dict:
    trainer = make_dpo_trainer(world)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    with torch.no_grad():
        policy, lengths = sequence_logps(
            world["policy"], batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
        ref, _ = sequence_logps(world["ref"], batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    pairs = len(PAIRS)
    logps = PreferenceLogps(
        policy_chosen=policy[:pairs],
        policy_rejected=policy[pairs:],
        chosen_lengths=lengths[:pairs],
        rejected_lengths=lengths[pairs:],
        ref_chosen=ref[:pairs],
        ref_rejected=ref[pairs:],
    )
    return {"batch": batch, "logps": logps, "trainer": trainer}


def pair_slice(batch: dict, index: int) -> dict:
    """The collated DPO batch ([chosen rows; rejected rows]) restricted to one pair."""
    pairs = len(PAIRS)
    rows = torch.tensor([index, pairs + index])
    return {key: value[rows] for key, value in batch.items()}


def trl_dpo_losses(trainer: DPOTrainer, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's loss for each pair alone [B], and for the whole batch (scalar)."""
    with torch.no_grad():
        per_pair = torch.stack(
            [trainer.compute_loss(trainer.model, pair_slice(batch, i)) for i in range(len(PAIRS))]
        )
        whole = trainer.compute_loss(trainer.model, batch)
    return per_pair, whole


def test_sequence_logps_match_trl(dpo_world: dict) -> None:
    """Our plain-forward logps equal TRL's fused-LM-head logps, for policy and reference."""
    trainer, batch, logps = dpo_world["trainer"], dpo_world["batch"], dpo_world["logps"]
    trl_ref_chosen, trl_ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    trl_chosen, trl_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    assert_close("ref logps", torch.cat([logps.ref_chosen, logps.ref_rejected]),
                 torch.cat([trl_ref_chosen, trl_ref_rejected]))
    assert_close("policy logps", torch.cat([logps.policy_chosen, logps.policy_rejected]),
                 torch.cat([trl_chosen, trl_rejected]))
    # The batch is informative: the policy and the reference disagree by nats, not micro-nats.
    assert (logps.policy_chosen - logps.ref_chosen).abs().min() > 0.1


# (id, TRL DPOConfig, our specs). Every case uses beta = BETA on both sides.
DPO_CASES = [
    ("sigmoid", {"loss_type": ["sigmoid"]}, [("sigmoid", 1.0, {})]),
    ("robust", {"loss_type": ["robust"], "label_smoothing": 0.2}, [("robust", 1.0, {"label_smoothing": 0.2})]),
    ("ipo", {"loss_type": ["ipo"]}, [("ipo", 1.0, {})]),
    ("hinge", {"loss_type": ["hinge"]}, [("hinge", 1.0, {})]),
    ("sigmoid_norm", {"loss_type": ["sigmoid_norm"]}, [("sigmoid_norm", 1.0, {})]),
    ("apo_zero", {"loss_type": ["apo_zero"]}, [("apo_zero", 1.0, {})]),
    ("apo_down", {"loss_type": ["apo_down"]}, [("apo_down", 1.0, {})]),
    ("exo_pair", {"loss_type": ["exo_pair"], "label_smoothing": 0.01}, [("exo_pair", 1.0, {"label_smoothing": 0.01})]),
    ("nca_pair", {"loss_type": ["nca_pair"]}, [("nca_pair", 1.0, {})]),
    ("bco_pair", {"loss_type": ["bco_pair"]}, [("bco_pair", 1.0, {})]),
    ("sppo_hard", {"loss_type": ["sppo_hard"]}, [("sppo_hard", 1.0, {})]),
    ("discopop", {"loss_type": ["discopop"], "discopop_tau": 0.05}, [("discopop", 1.0, {"tau": 0.05})]),
    ("discopop_tau", {"loss_type": ["discopop"], "discopop_tau": 0.5}, [("discopop", 1.0, {"tau": 0.5})]),
    ("sft", {"loss_type": ["sft"]}, [("sft", 1.0, {})]),
    # RPO = TRL's [sigmoid, sft] with weights [1, alpha].
    ("rpo", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, [("rpo", 1.0, {"alpha": 0.5})]),
    # MPO, the example in TRL's docs: weighted sums match combine_losses.
    (
        "mpo",
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
        [("dpo", 0.8, {}), ("bco_pair", 0.2, {}), ("sft", 1.0, {})],
    ),
]
NO_BETA = {"sft"}  # our sft takes no beta: it has none to give


def with_beta(specs: list) -> list:
    return [(name, weight, params if name in NO_BETA else {"beta": BETA, **params})
            for name, weight, params in specs]


def uses_sft(trl_config: dict) -> bool:
    return "sft" in trl_config["loss_type"]


@pytest.mark.parametrize(("case", "trl_config", "specs"), DPO_CASES, ids=[c[0] for c in DPO_CASES])
def test_dpo_trainer_loss_parity_per_pair(world: dict, dpo_world: dict, case: str, trl_config: dict,
                                          specs: list) -> None:
    """Each pair alone through TRL equals our per-pair loss. (TRL's ``sft`` on one pair is that
    pair's token mean, which is our default per-sequence NLL.)"""
    trainer = make_dpo_trainer(world, beta=BETA, **trl_config)
    trl_per_pair, _ = trl_dpo_losses(trainer, dpo_world["batch"])
    ours, _ = combine_losses(dpo_world["logps"], with_beta(specs))
    assert_close(f"dpo-trainer {case} per pair", ours, trl_per_pair)


@pytest.mark.parametrize(("case", "trl_config", "specs"), DPO_CASES, ids=[c[0] for c in DPO_CASES])
def test_dpo_trainer_loss_parity_whole_batch(world: dict, dpo_world: dict, case: str, trl_config: dict,
                                             specs: list) -> None:
    """The whole batch through TRL equals the mean of our per-pair losses. TRL's ``sft`` is the
    token mean over all chosen tokens of the batch: we match it by passing the batch's mean chosen
    length as ``nll_length_normaliser`` (our default, the per-sequence mean, differs: see below)."""
    logps = dpo_world["logps"]
    specs = with_beta(specs)
    if uses_sft(trl_config):
        mean_length = logps.chosen_lengths.mean()
        specs = [(n, w, {**p, "nll_length_normaliser": mean_length}) if n in ("sft", "rpo") else (n, w, p)
                 for n, w, p in specs]
    trainer = make_dpo_trainer(world, beta=BETA, **trl_config)
    _, trl_whole = trl_dpo_losses(trainer, dpo_world["batch"])
    ours, _ = combine_losses(logps, specs)
    assert_close(f"dpo-trainer {case} whole batch", ours.mean(), trl_whole)


def test_sft_default_normalisation_differs_from_trl_on_mixed_lengths(world: dict, dpo_world: dict) -> None:
    """Deliberate difference: our default NLL is the mean of per-sequence token means (RPO paper,
    OpenRLHF); TRL's ``sft`` is the token mean over the batch. With unequal chosen lengths they
    differ; each equals its own hand formula."""
    logps = dpo_world["logps"]
    trainer = make_dpo_trainer(world, beta=BETA, loss_type=["sft"])
    _, trl_whole = trl_dpo_losses(trainer, dpo_world["batch"])
    per_sequence = (-logps.policy_chosen / logps.chosen_lengths).mean()
    token_mean = -logps.policy_chosen.sum() / logps.chosen_lengths.sum()
    assert_close("sft token mean formula", token_mean, trl_whole)
    assert_close("sft per-sequence formula", sft_loss(logps)[0].mean(), per_sequence)
    assert max_diff(per_sequence, token_mean) > 1e-3


def test_dpo_stats_match_trl_metrics(world: dict, dpo_world: dict) -> None:
    """Rewards, margins and accuracy: our per-pair stats averaged equal TRL's logged metrics."""
    trainer = make_dpo_trainer(world, beta=BETA, loss_type=["sigmoid"])
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dpo_world["batch"])
    metrics = last_metrics(trainer)
    _, stats = dpo_loss(dpo_world["logps"], beta=BETA)
    assert_close("rewards/chosen", stats["chosen_rewards"].mean(), metrics["rewards/chosen"])
    assert_close("rewards/rejected", stats["rejected_rewards"].mean(), metrics["rewards/rejected"])
    assert_close("rewards/margins", stats["margin"].mean(), metrics["rewards/margins"])
    assert_close("rewards/accuracies", stats["accuracy"].mean(), metrics["rewards/accuracies"])


def test_trl_sigmoid_ignores_label_smoothing(world: dict, dpo_world: dict) -> None:
    """TRL 1.16 quirk: ``label_smoothing`` never reaches ``loss_type="sigmoid"`` (only robust, exo,
    aot), so TRL's "cDPO" is plain DPO. Ours applies it (Mitchell 2023, as OpenRLHF and
    open-instruct): ``-(1-eps) log s(beta h) - eps log s(-beta h)``, checked here by hand."""
    eps = 0.2
    logps = dpo_world["logps"]
    trainer = make_dpo_trainer(world, beta=BETA, loss_type=["sigmoid"], label_smoothing=eps)
    trl_per_pair, _ = trl_dpo_losses(trainer, dpo_world["batch"])
    assert_close("TRL sigmoid with label_smoothing = plain DPO", dpo_loss(logps, beta=BETA)[0], trl_per_pair)

    h = (logps.policy_chosen - logps.ref_chosen) - (logps.policy_rejected - logps.ref_rejected)
    z = (BETA * h).double()
    expected = (1 - eps) * torch.log1p(torch.exp(-z)) + eps * torch.log1p(torch.exp(z))
    ours = dpo_loss(logps, beta=BETA, label_smoothing=eps)[0]
    assert_close("cDPO paper formula", ours, expected)
    assert max_diff(ours, trl_per_pair) > 1e-3


def test_dpo_gradients_match_trl(world: dict, dpo_world: dict) -> None:
    """One step's gradients agree too: TRL's loss.backward() vs ours through the plain forward."""
    batch = dpo_world["batch"]
    trainer = make_dpo_trainer(world, fresh=True, beta=BETA, loss_type=["sigmoid"])
    trainer.compute_loss(trainer.model, batch).backward()

    policy = copy.deepcopy(world["policy"])
    logps, lengths = sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    reference = dpo_world["logps"]
    pairs = len(PAIRS)
    ours = PreferenceLogps(logps[:pairs], logps[pairs:], lengths[:pairs], lengths[pairs:],
                           reference.ref_chosen, reference.ref_rejected)
    dpo_loss(ours, beta=BETA)[0].mean().backward()

    theirs = dict(trainer.model.named_parameters())
    worst = max(max_diff(p.grad, theirs[name].grad) for name, p in policy.named_parameters())
    print(f"parity dpo gradients: max abs diff {worst:.2e}")
    assert worst <= TOLERANCE


# --------------------------------------------------------------------------------------------
# CPOTrainer (CPO, SimPO) and ORPOTrainer from trl.experimental


def make_experimental_trainer(world: dict, kind: str, **config: object):
    if kind == "cpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer

    def build():
        args = Config(per_device_train_batch_size=len(PAIRS), max_length=64, remove_unused_columns=False,
                      **common_args(world), **config)
        return Trainer(model=copy.deepcopy(world["policy"]), args=args, train_dataset=Dataset.from_list(PAIRS),
                       processing_class=world["tokenizer"])

    return cached_trainer(world, kind, config, build)


@pytest.fixture(scope="module")
def cpo_batch(world: dict) -> dict:
    trainer = make_experimental_trainer(world, "cpo")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    with torch.no_grad():
        chosen, chosen_lengths = sequence_logps(
            world["policy"], batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"] != -100
        )
        rejected, rejected_lengths = sequence_logps(
            world["policy"], batch["rejected_input_ids"], batch["rejected_attention_mask"],
            batch["rejected_labels"] != -100,
        )
    return {"batch": batch, "logps": PreferenceLogps(chosen, rejected, chosen_lengths, rejected_lengths)}


def experimental_slice(batch: dict, index: int) -> dict:
    return {key: value[index : index + 1] for key, value in batch.items()}


def trl_experimental_losses(trainer, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """TRL's loss per pair [B] (with its metrics) and for the whole batch."""
    per_pair, metrics = [], []
    with torch.no_grad():
        for i in range(len(PAIRS)):
            loss, pair_metrics = trainer.get_batch_loss_metrics(trainer.model, experimental_slice(batch, i))
            per_pair.append(loss)
            metrics.append(pair_metrics)
        whole, _ = trainer.get_batch_loss_metrics(trainer.model, batch)
    return torch.stack(per_pair), whole, metrics


CPO_CASES = [
    # SimPO = CPOTrainer(loss_type="simpo", cpo_alpha=0): TRL's simpo_gamma is the paper's gamma.
    ("simpo", {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0, "simpo_gamma": 0.5},
     [("simpo", 1.0, {"beta": 2.0, "gamma": 0.5})]),
    ("simpo_smoothed", {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0, "simpo_gamma": 0.5,
                        "label_smoothing": 0.1},
     [("simpo", 1.0, {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.1})]),
    ("cpo", {"loss_type": "sigmoid", "cpo_alpha": 1.0, "beta": BETA}, [("cpo", 1.0, {"beta": BETA})]),
    ("cpo_alpha", {"loss_type": "sigmoid", "cpo_alpha": 0.3, "beta": BETA},
     [("cpo", 1.0, {"beta": BETA, "alpha": 0.3})]),
    # CPO-SimPO: SimPO plus an NLL term.
    ("cpo_simpo", {"loss_type": "simpo", "cpo_alpha": 0.5, "beta": 2.0, "simpo_gamma": 0.5},
     [("simpo", 1.0, {"beta": 2.0, "gamma": 0.5}), ("sft", 0.5, {})]),
]


@pytest.mark.parametrize(("case", "trl_config", "specs"), CPO_CASES, ids=[c[0] for c in CPO_CASES])
def test_cpo_trainer_loss_parity(world: dict, cpo_batch: dict, case: str, trl_config: dict, specs: list) -> None:
    """Per pair and whole batch. TRL's NLL is the batch token mean, matched on the whole batch by
    ``nll_length_normaliser`` = mean chosen length; per pair it is our default per-sequence mean."""
    logps = cpo_batch["logps"]
    trainer = make_experimental_trainer(world, "cpo", **trl_config)
    trl_per_pair, trl_whole, _ = trl_experimental_losses(trainer, cpo_batch["batch"])
    ours, _ = combine_losses(logps, specs)
    assert_close(f"cpo-trainer {case} per pair", ours, trl_per_pair)

    mean_length = logps.chosen_lengths.mean()
    token_mean_specs = [(n, w, {**p, "nll_length_normaliser": mean_length}) if n in ("cpo", "sft") else (n, w, p)
                        for n, w, p in specs]
    ours_whole, _ = combine_losses(logps, token_mean_specs)
    assert_close(f"cpo-trainer {case} whole batch", ours_whole.mean(), trl_whole)


def test_simpo_and_cpo_stats_match_trl_metrics(world: dict, cpo_batch: dict) -> None:
    logps = cpo_batch["logps"]
    for config, (_, stats) in [
        ({"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0, "simpo_gamma": 0.5},
         simpo_loss(logps, beta=2.0, gamma=0.5)),
        ({"loss_type": "sigmoid", "cpo_alpha": 1.0, "beta": BETA}, cpo_loss(logps, beta=BETA)),
    ]:
        trainer = make_experimental_trainer(world, "cpo", **config)
        with torch.no_grad():
            _, metrics = trainer.get_batch_loss_metrics(trainer.model, cpo_batch["batch"])
        assert_close(f"{config['loss_type']} rewards/chosen", stats["chosen_rewards"].mean(), metrics["rewards/chosen"])
        assert_close(f"{config['loss_type']} rewards/margins", stats["margin"].mean(), metrics["rewards/margins"])
        assert_close(f"{config['loss_type']} accuracies", stats["accuracy"].mean(), metrics["rewards/accuracies"])


def test_orpo_odds_ratio_term_matches_trl(world: dict, cpo_batch: dict) -> None:
    """ORPO = NLL - beta * log s(log odds ratio). The odds-ratio term matches TRL per pair and on
    the whole batch: ours with ``nll_weight=0`` equals TRL's loss minus its logged ``nll_loss``."""
    logps = cpo_batch["logps"]
    trainer = make_experimental_trainer(world, "orpo", beta=BETA)
    trl_per_pair, trl_whole, metrics = trl_experimental_losses(trainer, cpo_batch["batch"])
    trl_or_term = trl_per_pair - torch.tensor([m["nll_loss"] for m in metrics])
    ours = orpo_loss(logps, beta=BETA, nll_weight=0.0)[0]
    assert_close("orpo odds-ratio term per pair", ours, trl_or_term)

    with torch.no_grad():
        _, whole_metrics = trainer.get_batch_loss_metrics(trainer.model, cpo_batch["batch"])
    assert_close("orpo odds-ratio term whole batch", ours.mean(), trl_whole - whole_metrics["nll_loss"])
    # TRL's metric names are swapped: "log_odds_chosen" holds the mean log odds *ratio*.
    assert_close("orpo log odds ratio", orpo_loss(logps, beta=BETA)[1]["log_odds_ratio"].mean(),
                 whole_metrics["log_odds_chosen"])


def test_orpo_nll_covers_the_response_only_unlike_trl(world: dict, cpo_batch: dict) -> None:
    """Deliberate difference: TRL's ORPO NLL is the token mean over prompt *and* chosen response
    (checked here against a hand computation); ours is the chosen response's NLL only (checked
    against the per-sequence mean of the response logps), so the totals differ by the NLL."""
    batch, logps = cpo_batch["batch"], cpo_batch["logps"]
    trainer = make_experimental_trainer(world, "orpo", beta=BETA)
    with torch.no_grad():
        _, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
        prompt_and_response, count = sequence_logps(
            world["policy"], batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_attention_mask"]
        )
    assert_close("TRL ORPO NLL = prompt+response token mean", -prompt_and_response.sum() / count.sum(),
                 metrics["nll_loss"])

    losses, stats = orpo_loss(logps, beta=BETA)
    assert_close("our ORPO NLL = response per-sequence mean", stats["nll"], -logps.policy_chosen / logps.chosen_lengths)
    assert_close("our ORPO total", losses, stats["nll"] + orpo_loss(logps, beta=BETA, nll_weight=0.0)[0])
    assert max_diff(stats["nll"].mean(), metrics["nll_loss"]) > 1e-3


# --------------------------------------------------------------------------------------------
# KTOTrainer


def make_kto_trainer(world: dict, **config: object) -> KTOTrainer:
    def build() -> KTOTrainer:
        args = KTOConfig(per_device_train_batch_size=len(UNPAIRED), **common_args(world), **config)
        return KTOTrainer(
            model=copy.deepcopy(world["policy"]),
            ref_model=copy.deepcopy(world["ref"]),
            args=args,
            train_dataset=Dataset.from_list(UNPAIRED),
            processing_class=world["tokenizer"],
        )

    return cached_trainer(world, "kto", config, build)


@pytest.fixture(scope="module")
def kto_world(world: dict) -> dict:
    trainer = make_kto_trainer(world)
    rows = [trainer.train_dataset[i] for i in range(len(UNPAIRED))]
    batch = trainer.data_collator(rows)
    logps = {}
    with torch.no_grad():
        for name in ("policy", "ref"):
            for prefix in ("", "KL_"):
                logps[name + prefix] = sequence_logps(
                    world[name], batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                    batch[f"{prefix}completion_mask"],
                )[0]
    return {"trainer": trainer, "rows": rows, "batch": batch, "logps": logps}


def test_kl_completion_order_matches_trl(kto_world: dict) -> None:
    rows = kto_world["rows"]
    order = kl_completion_order(len(rows))
    assert [row["KL_completion_ids"] for row in rows] == [rows[j]["completion_ids"] for j in order.tolist()]


KTO_CASES = [
    ("kto", {"beta": BETA}, {"beta": BETA}),
    ("kto_weighted", {"beta": BETA, "desirable_weight": 1.3, "undesirable_weight": 0.7},
     {"beta": BETA, "desirable_weight": 1.3, "undesirable_weight": 0.7}),
]


@pytest.mark.parametrize(("case", "trl_config", "params"), KTO_CASES, ids=[c[0] for c in KTO_CASES])
def test_kto_trainer_loss_parity(world: dict, kto_world: dict, case: str, trl_config: dict, params: dict) -> None:
    """TRL's KTO batch loss (the mean over examples) and its logged z0 equal ours."""
    logps, batch = kto_world["logps"], kto_world["batch"]
    trainer = make_kto_trainer(world, **trl_config)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    metrics = last_metrics(trainer)
    trl_kl = metrics["kl"]

    z0 = kto_kl_baseline(logps["policyKL_"], logps["refKL_"])
    assert z0 > 0.1, "the batch should exercise the KL baseline (z0 > 0), not its clamp"
    assert_close(f"kto {case} z0", z0, trl_kl)
    losses, stats = kto_loss(logps["policy"], logps["ref"], batch["label"], z0, **params)
    assert_close(f"kto {case} loss", losses.mean(), trl_loss)

    desirable = stats["is_desirable"]
    chosen_rewards = (stats["rewards"] * desirable).sum() / desirable.sum()
    rejected_rewards = (stats["rewards"] * (1 - desirable)).sum() / (1 - desirable).sum()
    assert_close(f"kto {case} rewards/chosen", chosen_rewards, metrics["rewards/chosen"])
    assert_close(f"kto {case} rewards/rejected", rejected_rewards, metrics["rewards/rejected"])


def test_kto_apo_zero_unpaired_parity(world: dict, kto_world: dict) -> None:
    from posttrain.losses.kto import apo_zero_unpaired_loss

    logps, batch = kto_world["logps"], kto_world["batch"]
    trainer = make_kto_trainer(world, beta=BETA, loss_type="apo_zero_unpaired")
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    losses, _ = apo_zero_unpaired_loss(logps["policy"], logps["ref"], batch["label"], None, beta=BETA)
    assert_close("apo_zero_unpaired loss", losses.mean(), trl_loss)


def test_hand_values_are_not_degenerate(dpo_world: dict) -> None:
    """Guard for the parity above: DPO sits away from log 2 on this batch, so a loss that ignored
    its inputs could not pass."""
    losses, _ = dpo_loss(dpo_world["logps"], beta=BETA)
    assert (losses - math.log(2)).abs().max() > 0.05
