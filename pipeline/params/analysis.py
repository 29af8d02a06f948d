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


@dataclass
class SteerParams:
    """Causal steering evaluation (the ``steer`` stage). Coefficients are in units of each feature's
    own scale m_f (its max, or a quantile, measured on our activations), so 1.0 means "as strongly as
    the feature ever writes"."""

    hook: str | None = knob(None, help="Hook whose SAE is steered (null: the first of extract.hooks).")
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

    def check(self, prefix: str) -> None:
        if not self.coefficients:
            raise ParamsError(f"{prefix}.coefficients: [] is empty (give at least one coefficient)")
        if not self.methods:
            raise ParamsError(f"{prefix}.methods: [] is empty (allowed: {', '.join(STEER_METHODS)})")
        if len(self.prompts) < 2:
            raise ParamsError(f"{prefix}.prompts: need at least 2 prompts (one validation, one test)")
        if any(f < 0 for f in self.features):
            raise ParamsError(f"{prefix}.features: {self.features} has a negative feature index")
        check_backend(self.judge, f"{prefix}.judge", "none")
