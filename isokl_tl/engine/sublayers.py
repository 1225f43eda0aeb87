"""The arithmetic of a block around its attention, shared by the fast decoders (`engine.fast`,
`engine.graph`): Q/K/V from the residual, and from the attention's output on to the next block's
normalised input, with TransformerLens's hook points firing where they would in `model(...)`.

Each fusion applies only where no hook could tell: joined projections (`engine.fusion`), a residual
add with the RMSNorm after it in one Triton launch (`kernels.block.add_rms_norm`), and the
attention output or MLP down projection summed into that launch from split-K pieces
(`kernels.splitk.project_add_rms_norm`), and the gated MLP's silu(gate) * up inside its gate/up multiply
(`kernels.gate_up`). `Sublayers` is a mixin: it reads the decoder's model,
flags and kernels, which `FastDecoder.__init__` sets.
"""

from torch import Tensor

from isokl_tl.engine import fusion


class Sublayers:
    """A block's arithmetic around attention, for a decoder that sets `model`, `joined`, `norm`,
    `linear`, `kernels`, `splitk`, `gated`, `shared` and the architecture flags (`post_norm`, `head_norm`,
    `sandwich`, `parallel`)."""

    def _qkv(self, i: int, resid: Tensor, x: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Block i up to its (unrotated) Q, K and V, with TransformerLens's hooks: returns the
        hooked residual and q, k, v. Pre-norm blocks normalise the input (`x`: already
        normalised, by `_add_norm`); OLMo-2 blocks (post-norm) do not, and normalise the whole
        projected Q and K instead (QK norm); Qwen3 blocks normalise each head of Q and K."""
        block = self.model.blocks[i]
        attn = block.attn
        if x is None:
            resid = block.hook_resid_pre(resid)
            x = resid if self.post_norm else self.norm(block.ln1, resid)
        q, k, v = fusion.qkv(attn, self.joined[i], x, self.linear)    # fires hook_q/k/v
        if self.head_norm:                  # as TransformerLens: RMSNorm over d_head, rows flattened
            q = self.norm(attn.q_norm, q.reshape(-1, q.shape[-1])).reshape(q.shape)
            k = self.norm(attn.k_norm, k.reshape(-1, k.shape[-1])).reshape(k.shape)
        if self.post_norm:
            q = self.norm(attn.q_norm, q.reshape(*q.shape[:2], -1)).reshape(q.shape)
            k = self.norm(attn.k_norm, k.reshape(*k.shape[:2], -1)).reshape(k.shape)
        return resid, q, k, v

    def _add_norm(self, resid: Tensor, delta: Tensor, hooks: list, ln) -> tuple[Tensor, Tensor | None]:
        """(resid + delta through `hooks`, then `ln` of it, or None for `ln` None): one Triton
        kernel on CUDA when neither the hooks nor the norm's own hooks carry anything."""
        if (self.kernels is not None and ln is not None and fusion.plain_rms(ln)
                and not any(fusion.has_hook(h) for h in hooks)):
            done = self.kernels.add_rms_norm(resid, delta, ln.w, ln.eps)
            if done is not None:
                return done
        resid = resid + delta
        for hook in hooks:
            resid = hook(resid)
        return resid, None if ln is None else self.norm(ln, resid)

    def _project_add_norm(self, resid: Tensor, inp: Tensor, w: Tensor, bias: Tensor | None, hooks: list, ln
                          ) -> tuple[Tensor, Tensor] | None:
        """(resid + linear(inp, w, bias) through `hooks`, then `ln` of it) as a split-K multiply whose
        pieces the add + RMSNorm launch adds (`kernels.splitk.project_add_rms_norm`); None where
        that does not apply: no such kernels (off CUDA, not bf16), a hook in `hooks`, a norm that
        is not a plain RMSNorm, or operands the kernels do not take."""
        if (self.splitk is None or ln is None or not fusion.plain_rms(ln)
                or any(fusion.has_hook(h) for h in hooks)):
            return None
        return self.splitk.project_add_rms_norm(resid, inp, w, bias, ln.w, ln.eps)

    def _finish(self, i: int, resid: Tensor, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """Block i from the attention's per-head output z ([batch, pos, head, d_head]) on: the
        residual after it, and (when `_project_add_norm` or `_add_norm` could fuse it) the next
        block's normalised input, or the final norm's after the last block."""
        m = self.model
        block = m.blocks[i]
        attn = block.attn
        z = attn.hook_z(z)
        w = attn.W_O.permute(2, 0, 1).reshape(attn.W_O.shape[2], -1)
        plain = not (self.sandwich or self.parallel or self.post_norm)      # pre-norm: the add reads the output
        z = z.reshape(*z.shape[:2], -1)
        done = plain and self._project_add_norm(resid, z, w, attn.b_O,
                                                [block.hook_attn_out, block.hook_resid_mid], block.ln2)
        if done:
            return self._finish_mlp(i, *done)
        attn_out = self.linear(z, w, attn.b_O)
        if self.sandwich:
            attn_out = self.norm(block.ln1_post, attn_out)
        if self.parallel:                   # resid_post = resid_pre + attn(ln1(.)) + mlp(ln2(.)), as TL adds them
            attn_out = block.hook_attn_out(attn_out)
            mlp_in = self.norm(block.ln2, resid)
            mlp_out = block.hook_mlp_out(fusion.mlp(block.mlp, self.joined[i], mlp_in, self.kernels, self.linear))
            return block.hook_resid_post(resid + attn_out + mlp_out), None
        if self.post_norm:
            attn_out = self.norm(block.ln1, attn_out)
            resid_mid = block.hook_resid_mid(resid + block.hook_attn_out(attn_out))
            mlp_out = fusion.mlp(block.mlp, self.joined[i], resid_mid, self.kernels, self.linear)
            mlp_out = self.norm(block.ln2, mlp_out)
            return block.hook_resid_post(resid_mid + block.hook_mlp_out(mlp_out)), None
        resid_mid, x = self._add_norm(resid, block.hook_attn_out(attn_out), [block.hook_resid_mid], block.ln2)
        return self._finish_mlp(i, resid_mid, x)

    def _finish_mlp(self, i: int, resid_mid: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """A pre-norm block from its normalised resid_mid `x` on (see `_finish`)."""
        m = self.model
        block = m.blocks[i]
        # the norm the add after the MLP feeds: the final one, none (the rows widen next), the next block's
        if i + 1 == m.cfg.n_layers:
            hooks, ln = [block.hook_resid_post], m.ln_final
        elif self.shared.widens_after(i):
            hooks, ln = [block.hook_resid_post], None
        else:
            hooks, ln = [block.hook_resid_post, m.blocks[i + 1].hook_resid_pre], m.blocks[i + 1].ln1
        mlp, joined = block.mlp, self.joined[i]
        if joined.gate_up is None:
            mlp_out = mlp(x)
        else:
            hidden = fusion.mlp_hidden(mlp, joined, x, self.kernels, self.linear, self.gated)
            done = not self.sandwich and self._project_add_norm(resid_mid, hidden, mlp.W_out.T, mlp.b_out,
                                                                [block.hook_mlp_out] + hooks, ln)
            if done:
                return done
            mlp_out = self.linear(hidden, mlp.W_out.T.contiguous(), mlp.b_out)
        if self.sandwich:
            mlp_out = self.norm(block.ln2_post, mlp_out)
        return self._add_norm(resid_mid, block.hook_mlp_out(mlp_out), hooks, ln)
