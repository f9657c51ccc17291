//! The decoder-only transformer the four families share (llama, qwen2, qwen3, gemma3): each
//! family file turns its `config.json` into a [`Spec`] and this file builds and runs it.

use candle_core::{DType, Device, Module, Result, Tensor, D};

use crate::layers::{
    attention_mask, packed_attention_mask, packed_positions, softmax_last_dim, Activation,
    Embedding, GatedMlp, Linear, Mode, Positions, RmsNorm, RopeScaling, Rotary,
};
use crate::weights::Weights;

/// What differs between the families, in one place.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm on each head of q and k before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Norms after attention and around the MLP (Gemma 3's sandwich).
    pub sandwich_norms: bool,
    /// Embeddings multiplied by √hidden (Gemma).
    pub scale_embeddings: bool,
    /// Attention scores scaled by this instead of 1/√head_dim (Gemma's query_pre_attn_scalar).
    pub attention_scale: Option<f64>,
    /// Per layer: the sliding window of a local-attention layer, `None` for global ones.
    pub sliding_windows: Vec<Option<usize>>,
    /// RoPE base of the local (sliding-window) layers, where it differs (Gemma 3).
    pub rope_local_theta: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// What HF checkpoints leave out of RMSNorm weights (Gemma scales by `1 + w`): the model
    /// holds `offset + w`; writers of HF checkpoints subtract it.
    pub hf_norm_offset: f64,
}

/// Keys and values of the tokens seen so far, one entry per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Tokens held (the position the next token gets).
    pub fn len(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.layers.clear();
    }

    /// Rows (sequences) of the batch: the first dimension of the keys.
    pub fn rows(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .and_then(|(k, _)| k.dim(0).ok())
            .unwrap_or(0)
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|layer| match layer {
                Some((k, v)) => Ok(Some((f(k)?, f(v)?))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// The cache with `n` empty (zero) positions before the first: left padding added to
    /// every row, which the attention mask then hides.
    pub fn pad_left(&self, n: usize) -> Result<Self> {
        if n == 0 {
            return Ok(self.clone());
        }
        self.map(|t| {
            // (b, kv_heads, t, d)
            let (b, h, _, d) = t.dims4()?;
            let zeros = Tensor::zeros((b, h, n, d), t.dtype(), t.device())?;
            Tensor::cat(&[&zeros, t], 2)
        })
    }

    /// The cache without its first `n` positions (padding every row has).
    pub fn drop_front(&self, n: usize) -> Result<Self> {
        let len = self.len();
        self.map(|t| t.narrow(2, n.min(len), len - n.min(len)))
    }

    /// The rows `rows` of the batch, in that order.
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        let Some((k, _)) = self.layers.iter().flatten().next() else {
            return Ok(self.clone());
        };
        let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let ids = Tensor::new(ids.as_slice(), k.device())?;
        self.map(|t| t.index_select(&ids, 0))
    }

    /// The rows of `self` then those of `other`, which must hold as many positions.
    pub fn append_rows(&self, other: &Self) -> Result<Self> {
        if self.rows() == 0 {
            return Ok(other.clone());
        }
        let layers = self
            .layers
            .iter()
            .zip(&other.layers)
            .map(|pair| match pair {
                (Some((k, v)), Some((k2, v2))) => {
                    Ok(Some((Tensor::cat(&[k, k2], 0)?, Tensor::cat(&[v, v2], 0)?)))
                }
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Attention {
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    pub(crate) o_proj: Linear,
    pub(crate) q_norm: Option<RmsNorm>,
    pub(crate) k_norm: Option<RmsNorm>,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) scale: f64,
    pub(crate) sliding_window: Option<usize>,
    local_rope: bool,
    /// q, k and v stacked into one quantized layer (inference on the CPU kernels).
    pub(crate) qkv: Option<Linear>,
}

impl Attention {
    fn new(spec: &Spec, layer: usize, w: &Weights, prefix: &str) -> Result<Self> {
        let (hidden, heads, kv_heads, d) = (
            spec.hidden_size,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
        );
        let norm = |name: &str| -> Result<Option<RmsNorm>> {
            if spec.qk_norm {
                Ok(Some(w.rms_norm(
                    &format!("{prefix}.{name}"),
                    d,
                    spec.rms_norm_eps,
                )?))
            } else {
                Ok(None)
            }
        };
        let sliding_window = spec.sliding_windows.get(layer).copied().flatten();
        let proj = |name: &str, out: usize| {
            w.linear(&format!("{prefix}.{name}"), hidden, out, spec.qkv_bias)
        };
        let (q_proj, k_proj, v_proj) = (
            proj("q_proj", heads * d)?,
            proj("k_proj", kv_heads * d)?,
            proj("v_proj", kv_heads * d)?,
        );
        Ok(Self {
            qkv: Linear::fused_quantized(&[&q_proj, &k_proj, &v_proj])?,
            q_proj,
            k_proj,
            v_proj,
            o_proj: w.linear(&format!("{prefix}.o_proj"), heads * d, hidden, false)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: d,
            scale: spec.attention_scale.unwrap_or((d as f64).powf(-0.5)),
            sliding_window,
            local_rope: sliding_window.is_some() && spec.rope_local_theta.is_some(),
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        step: &Step,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, seq, _) = xs.dims3()?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            // (b, seq, n * d) → (b, n, seq, d)
            t.reshape((b, seq, n, self.head_dim))?.transpose(1, 2)
        };
        let (q, k, v) = match (&self.qkv, step.mode) {
            (Some(qkv), Mode::Inference) => {
                let all = qkv.forward(xs)?;
                let (nq, nkv) = (
                    self.num_heads * self.head_dim,
                    self.num_kv_heads * self.head_dim,
                );
                (
                    all.narrow(D::Minus1, 0, nq)?,
                    all.narrow(D::Minus1, nq, nkv)?,
                    all.narrow(D::Minus1, nq + nkv, nkv)?,
                )
            }
            _ => (
                self.q_proj.forward(xs)?,
                self.k_proj.forward(xs)?,
                self.v_proj.forward(xs)?,
            ),
        };
        let mut q = heads(q, self.num_heads)?;
        let mut k = heads(k, self.num_kv_heads)?;
        let v = heads(v, self.num_kv_heads)?.contiguous()?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q.contiguous()?, step.mode)?;
            k = kn.forward(&k.contiguous()?, step.mode)?;
        }
        let rotary = if self.local_rope {
            step.local_rotary.unwrap_or(step.rotary)
        } else {
            step.rotary
        };
        let q = rotary.apply(&q, &step.positions, step.mode)?;
        let k = rotary.apply(&k, &step.positions, step.mode)?;
        let (k, v) = match cache.take() {
            Some((past_k, past_v)) => (
                Tensor::cat(&[&past_k, &k], 2)?,
                Tensor::cat(&[&past_v, &v], 2)?,
            ),
            None => (k, v),
        };
        if step.use_cache {
            *cache = Some((k.clone(), v.clone()));
        }
        let mask = if self.sliding_window.is_some() {
            &step.local_mask
        } else {
            &step.mask
        };
        if step.mode == Mode::Differentiable {
            // (b, h, seq, d) → (b, seq, h * d)
            let out = crate::autograd::attention(&q, &k, &v, mask.as_ref(), self.scale)?
                .transpose(1, 2)?
                .reshape((b, seq, self.num_heads * self.head_dim))?;
            return self.o_proj.forward(&out);
        }
        // Grouped-query attention without copying keys and values per query head: the query
        // heads sharing a kv head are stacked along the sequence axis.
        let group = self.num_heads / self.num_kv_heads;
        let t = k.dim(2)?;
        let d = self.head_dim;
        // (b, h, seq, d) → (b, kv_heads, group * seq, d)
        let q = q
            .contiguous()?
            .reshape((b, self.num_kv_heads, group * seq, d))?;
        // (b, kv, group * seq, d) x (b, kv, d, t) → (b, h, seq, t)
        let scores = (q.matmul(&k.t()?)? * self.scale)?.reshape((b, self.num_heads, seq, t))?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = softmax_last_dim(&scores, step.mode)?.reshape((
            b,
            self.num_kv_heads,
            group * seq,
            t,
        ))?;
        // (b, kv, group * seq, t) x (b, kv, t, d) → (b, h, seq, d) → (b, seq, h * d)
        let out = probs
            .matmul(&v)?
            .reshape((b, self.num_heads, seq, d))?
            .transpose(1, 2)?
            .reshape((b, seq, self.num_heads * d))?;
        self.o_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct DecoderLayer {
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) self_attn: Attention,
    /// Gemma 3: applied to the attention output.
    pub(crate) post_attention_norm: Option<RmsNorm>,
    /// The norm before the MLP (`post_attention_layernorm` in llama, `pre_feedforward_layernorm`
    /// in Gemma 3).
    pub(crate) pre_mlp_norm: RmsNorm,
    pub(crate) mlp: GatedMlp,
    /// gate and up stacked into one quantized layer (inference on the CPU kernels).
    pub(crate) gate_up: Option<Linear>,
    pub(crate) post_feedforward_norm: Option<RmsNorm>,
}

impl DecoderLayer {
    fn new(spec: &Spec, layer: usize, w: &Weights) -> Result<Self> {
        let prefix = format!("model.layers.{layer}");
        let (hidden, eps) = (spec.hidden_size, spec.rms_norm_eps);
        let norm = |name: &str| w.rms_norm(&format!("{prefix}.{name}"), hidden, eps);
        let mlp =
            |name: &str, i: usize, o: usize| w.linear(&format!("{prefix}.mlp.{name}"), i, o, false);
        let (post_attention_norm, pre_mlp_norm, post_feedforward_norm) = if spec.sandwich_norms {
            (
                Some(norm("post_attention_layernorm")?),
                norm("pre_feedforward_layernorm")?,
                Some(norm("post_feedforward_layernorm")?),
            )
        } else {
            (None, norm("post_attention_layernorm")?, None)
        };
        let mlp = GatedMlp {
            gate_proj: mlp("gate_proj", hidden, spec.intermediate_size)?,
            up_proj: mlp("up_proj", hidden, spec.intermediate_size)?,
            down_proj: mlp("down_proj", spec.intermediate_size, hidden)?,
            activation: spec.activation,
        };
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::new(spec, layer, w, &format!("{prefix}.self_attn"))?,
            post_attention_norm,
            pre_mlp_norm,
            gate_up: mlp.fused_gate_up()?,
            mlp,
            post_feedforward_norm,
        })
    }

    /// q, k, v, o, gate, up, down: the order a forward pass runs them in.
    pub(crate) fn linears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    /// The LoRA dropout of the layer's adapters, if any.
    pub(crate) fn lora_dropout(&self) -> Option<&std::sync::Arc<crate::lora::LoraDropout>> {
        self.linears().into_iter().find_map(|linear| match linear {
            Linear::Lora(lora) => lora.dropout.as_ref(),
            _ => None,
        })
    }

    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        step: &Step,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let mode = step.mode;
        let mut h =
            self.self_attn
                .forward(&self.input_layernorm.forward(xs, mode)?, step, cache)?;
        if let Some(norm) = &self.post_attention_norm {
            h = norm.forward(&h, mode)?;
        }
        let xs = (xs + h)?;
        let gate_up = match mode {
            Mode::Inference => self.gate_up.as_ref(),
            Mode::Differentiable => None,
        };
        let mut h = self
            .mlp
            .forward_with(&self.pre_mlp_norm.forward(&xs, mode)?, gate_up)?;
        if let Some(norm) = &self.post_feedforward_norm {
            h = norm.forward(&h, mode)?;
        }
        xs + h
    }
}

/// What every layer of one forward pass shares.
pub(crate) struct Step<'a> {
    positions: Positions,
    rotary: &'a Rotary,
    local_rotary: Option<&'a Rotary>,
    mask: Option<Tensor>,
    local_mask: Option<Tensor>,
    mode: Mode,
    use_cache: bool,
}

/// A decoder-only language model with its LM head.
#[derive(Debug, Clone)]
pub struct CausalLm {
    pub(crate) spec: Spec,
    pub(crate) embed_tokens: Embedding,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: RmsNorm,
    pub(crate) lm_head: Linear,
    pub(crate) rotary: Rotary,
    local_rotary: Option<Rotary>,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
}

/// Options of one forward pass.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions<'a> {
    pub mode: Mode,
    /// Left padding of each row of a batch (tokens to ignore at the start).
    pub left_padding: Option<&'a [usize]>,
    /// Logits of the last position only (generation) rather than all positions (training).
    pub last_only: bool,
    /// Stop at the final norm: hidden states instead of logits.
    pub hidden_only: bool,
    /// Packed rows (training, no cache): for every token (b·seq, row-major) the column where
    /// its document starts in its row. A token then attends only to the earlier tokens of its
    /// own document, at rotary positions counted from that start.
    pub doc_starts: Option<&'a [u32]>,
}

impl CausalLm {
    pub fn new(spec: Spec, w: &Weights) -> Result<Self> {
        let dtype = w.dtype();
        let device = w.device().clone();
        let embed_tokens = w.embedding("model.embed_tokens", spec.vocab_size, spec.hidden_size)?;
        let lm_head = if spec.tie_word_embeddings || !w.contains("lm_head.weight") {
            embed_tokens.as_linear()?
        } else {
            w.linear("lm_head", spec.hidden_size, spec.vocab_size, false)?
        };
        let layers = (0..spec.num_layers)
            .map(|i| DecoderLayer::new(&spec, i, w))
            .collect::<Result<Vec<_>>>()?;
        let max = spec.max_position_embeddings;
        let rotary = Rotary::new(
            spec.head_dim,
            spec.rope_theta,
            &spec.rope_scaling,
            max,
            dtype,
            &device,
        )?;
        let local_rotary = match spec.rope_local_theta {
            Some(theta) => Some(Rotary::new(
                spec.head_dim,
                theta,
                &RopeScaling::None,
                max,
                dtype,
                &device,
            )?),
            None => None,
        };
        Ok(Self {
            norm: w.rms_norm("model.norm", spec.hidden_size, spec.rms_norm_eps)?,
            embed_tokens,
            layers,
            lm_head,
            rotary,
            local_rotary,
            spec,
            dtype,
            device,
        })
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A fresh cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
        }
    }

    /// ids (b, seq) after the `cache.len()` tokens already seen → logits (b, seq, vocab), or
    /// (b, 1, vocab) with `last_only`. Pass `None` as cache to run without one (training).
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        options: &ForwardOptions,
    ) -> Result<Tensor> {
        // The whole pass runs on the compute pool's threads: parallel kernels inside it then
        // hand work between those threads only, instead of waking them from this one each time.
        match compute_pool() {
            Some(pool) => pool.install(|| self.forward_on_pool(ids, cache, options)),
            None => self.forward_on_pool(ids, cache, options),
        }
    }

    fn forward_on_pool(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        options: &ForwardOptions,
    ) -> Result<Tensor> {
        let (b, seq) = ids.dims2()?;
        // Without a cache (training) the layers still need somewhere to put their keys and
        // values for this pass; it is made only then, not on every decoding step.
        let mut scratch;
        let use_cache = cache.is_some();
        let cache = match cache {
            Some(cache) => {
                if cache.layers.len() != self.layers.len() {
                    *cache = self.new_cache();
                }
                cache
            }
            None => {
                scratch = self.new_cache();
                &mut scratch
            }
        };
        let past = cache.len();
        if past + seq > self.rotary.max_positions() {
            candle_core::bail!(
                "{} tokens do not fit the model's {} positions",
                past + seq,
                self.rotary.max_positions()
            );
        }
        let step = self.step(b, seq, past, options, use_cache)?;
        let mut xs = self.embed(ids)?;
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            xs = layer.forward(&xs, &step, layer_cache)?;
        }
        if options.last_only {
            xs = xs.narrow(1, seq - 1, 1)?.contiguous()?;
        }
        let xs = self.norm.forward(&xs, options.mode)?;
        if options.hidden_only {
            return Ok(xs);
        }
        self.logits_from_hidden(&xs)
    }

    /// What every layer of a pass over `seq` tokens after `past` shares: positions and masks.
    pub(crate) fn step(
        &self,
        b: usize,
        seq: usize,
        past: usize,
        options: &ForwardOptions,
        use_cache: bool,
    ) -> Result<Step<'_>> {
        if let Some(starts) = options.doc_starts {
            return self.packed_step(b, seq, past, starts, options, use_cache);
        }
        let positions = match options.left_padding {
            Some(padding) if padding.iter().any(|&p| p > 0) => {
                let rows: Vec<u32> = padding
                    .iter()
                    .flat_map(|&pad| (past..past + seq).map(move |p| p.saturating_sub(pad) as u32))
                    .collect();
                Positions::PerRow(Tensor::from_vec(rows, (b, seq), &self.device)?)
            }
            _ => Positions::Contiguous {
                start: past,
                len: seq,
            },
        };
        let mask = attention_mask(
            b,
            seq,
            past,
            None,
            options.left_padding,
            self.dtype,
            &self.device,
        )?;
        let window = self.spec.sliding_windows.iter().flatten().next().copied();
        let local_mask = match window {
            Some(w) => attention_mask(
                b,
                seq,
                past,
                Some(w),
                options.left_padding,
                self.dtype,
                &self.device,
            )?,
            None => None,
        };
        Ok(Step {
            positions,
            rotary: &self.rotary,
            local_rotary: self.local_rotary.as_ref(),
            mask,
            local_mask,
            mode: options.mode,
            use_cache,
        })
    }

    /// [`Self::step`] for packed rows.
    fn packed_step(
        &self,
        b: usize,
        seq: usize,
        past: usize,
        doc_starts: &[u32],
        options: &ForwardOptions,
        use_cache: bool,
    ) -> Result<Step<'_>> {
        if past > 0 || use_cache || options.left_padding.is_some() {
            candle_core::bail!("packed rows are for training: no cache and no left padding")
        }
        let mask =
            |window| packed_attention_mask(b, seq, doc_starts, window, self.dtype, &self.device);
        let window = self.spec.sliding_windows.iter().flatten().next().copied();
        Ok(Step {
            positions: packed_positions(b, seq, doc_starts, &self.device)?,
            rotary: &self.rotary,
            local_rotary: self.local_rotary.as_ref(),
            mask: Some(mask(None)?),
            local_mask: window.map(|w| mask(Some(w))).transpose()?,
            mode: options.mode,
            use_cache,
        })
    }

    /// ids (b, seq) → embeddings (b, seq, hidden), scaled where the family scales them.
    pub(crate) fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let xs = self.embed_tokens.forward(ids, self.dtype)?;
        if !self.spec.scale_embeddings {
            return Ok(xs);
        }
        // Gemma rounds √hidden to the activations' dtype before multiplying.
        let scale = Tensor::new((self.spec.hidden_size as f32).sqrt(), &self.device)?
            .to_dtype(self.dtype)?;
        xs.broadcast_mul(&scale)
    }

    /// The final (normed) hidden states of a pass without cache: ids (b, seq) → (b, seq,
    /// hidden). Training picks the positions it scores and runs [`Self::logits_from_hidden`]
    /// on those only, instead of materialising (b, seq, vocab) logits.
    pub fn hidden_states(&self, ids: &Tensor, mode: Mode) -> Result<Tensor> {
        self.hidden_states_packed(ids, mode, None)
    }

    /// [`Self::hidden_states`] of packed rows (see [`ForwardOptions::doc_starts`]).
    pub fn hidden_states_packed(
        &self,
        ids: &Tensor,
        mode: Mode,
        doc_starts: Option<&[u32]>,
    ) -> Result<Tensor> {
        let options = ForwardOptions {
            mode,
            hidden_only: true,
            doc_starts,
            ..ForwardOptions::default()
        };
        self.forward(ids, None, &options)
    }

    /// hidden (.., hidden) → logits (.., vocab)
    pub fn logits_from_hidden(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(hidden)?;
        match self.spec.final_logit_softcapping {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }

    /// Logits of the last position of a single sequence: ids (seq) → (vocab), f32.
    pub fn next_token_logits(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let options = ForwardOptions {
            last_only: true,
            ..ForwardOptions::default()
        };
        self.forward(&input, Some(cache), &options)?
            .squeeze(0)?
            .squeeze(0)?
            .to_dtype(DType::F32)
    }
}

/// The threads model computations run on: `RAYON_NUM_THREADS`, else one per core; `None`
/// when no thread could be started (computations then run on the caller's thread).
pub fn compute_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("medcoder-compute-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// Greedy argmax of f32 logits (vocab).
pub fn argmax(logits: &Tensor) -> Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-layer cache whose keys and values are `rows` of scalars per position.
    fn cache(rows: &[&[f32]]) -> KvCache {
        let t = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let k = Tensor::from_vec(flat, (rows.len(), 1, t, 1), &Device::Cpu).unwrap();
        KvCache {
            layers: vec![Some((k.clone(), k)), None],
        }
    }

    fn keys(cache: &KvCache) -> Vec<Vec<f32>> {
        let (k, v) = cache.layers[0].as_ref().unwrap();
        assert_eq!(k.dims(), v.dims());
        k.squeeze(3).unwrap().squeeze(1).unwrap().to_vec2().unwrap()
    }

    #[test]
    fn cache_rows_are_padded_joined_selected_and_trimmed() {
        let a = cache(&[&[1.0, 2.0]]);
        let padded = a.pad_left(2).unwrap();
        assert_eq!((padded.len(), padded.rows()), (4, 1));
        assert_eq!(keys(&padded), [[0.0, 0.0, 1.0, 2.0]]);
        let both = padded
            .append_rows(&cache(&[&[3.0, 4.0, 5.0, 6.0]]))
            .unwrap();
        assert_eq!(keys(&both), [[0.0, 0.0, 1.0, 2.0], [3.0, 4.0, 5.0, 6.0]]);
        assert!(both.layers[1].is_none());
        let second = both.select_rows(&[1]).unwrap();
        assert_eq!(keys(&second), [[3.0, 4.0, 5.0, 6.0]]);
        let first = both.select_rows(&[0]).unwrap().drop_front(2).unwrap();
        assert_eq!(keys(&first), [[1.0, 2.0]]);
        assert_eq!(KvCache::default().append_rows(&a).unwrap().rows(), 1);
    }
}
