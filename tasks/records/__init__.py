"""Record-level data checks shared by the curate and synthesize stages (and the retrain flow).

readers.py        what a file holds and how each record shape maps to the internal schema
text.py           which text of a record the checks look at
quality.py        which records are too short, repetitive, junk or in the wrong language
dedup.py          which records repeat an earlier one (exact, MinHash near-duplicate, embedding paraphrase)
decontaminate.py  which training records contain an eval item
checks.py         all of the above, per record, in two phases; the settings they take (RecordChecks)
"""
