"""Run MindFormers 2.1.0 models on a CPU (test helper, MindSpore test venv only).

Three Ascend-only kernels are replaced by the same arithmetic in ops a CPU has; names, parameter
shapes and fused weight layouts are untouched, so what loads strictly here loads on Ascend too:
- `FusedRMSNorm` (`RmsNorm` op): MindFormers' own reduce-mean `RMSNorm`;
- `Outer` (RoPE frequencies): a broadcast multiply;
- `FlashAttentionScore`: causal softmax attention in BNSD layout (query/key/value cast to fp16
  first, as the Ascend kernel computes; the masked positions are those the mask marks 1).
Legacy models: the RoPE `BatchMatMul` cannot broadcast on CPU; `ops.matmul` does. ChatGLM2 (glm-n):
its RMSNorm, as above.
"""

import numpy as np
from mindspore import ops  # module level: MindSpore's graph compiler resolves a construct's globals here


def _rms_norm(self, x):
    """RMSNorm by reduce-mean, in the norm's compute dtype (what the fused kernel computes)."""
    original_type = x.dtype
    x = ops.cast(x, self.compute_type)
    factor = ops.rsqrt(ops.mean(ops.square(x), -1, keep_dims=True) + self.eps)
    return ops.cast(x * factor * self.weight, original_type)


def apply():
    import mindformers.parallel_core.training_graph.base_models.common.embeddings.rotary_pos_embedding as rope
    import mindformers.parallel_core.training_graph.transformer.flash_attention as fa
    import mindformers.parallel_core.training_graph.transformer.norm as norm
    import mindformers.parallel_core.training_graph.transformer.transformer_block as block
    import mindspore as ms
    from mindspore import nn, ops

    block.FusedNorm = norm.Norm
    norm.FusedRMSNorm.construct = _rms_norm

    class Outer(nn.Cell):
        def construct(self, a, b):
            return ops.reshape(a, (-1, 1)) * ops.reshape(b, (1, -1))

    rope.Outer = Outer

    class FlashAttentionScore(nn.Cell):
        def __init__(self, head_num, keep_prob=1.0, scale_value=1.0, pre_tokens=2147483647, next_tokens=0,
                     inner_precise=0, input_layout="BNSD", sparse_mode=0):
            super().__init__()
            assert input_layout == "BNSD", input_layout
            self.scale = scale_value

        def shard(self, *args, **kwargs):
            return self

        def add_prim_attr(self, *args):
            return self

        def construct(self, query, key, value, alibi_mask=None, drop_mask=None, padding_mask=None,
                      attn_mask=None, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None):
            dtype = query.dtype
            q = ops.cast(ops.cast(query, ms.float16), ms.float32)
            k = ops.cast(ops.cast(key, ms.float16), ms.float32)
            v = ops.cast(ops.cast(value, ms.float16), ms.float32)
            heads, kv_heads = q.shape[1], k.shape[1]
            if kv_heads != heads:
                k = ops.repeat_interleave(k, heads // kv_heads, 1)
                v = ops.repeat_interleave(v, heads // kv_heads, 1)
            scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * self.scale
            seq = q.shape[2]
            causal = ms.Tensor(np.triu(np.ones((seq, seq), dtype=np.float32), k=1))
            scores = scores - causal * 1e9
            probs = ops.softmax(scores, -1)
            out = ops.cast(ops.matmul(probs, v), dtype)
            return probs, probs, probs, out

    fa.FlashAttentionScore = FlashAttentionScore


def apply_legacy():
    import mindformers.modules.layers as layers
    import mindspore.ops as ops

    def rotate_half(self, x, swap_mask):  # the rotary embedding's BatchMatMul cannot broadcast on CPU
        return ops.matmul(x, swap_mask)

    layers.RotaryEmbedding.rotate_half = rotate_half


def apply_glm():
    """ChatGLM2's RMSNorm: the fused `RmsNorm` op has no CPU kernel, and its reduce-mean fallback
    (the 910A path) uses a `cast` it never defines; the same arithmetic, written out."""
    import mindformers.models.glm2.glm2_modules as modules

    modules.ChatGLM2RMSNorm.construct = _rms_norm
