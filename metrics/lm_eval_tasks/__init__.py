"""lm-evaluation-harness tasks shipped with alignflow (`evaluate.lm_eval.include_path` defaults to this folder).

`alignflow_sentiment`: 24 one-line reviews, label negative / positive, scored by the harness as a two-way
multiple choice over log-likelihoods (`acc`, `acc_norm`). Small on purpose: it runs in seconds on the smoke
recipe's tiny model and needs no hub; hub tasks (arc_easy, mmlu, ...) work where the machine can reach it.
"""
