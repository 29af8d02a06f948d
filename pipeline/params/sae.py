"""Params of the SAE stages: architecture, training loop, evaluation. (Owned by the train/evaluate work.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.params.core import ParamsError, knob


@dataclass
class SAEKnobs:
    """The knobs of an SAE's model and loss, defined once: the ``sae`` params section (:class:`SAEParams`) and the
    config a built SAE carries (``pipeline.sae.SAEConfig``, saved as ``cfg.json``) both consist of them."""

    arch: str = knob("topk", help="SAE architecture: a name in the registry pipeline.sae.ARCHS, checked when the SAE is built (built in: relu_l1, topk, batchtopk, matryoshka_batchtopk, transcoder = MLP input -> MLP output, jumprelu, gated, kl = sigmoid + KL sparsity, dense = MLP baseline; a module that registers its own with @pipeline.sae.register adds to them).")
    k: int = knob(32, help="Active latents per token for topk/batchtopk/matryoshka_batchtopk/transcoder (Gao et al. 2024).", ge=1)
    recipe: Literal["2024", "2023"] = knob("2024", help="relu_l1 recipe: '2024' (Anthropic April 2024 update) or '2023' (Towards Monosemanticity: unit-norm decoder, resampling).")
    l1_coeff: float = knob(5.0, help="relu_l1/gated L1 coefficient lambda (inputs scaled so E||x||^2 = d_model).", ge=0.0)
    l1_warmup_steps: int | None = knob(None, help="Steps of linear warm-up of the L1/L0 coefficient (null: 5% of training).", ge=0)
    resample_every: int = knob(25_000, help="relu_l1 2023: steps between dead-latent resamplings, at most 4 (Towards Monosemanticity: 25k).", ge=1)
    l0_coeff: float = knob(1.0, help="jumprelu L0 coefficient lambda.", ge=0.0)
    jumprelu_bandwidth: float = knob(0.001, help="jumprelu straight-through kernel bandwidth epsilon (Rajamanoharan et al. 2024).", gt=0.0)
    jumprelu_init_threshold: float = knob(0.001, help="jumprelu initial threshold theta.", gt=0.0)
    aux_coeff: float = knob(1 / 32, help="topk/batchtopk/matryoshka_batchtopk AuxK coefficient (Gao et al. 2024: 1/32).", ge=0.0)
    k_aux: int | None = knob(None, help="topk/batchtopk/matryoshka_batchtopk AuxK dead latents per token (null: d_model // 2).", ge=1)
    target_rate: float = knob(0.05, help="kl: target mean activation rho of each sigmoid unit.", gt=0.0, lt=1.0)
    kl_coeff: float = knob(3.0, help="kl: weight beta of the KL sparsity penalty.", ge=0.0)
    hidden_sizes: list[int] = knob(factory=lambda: [128, 32, 128], help="dense: hidden widths; the narrowest is the code.", ge=1)
    matryoshka_fractions: list[float] = knob(
        factory=lambda: [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32],
        help="matryoshka_batchtopk: each nested group's share of d_sae, in order (sum 1; all but the last "
        "int(share * d_sae) latents, the last the rest); level l is the prefix of the first l groups. Default: "
        "SAEBench's Matryoshka baseline.", gt=0.0, le=1.0)
    matryoshka_weighting: Literal["dictionary_learning", "bussmann", "saelens"] = knob(
        "dictionary_learning", help="matryoshka_batchtopk: weight of the M levels' reconstruction losses L_l: "
        "'dictionary_learning' = sum L_l / M^2 (its trainer, cited by the paper), 'bussmann' = mean over M + 1 levels "
        "incl. the empty one ||x - b_dec||^2 (bartbussmann/matryoshka_sae), 'saelens' = sum L_l.")
    matryoshka_auxk: Literal["full", "per_level"] = knob(
        "full", help="matryoshka_batchtopk AuxK scope: 'full' = the dictionary's dead latents model the full "
        "reconstruction's residual (dictionary_learning), 'per_level' = each group's dead latents model their own "
        "level's residual, summed (SAELens use_matryoshka_aux_loss).")
    skip: bool = knob(False, help="transcoder: add a skip connection W_skip x, zero-initialised (skip transcoder, Paulo "
                      "et al. 2025).")
    transcoder_activation: Literal["topk", "batchtopk", "jumprelu"] = knob(
        "topk", help="transcoder: 'topk' (sparsify's; exports to sparsify transcode) or 'batchtopk' (inference "
        "threshold; exports to SAELens jumprelu_transcoder / jumprelu_skip_transcoder). 'jumprelu' (a threshold per "
        "latent) is what an imported SAELens JumpReLU or ReLU transcoder holds; it is not trained here.")


@dataclass
class SAEParams(SAEKnobs):
    """The ``sae`` params section: the :class:`SAEKnobs` and the width rule (``pipeline.sae.config_from_params``
    turns it into an ``SAEConfig`` for a hook)."""

    expansion: int = knob(8, help="d_sae = expansion * d_model (ignored by 'dense').", ge=1)
    source: str = knob("train", help="Where the SAE comes from: 'train' (`sae train` trains it), or a published SAE that "
                       "`sae train` imports instead (README, 'Analyse a published SAE'): a local folder, "
                       "'hf:<owner>/<repo>[/<path>][@<revision>]' (hub, cached, offline from the cache) or "
                       "'saelens:<release>/<id>' (SAELens' registry; needs sae-lens installed). An imported SAE "
                       "ignores the other keys of this section and train; its hook must be extract.hooks' only one (a transcoder's: "
                       "its pair, extract.hooks [layers.{i}.mlp_in, layers.{i}.mlp_out]).")
    source_format: Literal["auto", "native", "saelens", "gemmascope", "sparsify", "dictionary_learning"] = knob(
        "auto", help="Layout of the files of sae.source: 'auto' (from the file names), 'native' (this pipeline's), "
        "'saelens', 'gemmascope' (Gemma Scope 1 params.npz or 2 params.safetensors), 'sparsify' (EleutherAI), "
        "'dictionary_learning' (ae.pt + config.json).")

    def check(self, prefix: str) -> None:
        if self.arch == "transcoder" and self.transcoder_activation == "jumprelu" and self.source == "train":
            raise ParamsError(f"{prefix}.transcoder_activation: 'jumprelu' is an imported transcoder's form, not trained "
                              "here (topk or batchtopk; or set sae.source to the published transcoder)")


@dataclass
class TrainParams:
    """The SAE training loop (``sae train``). Defaults fit the embedded CPU pipeline (SmolLM2 layer 9,
    d_sae 4608): 128 steps of 1024 tokens. On a GPU, set ``n_tokens`` to tens of millions,
    ``batch_size`` 4096-16384, ``dead_window_tokens`` 10M and lower ``lr``."""

    device: str = knob("auto", help="'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    batch_size: int = knob(1024, help="Tokens per optimizer step (1024-16384; larger needs a larger lr).", ge=1)
    lr: float = knob(2e-3, help="Peak learning rate. 2e-3 suits the 2,048-step CPU default (SmolLM2 layer 9: FVU 0.133, "
                     "dead 2.5%; 4e-3: 0.146, 27% dead; 1e-3: 0.136, none dead); long runs: ~2e-4 / sqrt(d_sae / 16384) "
                     "(Gao et al. 2024, sec. 2.1).", gt=0, le=1.0)
    optimizer: Literal["adam", "adamw"] = knob("adam", help="'adam' (L2 via weight_decay) or 'adamw' (decoupled weight decay).")
    betas: list[float] = knob(factory=lambda: [0.9, 0.999], help="Adam (beta1, beta2), each in [0, 1).", ge=0.0, lt=1.0)
    weight_decay: float = knob(0.0, help="Weight decay (SAEs usually use 0: sparsity comes from the architecture).", ge=0.0)
    warmup_steps: int = knob(10, help="Linear LR warm-up from 0 over this many steps (0: none).", ge=0)
    decay: Literal["linear", "cosine", "none"] = knob(
        "linear", help="LR decay after warm-up: 'linear' to 0 over the last decay_fraction of steps, 'cosine' to 0, or 'none'.")
    decay_fraction: float = knob(0.2, help="For 'linear': fraction of steps at the end over which LR falls to 0 (Bricken et al. 2023 use 0.2).", gt=0.0, le=1.0)
    grad_clip: float | None = knob(1.0, help="Clip the global gradient norm to this value (null: no clipping).", gt=0.0)
    n_tokens: int | None = knob(2097152, help="Training tokens (null: one pass over the training split; more than the split loops over it, reshuffled).", ge=1)
    log_every: int = knob(8, help="Steps between progress/curve rows; the only host syncs of the loop.", ge=1)
    val_every: int = knob(256, help="Steps between validation passes on the held-out split (0: only at the end). "
                         "> 0 needs each hook's validation dataset (`sae train` stops without it); 0 with none: no validation.", ge=0)
    val_tokens: int = knob(16384, help="Validation tokens per validation pass.", ge=1)
    checkpoint_every: int = knob(256, help="Steps between checkpoints (0: only at the end); a killed run resumes from the last.", ge=0)
    dead_window_tokens: int = knob(65536, help="A latent that has not fired in this many training tokens counts as dead (Gao et al. 2024 use 10M); "
                                   "also the SAE's AuxK/resampling cut-off. Dense = fired on >10% of a window's tokens.", ge=1)
    dtype: Literal["auto", "float32", "bfloat16"] = knob(
        "auto", help="Compute dtype: 'auto' = bfloat16 autocast on GPU and on CPUs with native bf16 (AMX/AVX512-BF16), "
        "else float32. Weights and optimizer stay float32.")
    kernels: Literal["auto", "triton", "sparse", "torch"] = knob(
        "auto", help="topk/batchtopk training step: 'triton' = sparse Triton kernels (Gao et al. 2024), 'sparse' = "
        "sparse step in plain PyTorch (gathers and sparse matmuls; made for the CPU), 'torch' = dense PyTorch, "
        "'auto' = triton on CUDA when Triton is installed, sparse on CPU, else torch. Other archs always use torch.")
    prefetch: int = knob(4, help="Batches read ahead by a background thread (pinned memory + non-blocking copy on CUDA; 0: read inline).", ge=0, le=64)
    processes: int | Literal["auto"] = knob(
        1, help="Data-parallel training processes `sae train` starts on this machine (as torchrun --standalone "
        "--nproc-per-node N; each takes batch_size / N rows of every batch): 1 = this process only, 'auto' = one per "
        "visible GPU (1 without CUDA or with device cpu). Ignored under torchrun, whose world size rules.", ge=1)
    parallel: Literal["data", "latents"] = knob(
        "data", help="How several training processes share the work: 'data' = each takes batch_size / N rows of every "
        "batch, every process holds the whole SAE; 'latents' = each holds a contiguous 1/N of the latents (W_enc "
        "columns, b_enc, W_dec rows and their Adam state; b_dec replicated) and reads the whole batch: for SAEs whose "
        "training state does not fit one device (topk and batchtopk; the dense PyTorch step).")

    def check(self, prefix: str) -> None:
        if len(self.betas) != 2:
            raise ParamsError(f"{prefix}.betas: {self.betas!r} must be two numbers [beta1, beta2]")


@dataclass
class EvaluateParams:
    """SAE evaluation (``sae evaluate``) on the validation split."""

    n_tokens: int | None = knob(None, help="Validation tokens (activation rows, special ones included) read for reconstruction metrics (null: all).", ge=1)
    batch_size: int = knob(4096, help="Tokens per batch for the reconstruction metrics.", ge=1)
    n_splice_contexts: int = knob(32, help="Validation contexts run through the model with the SAE spliced in (0: skip CE/KL metrics).", ge=0)
    splice_batch_size: int = knob(8, help="Contexts per forward pass when splicing.", ge=1)
    device: str = knob("auto", help="'auto' (cuda if present, else cpu), 'cpu', 'cuda', ...")
    exclude_special_tokens: bool = knob(
        True, help="Leave the tokenizer's BOS/EOS/PAD positions out (as SAEBench does): not counted in reconstruction/"
        "sparsity metrics, not spliced (original activation kept) nor counted in CE/KL. Names bump (fvu@3, l0@2, "
        "ce_loss_recovered@2, ...); l0@1, fvu@2, ce_loss_recovered@1, kl_div@1 over all tokens come alongside. "
        "false: the all-token metrics only, as before.")
