"""SAEBench-comparable evaluation (Karvonen et al. 2025, the ``sae-bench`` package): k-sparse probing on the
corpus's labels (:mod:`.probing`, inputs from :mod:`.pooling`), first-letter feature absorption
(:mod:`.absorption`, prompts in :mod:`.words`), SAEBench's core numbers (:mod:`.core`) and its result files
(:mod:`.results`); :mod:`.hook` runs them all for one SAE (the ``bench`` stage)."""
