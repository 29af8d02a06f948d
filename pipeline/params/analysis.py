"""Params of the analysis stages: interpretation, steering and the LLM endpoint they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from pipeline.params.core import ParamsError, knob


def check_backend(spec: str, key: str, off: str) -> None:
    """An LM backend spec: ``off`` (no LM), ``local:<model>`` or ``openai:<model>``."""
    kind, _, model = spec.partition(":")
    if spec != off and (kind not in ("local", "openai") or not model):
        raise ParamsError(f"{key}: {spec!r} is not allowed (allowed: '{off}', 'local:<model>', 'openai:<model>')")


@dataclass
class LLMParams:
    """The OpenAI-compatible endpoint of every ``openai:<model>`` backend: the interpret stage's explainer
    and scorer (``interpret.explainer``) and the steer stage's judge (``steer.judge``). One section, so
    both stages (and their DVC params) follow one setting."""

    base_url: str = knob("http://localhost:8000/v1", help="Base URL of the OpenAI-compatible endpoint (openai: backends of interpret.explainer and steer.judge).")
    api_key_env: str = knob("OPENAI_API_KEY", help="Environment variable holding the endpoint's API key (may be unset for local servers).")
    max_retries: int = knob(5, help="Retries per endpoint request (exponential backoff) before giving up.", ge=0)
    request_timeout: float = knob(60.0, help="Seconds per endpoint request.", gt=0)


@dataclass
class InterpretParams:
    """Feature interpretation (the ``interpret`` stage): streaming statistics, examples, logit lens,
    topic alignment, automated explanations and scores, dashboard."""

    split: Literal["train", "validation"] = knob("train", help="Activation split analysed.")
    batch_size: int = knob(4096, help="Tokens encoded per batch in the statistics pass.", ge=1)
    device: str = knob("auto", help="Device of the SAE encode and a local LM explainer: 'auto' (cuda if present, else cpu), 'cpu', 'cuda', ...")
    encode_dtype: Literal["auto", "float32", "bfloat16"] = knob("auto", help="Dtype of the SAE encode and logit lens: 'auto' = bfloat16 on GPUs and on CPUs with AVX512-BF16/AMX (~3x faster there, activations within ~1%), else float32 (exact).")
    threshold: float = knob(0.0, help="A feature fires on a token when its activation exceeds this (0 for sparse SAEs; set it for dense codes, e.g. 0.5 for the sigmoid 'kl' SAE).", ge=0)
    n_examples: int = knob(20, help="Top-activating contexts kept per feature (even ranks shown to the explainer, odd ranks held out for scoring).", ge=2)
    n_quantiles: int = knob(10, help="Activation-quantile bins for stratified examples (Anthropic's feature dashboards).", ge=1)
    examples_per_quantile: int = knob(2, help="Stratified examples per quantile bin.", ge=0)
    reservoir: int = knob(100, help="Per-feature uniform reservoir of activating contexts the quantile examples are drawn from.", ge=1)
    n_random: int = knob(10, help="Random non-activating contexts per feature (negatives for the scorers).", ge=0)
    n_logits: int = knob(10, help="Promoted and suppressed tokens kept per feature (logit lens).", ge=1)
    n_neighbours: int = knob(10, help="Nearest features (decoder cosine) and co-occurring features kept per feature.", ge=1)
    cooc_per_token: int = knob(16, help="Co-occurrence is counted among this many strongest active features of each token (bounded work per token).", ge=2)
    cooc_max_features: int = knob(16384, help="Skip co-occurrence above this d_sae (its matrix is d_sae^2 int32).", ge=1)
    explainer: str = knob("stats", help="Explainer backend: 'stats' (no LM), 'local:<model>' (transformers chat model, e.g. local:smollm2-135m) or 'openai:<model>' (the OpenAI-compatible endpoint of the llm section).")
    n_explain: int = knob(16, help="Features explained and scored by an LM backend (seeded random alive features); 'stats' explains all.", ge=0)
    max_new_tokens: int = knob(48, help="Tokens generated per LM explanation.", ge=1)

    def check(self, prefix: str) -> None:
        check_backend(self.explainer, f"{prefix}.explainer", "stats")


# The steering methods, the one list: the SAE's own interventions, then the baselines. The sweep,
# the verdict, the plot CSVs and the report follow it (dvc.yaml's steer plots are checked against it).
SteerMethod = Literal["add", "clamp", "dim", "random"]
STEER_METHODS: tuple[str, ...] = get_args(SteerMethod)
SAE_METHODS = ("add", "clamp")  # steer the SAE's feature; the verdict speaks for one of them
BASELINES = tuple(m for m in STEER_METHODS if m not in SAE_METHODS)  # difference-in-means, random direction


# Neutral openings, none about a corpus topic, varied in form (opinion, story, list, report), so a
# concept has to come from the steering.
STEER_PROMPTS = (
    "I think that", "The best thing about", "Here is a short story:", "Let me tell you about",
    "Yesterday I", "In my opinion,", "The most important thing is", "Once upon a time,",
    "My favourite", "It is often said that", "The main reason is", "We talked about",
    "This is a story about", "Today I learned that", "The first thing you notice is", "Many people believe that",
    "One thing I remember is", "Here are some facts:", "She told me that", "The article explains",
)


# Held-out neutral text for the likelihood metrics: everyday sentences, none about a corpus topic, each
# cut before its end so every position predicts a plausible next token. More positions than the
# generation prompts (one short opening each), at no generation cost.
NEUTRAL_TEXTS = (
    "I woke up early this morning and made a cup of", "We met at the corner of the street and walked to",
    "She said that the meeting would start a little later than", "After lunch we sat in the garden and talked about",
    "He opened the door, looked around the room and decided to", "The weather was pleasant, so we spent the afternoon",
    "My neighbour asked me if I could help her carry the", "They arrived late because the road was closed near the",
    "It was the first time I had ever seen such a", "I wrote a short note and left it on the table for",
    "Everyone agreed that the plan was simple enough to", "On Sunday we usually stay at home and",
    "The children were laughing as they ran towards the", "When I got back, the house was quiet and the",
    "You can find more information in the section about", "There are several reasons why people prefer to",
    "At the end of the day, what matters most is", "Our friends invited us to dinner and we brought some",
    "Please let me know if you have any questions about the", "I remember the day we first moved into the",
    "The letter explained that the package would arrive on", "We waited for a long time before anyone came to",
    "It is not always easy to decide what to do when", "Later that evening, we watched a film and then",
    "She picked up the phone and called her brother to", "In the morning the streets were empty and the",
    "He told us a story that nobody had heard before, about", "I usually keep my keys in the small box next to the",
    "The next step is to make sure that everything is", "As far as I know, nobody has ever tried to",
    "We spent most of the week getting ready for the", "It took us almost an hour to find a place to",
    "Most of the time I prefer to read quietly in the", "The shop on the corner sells a little bit of",
    "If you ask me, the easiest way to do it is to", "They said goodbye at the station and promised to",
    "Sometimes the simplest answer is also the", "I could not remember where I had put the",
    "The new version is slightly different from the old one because", "After a short break, we went back to",
)

@dataclass
class SteerParams:
    """Causal steering evaluation (the ``steer`` stage). Coefficients are in units of each feature's
    own scale m_f (its max, or a quantile, measured on our activations), so 1.0 means "as strongly as
    the feature ever writes"."""

    hook: str | None = knob(None, help="Hook whose SAE is steered (null: the first of extract.hooks; with sae.arch "
                                  "transcoder the first layers.{i}.mlp_in, the hook a transcoder is kept under; it is "
                                  "steered at layers.{i}.mlp_out).")
    features: list[int] = knob(factory=list, help="Features to steer (empty: choose automatically, see select_by).")
    n_features: int = knob(3, help="Number of features chosen automatically.", ge=1)
    select_by: Literal["topic", "score", "auroc"] = knob(
        "topic", help="Automatic choice: 'topic' = best feature per corpus topic, 'score' = top explanation "
        "score, 'auroc' = top topic AUROC (from data/interpret; else from this stage's own topic statistics).")
    methods: list[SteerMethod] = knob(
        factory=lambda: list(STEER_METHODS),
        help="'add': + a*m_f*W_dec[f]; 'clamp': feature set to c*m_f, SAE error kept; baselines 'dim' "
        "(difference-in-means of the feature's topic) and 'random' (random direction), same norm as 'add'.")
    coefficients: list[float] = knob(
        factory=lambda: [1.0, 2.0, 4.0, 8.0],
        help="Coefficient sweep (a or c). The unsteered continuation is always generated as reference; "
        "0 adds a no-op for additive methods and ablation for clamping.")
    scale: Literal["max", "quantile"] = knob(
        "max", help="m_f: the feature's max activation, or the quantile below of its per-context maxima.")
    scale_quantile: float = knob(0.9, help="Quantile used when scale='quantile'.", gt=0.0, le=1.0)
    positions: Literal["all", "generated"] = knob(
        "all", help="Steer every position, or only the last prompt token and the generated tokens.")
    prompts: list[str] = knob(
        factory=lambda: list(STEER_PROMPTS),
        help="Neutral prompts (shuffled by seed, then split into validation and test). The default 20 give "
        "10 test prompts: with only 2, one prompt could flip the verdict.")
    validation_fraction: float = knob(0.5, help="Fraction of prompts used to choose each coefficient and the SAE method.", gt=0.0, lt=1.0)
    max_new_tokens: int = knob(24, help="Tokens generated per continuation.", ge=1)
    do_sample: bool = knob(False, help="Seeded sampling instead of greedy decoding.")
    temperature: float = knob(1.0, help="Sampling temperature (do_sample only).", gt=0.0)
    batch_size: int = knob(72, help="Rows per generation batch (all methods and coefficients of a prompt share one).", ge=1)
    bootstrap_resamples: int = knob(
        10000, help="Two-way bootstrap resamples (test prompts x features, seeded by seed) behind the 95% intervals "
        "of the test means and of the SAE-minus-baseline differences that decide the verdict.", ge=100)
    stats_split: Literal["train", "validation"] = knob("validation", help="Activation split used for m_f, topic statistics and ablation contexts.")
    stats_max_tokens: int = knob(65536, help="Activation rows read for feature statistics.", ge=1)
    ablation_contexts: int = knob(4, help="Contexts where the feature fires (and as many where it does not) for the ablation effect.", ge=1)
    min_firing: int = knob(8, help="Minimum firing tokens for a feature to be chosen automatically.", ge=1)
    judge: str = knob(
        "none", help="LLM judge of every generation (AxBench, Wu et al. 2025): 'none', 'local:<model>' "
        "(transformers chat model) or 'openai:<model>' (the endpoint of the llm section). Rates concept, "
        "instruction and fluency 0-2 and reports their harmonic mean next to hm@2; off by default (a tiny "
        "local model is a weak judge).")
    # Likelihood evidence (the primary result; pipeline/steering/evidence.py): no generation, every label.
    likelihood: bool = knob(True, help="Likelihood-based causal evidence, the primary steering result: for every corpus label, "
                            "steering (change of the topic lexicon's log-probability mass at matched KL) and ablation "
                            "(selective loss of the lexicon's likelihood on the topic's documents) against baselines.")
    concepts: list[str] = knob(factory=list, help="Corpus labels used as concepts by the likelihood evidence (empty: every label).")
    neutral_texts: list[str] = knob(
        factory=lambda: list(NEUTRAL_TEXTS),
        help="Held-out neutral text of the likelihood metrics (shuffled by seed, split by validation_fraction: validation "
        "chooses the output-based latent, test measures every method).")
    lexicon_size: int = knob(32, help="Tokens per topic lexicon: highest PMI with the label on the train split.", ge=1)
    lexicon_min_count: int = knob(20, help="A lexicon token occurs at least this often in the topic's train tokens.", ge=1)
    lik_coefficients: list[float] = knob(
        factory=lambda: [0.0625, 0.125, 0.25],
        help="Likelihood steering sweep: each method's unit direction times this times the mean hidden-state norm "
        "at the hook on the neutral texts (0 = unsteered is implied). It must reach the largest KL budget for every "
        "method, or that method has no value there (on the default run 0.25 gave KL 0.27-0.47 nats).")
    kl_budgets: list[float] = knob(factory=lambda: [0.05, 0.1, 0.2],
                                   help="KL(base || steered) budgets (nats) at which the methods' effects are compared.")
    verdict_kl: float = knob(0.1, help="The KL budget of the steering verdict (one of kl_budgets).", gt=0)
    output_candidates: int = knob(
        3, help="Output-based choice: this many latents by the logit lens of their decoder row on the lexicon, and as many by "
        "topic selectivity, are each steered on the validation texts; the largest lexicon effect wins.", ge=1)
    ablation_windows: int = knob(8, help="Held-out (validation) windows of each topic's documents that the ablations run on.", ge=1)
    ablation_window_tokens: int = knob(48, help="Tokens per ablation window.", ge=4)
    lik_batch_rows: int = knob(64, help="Rows per likelihood forward pass (text x method x coefficient).", ge=1)

    def check(self, prefix: str) -> None:
        if self.verdict_kl not in self.kl_budgets:
            raise ParamsError(f"{prefix}.verdict_kl: {self.verdict_kl} is not one of {prefix}.kl_budgets {self.kl_budgets}")
        if not self.lik_coefficients or min(self.lik_coefficients) <= 0:
            raise ParamsError(f"{prefix}.lik_coefficients: {self.lik_coefficients} (give positive coefficients)")
        if len(self.neutral_texts) < 2:
            raise ParamsError(f"{prefix}.neutral_texts: need at least 2 texts (one validation, one test)")
        if not self.coefficients:
            raise ParamsError(f"{prefix}.coefficients: [] is empty (give at least one coefficient)")
        if not self.methods:
            raise ParamsError(f"{prefix}.methods: [] is empty (allowed: {', '.join(STEER_METHODS)})")
        if len(self.prompts) < 2:
            raise ParamsError(f"{prefix}.prompts: need at least 2 prompts (one validation, one test)")
        if any(f < 0 for f in self.features):
            raise ParamsError(f"{prefix}.features: {self.features} has a negative feature index")
        check_backend(self.judge, f"{prefix}.judge", "none")


@dataclass
class BenchParams:
    """SAEBench-comparable evaluation (the ``bench`` stage): sparse probing on the corpus's labels,
    first-letter feature absorption, and SAEBench result files under ``eval_results/``."""

    device: str = knob("auto", help="Device of the SAE encode and the model forward: 'auto' (cuda if present, else cpu), 'cpu', 'cuda', ...")
    batch_size: int = knob(4096, help="Activation rows read and encoded per batch.", ge=1)
    encode_dtype: Literal["auto", "float32", "bfloat16"] = knob("auto", help="Dtype of the SAE encode: 'auto' = bfloat16 on GPUs and on CPUs with AVX512-BF16/AMX, else float32.")
    documents_per_label: int | None = knob(200, help="Documents per corpus label for sparse probing: the earliest in the contexts (prepare shuffles the corpus by seed, so a seeded sample); null: all (every token of the corpus encoded).", ge=4)
    validation_fraction: float = knob(0.2, help="Share of each label's documents in the probe validation split (chooses the full probes' C).", gt=0, lt=1)
    test_fraction: float = knob(0.2, help="Share of each label's documents in the probe test split (reported; chooses nothing).", gt=0, lt=1)
    k_values: list[int] = knob(factory=lambda: [1, 2, 5, 10, 20, 50], help="k of the k-sparse probes (SAEBench: 1, 2, 5; its schema up to 100).")
    bootstrap_resamples: int = knob(1000, help="Bootstrap resamples of test documents behind each accuracy's 95% interval.", ge=10)
    absorption_words: int | None = knob(1000, help="Alphabetic vocabulary words drawn (by seed) for the absorption task, split 80/20; null: all (slow on CPU).", ge=50)
    absorption_min_letters: int = knob(20, help="Letters whose ground-truth probe needs test F1 > 0.6 before absorption is reported (SAEBench: 20).", ge=2, le=26)
    absorption_batch_size: int = knob(32, help="Prompts per model forward in the absorption task.", ge=1)
    core_tokens: int = knob(32768, help="Validation tokens (non-special) behind the core result file's reconstruction and density numbers.", ge=1)
    n_splice_contexts: int = knob(8, help="Validation contexts run with the SAE spliced in and zero-ablated for the core file's CE and KL.", ge=1)

    def check(self, prefix: str) -> None:
        if not self.k_values or any(k < 1 for k in self.k_values):
            raise ParamsError(f"{prefix}.k_values: {self.k_values!r} is not allowed (allowed: a non-empty list of k >= 1)")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ParamsError(f"{prefix}.validation_fraction + {prefix}.test_fraction: must leave documents to train on (sum < 1)")
