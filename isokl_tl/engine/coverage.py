"""What the fast decoders cover: `unsupported_reason` names why a model (its architecture, or a
hook registered on a point the fast path does not fire) must take the reference decoder."""

from transformer_lens import HookedTransformer

from isokl_tl.engine import fusion

UNFIRED_HOOKS = ("hook_rot_k", "hook_attn_scores", "hook_pattern", "hook_result", "hook_attn_in",
                 "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in", "hook_tokens")


def unsupported_reason(model: HookedTransformer) -> str | None:
    """Why the fast path cannot run `model` exactly, or None when it can."""
    c = model.cfg
    checks = [
        (c.positional_embedding_type in ("rotary", "standard"),
         f"{c.positional_embedding_type} positional embeddings"),
        (c.normalization_type in ("RMS", "LN", "LNPre", "RMSPre"), f"normalisation {c.normalization_type}"),
        (not (c.use_attn_in or c.use_split_qkv_input), "split Q/K/V inputs"),
        (getattr(c, "clip_qkv", None) is None, "clipped Q/K/V"),
        (not getattr(c, "use_logn_attn", False), "log-n attention scaling"),
        (not getattr(c, "use_dynamic_ntk_rope", False), "dynamic NTK rotary"),
        (not getattr(c, "use_attention_sinks", False), "attention sinks"),
        (c.attn_types is None or set(c.attn_types) == {"global"} or isinstance(c.window_size, int),
         "local attention without a window size"),
        (c.n_devices == 1, "a model split over devices"),
        (not c.load_in_4bit, "4-bit weights"),
        (c.original_architecture != "OlmoeForCausalLM", "OLMoE's mixture-of-experts blocks"),
        (not getattr(c, "scale_attn_by_inverse_layer_idx", False), "per-layer attention scaling"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    hooked = [name for name, hp in model.hook_dict.items()
              if name.endswith(UNFIRED_HOOKS) and fusion.has_hook(hp)]
    if hooked:
        return f"a hook is registered on {hooked[0]}, which the fast path does not fire"
    return None
