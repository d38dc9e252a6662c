"""evaluate's reference check of what preference tuning added: exact match of the tuned model minus the SFT-only
model's, per prompt through the shipped exact-match module, with a paired interval."""

from __future__ import annotations

from importlib import resources


def _exact(predictions: list[str], references: list[str]) -> list[float]:
    import evaluate as hf_evaluate

    em = hf_evaluate.load(str(resources.files("alignflow.metrics") / "exact_match"))
    return em.compute(predictions=predictions, references=references, per_example=True)["exact_match"]


def test_exact_match_gain_vs_sft_is_tuned_minus_sft_with_a_paired_interval() -> None:
    from alignflow.tasks.evaluate import gain

    references = ["sentiment: negative", "2021-03-05", "fruits: fig, lychee", "sentiment: neutral"] * 6
    # the SFT-only model answers the first two in the sentence form; preference tuning shortens one, breaks none
    sft = ["The sentiment of this review is negative.", "The date in ISO 8601 format is 2021-03-05.",
           "fruits: fig, lychee", "sentiment: neutral"] * 6
    tuned = ["sentiment: negative", "The date in ISO 8601 format is 2021-03-05.", "fruits: fig, lychee",
             "sentiment: neutral"] * 6
    em_tuned, em_sft = _exact(tuned, references), _exact(sft, references)
    assert sum(em_sft) / 24 == 0.5 and sum(em_tuned) / 24 == 0.75

    up = gain("exact_match_gain_vs_sft", em_tuned, em_sft, seed=0)
    assert set(up) == {"exact_match_gain_vs_sft", "exact_match_gain_vs_sft_ci_low", "exact_match_gain_vs_sft_ci_high"}
    assert up["exact_match_gain_vs_sft"] == 0.25  # tuned - SFT, not the other way round
    # no prompt got worse, so every resample's gain is >= 0; 6 of 24 better keeps the low end above 0
    assert 0 < up["exact_match_gain_vs_sft_ci_low"] < 0.25 < up["exact_match_gain_vs_sft_ci_high"] <= 0.5
    # paired: the same answers from both models give a gain of exactly 0 in every resample
    same = gain("exact_match_gain_vs_sft", em_sft, em_sft, seed=0)
    assert same == {"exact_match_gain_vs_sft": 0.0, "exact_match_gain_vs_sft_ci_low": 0.0,
                    "exact_match_gain_vs_sft_ci_high": 0.0}
    down = gain("exact_match_gain_vs_sft", em_sft, em_tuned, seed=0)
    assert down["exact_match_gain_vs_sft"] == -0.25 and down["exact_match_gain_vs_sft_ci_high"] < 0


def test_training_pairs_split_by_prompt_into_disjoint_judge_and_policy_sides() -> None:
    """reward.pairs: disjoint gives the judge and the policy no common pair and no common prompt, and loses none;
    shared gives both every pair. A pair is named by tokenize's held-out hash."""
    from datasets import Dataset

    from alignflow.tasks.lib import pairs
    from alignflow.tasks.lib.hashing import sha256_json

    rows = [{"prompt": [{"role": "user", "content": f"question {i // 2}"}],
             "chosen": [{"role": "assistant", "content": f"good {i}"}],
             "rejected": [{"role": "assistant", "content": f"bad {i}"}]} for i in range(80)]  # 2 pairs per prompt
    data = Dataset.from_list(rows)
    judge, policy = pairs.select(data, "judge", "disjoint"), pairs.select(data, "policy", "disjoint")
    assert 10 < len(judge) < 70 and len(judge) + len(policy) == 80
    assert not {str(p) for p in judge["prompt"]} & {str(p) for p in policy["prompt"]}  # no prompt on both sides
    assert set(pairs.hashes(judge)) | set(pairs.hashes(policy)) == set(pairs.hashes(data))
    assert not set(pairs.hashes(judge)) & set(pairs.hashes(policy))
    assert pairs.hashes(pairs.select(data, "judge", "shared")) == pairs.hashes(data) == \
        pairs.hashes(pairs.select(data, "policy", "shared"))
    # the hash tokenize lists as heldout_pair_hashes: [prompt, chosen text, rejected text]
    assert pairs.pair_hash(rows[3]) == sha256_json([rows[3]["prompt"], "good 3", "bad 3"])


def test_spellings_of_one_prompt_share_a_side_so_the_judge_stays_independent() -> None:
    """Case and white space variants of a prompt (one prompt to curate's exact dedup) go to one side: split on the
    raw messages, some of 30 prompts' three spellings went to the judge and others to the policy, and
    judge_independence, which compares pair hashes, called the two independent."""
    from datasets import Dataset

    from alignflow.tasks.evaluate import judge_independence
    from alignflow.tasks.lib import pairs

    rows = [{"prompt": [{"role": "user", "content": spelling}],
             "chosen": [{"role": "assistant", "content": f"good {i}"}],
             "rejected": [{"role": "assistant", "content": f"bad {i}"}]}
            for i in range(30) for spelling in (f"How do I reset password {i}?", f"How do I  reset password {i}?\n",
                                                 f"HOW DO I RESET PASSWORD {i}?")]
    data = Dataset.from_list(rows)
    judge, policy = pairs.select(data, "judge", "disjoint"), pairs.select(data, "policy", "disjoint")

    def prompts(rows: Dataset) -> set[str]:
        return {" ".join(p[0]["content"].lower().split()) for p in rows["prompt"]}

    assert 0 < len(judge) < 90 and len(judge) + len(policy) == 90 and not prompts(judge) & prompts(policy)
    assert judge_independence({"trained_pair_hashes": pairs.hashes(judge)},
                              {"trained_pair_hashes": pairs.hashes(policy)}) == (True, "")


def test_a_judge_that_learned_the_policys_pairs_or_rewarded_it_is_not_independent() -> None:
    from alignflow.tasks.evaluate import judge_independence

    assert judge_independence({"trained_pair_hashes": ["a", "b"]}, {"trained_pair_hashes": ["c"]}) == (True, "")
    shared, why = judge_independence({"trained_pair_hashes": ["a", "b"], "pairs": "shared"},
                                     {"trained_pair_hashes": ["a", "b"]})
    assert not shared and "2 common preference pairs" in why and "shared" in why
    online, why = judge_independence({"trained_pair_hashes": ["a"]},
                                     {"trained_pair_hashes": [], "optimised_against_reward_model": True})
    assert not online and "against this reward model" in why
    assert judge_independence({}, {"trained_pair_hashes": []})[0] is False  # unknown: not independent


def test_the_gate_does_not_count_a_dependent_judges_win_rates() -> None:
    from alignflow.tasks.register import GateConfig, gate

    good = {"win_rate_vs_base": 0.9, "win_rate_vs_base_ci_low": 0.8, "win_rate_vs_base_ci_high": 0.95,
            "rougeL_gain_ci_low": 0.1, "judge_heldout_accuracy": 0.9, "judge_heldout_accuracy_ci_low": 0.8,
            "judge_heldout_pairs": 35, "judge_independent": 1.0}
    assert gate(GateConfig(), good, True)[0] == []
    dependent = {**good, "judge_independent": 0.0, "win_rate_vs_champion": 0.9, "win_rate_vs_champion_ci_low": 0.8}
    reasons, decided = gate(GateConfig(), dependent, True, "reward and dpo trained on 7 common preference pairs")
    assert len(reasons) == 2  # vs the base and vs the champion: both win-rates come from that judge
    assert all("not independent of the policy (reward and dpo trained on 7 common" in r for r in reasons)
    assert "min_win_rate=0.5 is not met" in reasons[0] and "min_win_rate_vs_champion" in reasons[1]
    assert any("not counted" in d for d in decided)
    # the owner may gate on other evidence only: both win-rate checks off
    assert gate(GateConfig(min_win_rate=None, min_win_rate_vs_champion=None), dependent, True)[0] == []
