//! `medcoder bench join`: a long prompt joining a continuous batch while another sequence
//! decodes. Chunked prefill (the batch's default: 256 prompt tokens per decode step) side by
//! side, in one run, with the same batch prefilling each joining prompt whole in the step it
//! joins (how it worked before): the decoding sequence's longest wait for a token, and the
//! joining prompt's time to its first token.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::bail;
use medcoder_assets::{MedcoderHome, ModelRef};
use medcoder_infer::{ContinuousBatch, GenerateRequest, SamplingParams, StopConditions};
use medcoder_models::LoadedModel;
use serde::Serialize;

/// The joining prompt: a clinical day note repeated, cut to the prompt length in tokens.
const NOTE_SENTENCE: &str = "Day 3: blood pressure 128 over 76, glucose 142 mg/dL, no chest \
                             pain, tolerating a diabetic diet, creatinine stable at 1.4. ";

#[derive(Debug, clap::Args)]
pub struct JoinBenchArgs {
    /// A generation model (asset alias, folder or GGUF file).
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// Tokens of the joining prompt.
    #[arg(long, default_value_t = 2048)]
    prompt_tokens: usize,
    /// Tokens the running sequence decodes before the prompt joins.
    #[arg(long, default_value_t = 8)]
    before: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct JoinRun {
    /// Prompt tokens per prefill piece (`null`: whole prompts).
    prefill_chunk: Option<usize>,
    /// The running sequence's median step before the prompt joined.
    step_before_ms: f64,
    /// Its longest wait for a token while the prompt joined.
    longest_wait_ms: f64,
    /// From the prompt joining to its first token.
    first_token_ms: f64,
}

#[derive(Debug, Serialize)]
struct JoinBench {
    machine: String,
    model: String,
    threads: usize,
    prompt_tokens: usize,
    chunked: JoinRun,
    whole: JoinRun,
    /// whole / chunked longest wait.
    stall_ratio: f64,
}

pub fn run(args: JoinBenchArgs, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    let resolved = args.model.parse::<ModelRef>()?.resolve(home)?;
    let model =
        medcoder_models::load_model(&resolved, &medcoder_models::DeviceSpec::Cpu.device()?, None)?;
    let mut prompt = model.tokenizer.encode(&NOTE_SENTENCE.repeat(200))?;
    if prompt.len() < args.prompt_tokens {
        bail!(
            "the bench's note gives {} tokens, fewer than --prompt-tokens {}",
            prompt.len(),
            args.prompt_tokens
        );
    }
    prompt.truncate(args.prompt_tokens);
    let chunked = measure(&model, &prompt, args.before, None)?;
    let whole = measure(&model, &prompt, args.before, Some(usize::MAX))?;
    let report = JoinBench {
        machine: super::bench::machine(),
        model: resolved.file.unwrap_or(resolved.dir).display().to_string(),
        threads: medcoder_models::transformer::compute_pool()
            .map_or(1, rayon::ThreadPool::current_num_threads),
        prompt_tokens: prompt.len(),
        stall_ratio: whole.longest_wait_ms / chunked.longest_wait_ms.max(1e-9),
        chunked,
        whole,
    };
    if args.json {
        super::print_json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "join: a {}-token prompt joins a decoding sequence — {}, {} threads",
        report.prompt_tokens,
        report.machine,
        report.threads
    );
    outln!("model: {}", report.model);
    for (name, run) in [
        ("chunked prefill", &report.chunked),
        ("whole prefill", &report.whole),
    ] {
        outln!(
            "{name:<16} step before {:>7.1} ms   longest wait {:>9.1} ms   prompt's first token {:>9.1} ms",
            run.step_before_ms,
            run.longest_wait_ms,
            run.first_token_ms
        );
    }
    outln!(
        "ratio longest wait whole / chunked: {:.1}x",
        report.stall_ratio
    );
    Ok(ExitCode::SUCCESS)
}

/// One sequence decodes `before` tokens alone, then `prompt` joins (one new token); steps are
/// timed until the prompt has its token. `prefill_chunk`: `None` for the batch's default.
fn measure(
    model: &LoadedModel,
    prompt: &[u32],
    before: usize,
    prefill_chunk: Option<usize>,
) -> anyhow::Result<JoinRun> {
    let request = |ids: Vec<u32>, max_new_tokens: usize| GenerateRequest {
        prompt_ids: ids,
        sampling: SamplingParams::default(),
        // No stop token: the running sequence decodes until the measurement ends.
        stop: StopConditions::new(max_new_tokens),
    };
    let mut batch = ContinuousBatch::new(model);
    if let Some(tokens) = prefill_chunk {
        batch = batch.with_prefill_chunk(tokens);
    }
    let running = model.tokenizer.encode("The patient was admitted with")?;
    let refused = |e: Box<(&str, medcoder_infer::InferError)>| anyhow::anyhow!("{}: {}", e.0, e.1);
    batch
        .join(request(running, usize::MAX), Vec::new(), "running")
        .map_err(refused)?;
    // The running sequence's prefill, then `before` timed steps.
    batch.step(|_, _| true).map_err(|f| f.error)?;
    let mut steps = Vec::with_capacity(before);
    for _ in 0..before.max(1) {
        let started = Instant::now();
        batch.step(|_, _| true).map_err(|f| f.error)?;
        steps.push(started.elapsed().as_secs_f64() * 1e3);
    }
    steps.sort_by(f64::total_cmp);
    let step_before_ms = steps[steps.len() / 2];
    batch
        .join(request(prompt.to_vec(), 1), Vec::new(), "joining")
        .map_err(refused)?;
    let joined = Instant::now();
    let mut longest_wait_ms = 0f64;
    loop {
        let started = Instant::now();
        let finished = batch.step(|_, _| true).map_err(|f| f.error)?;
        longest_wait_ms = longest_wait_ms.max(started.elapsed().as_secs_f64() * 1e3);
        if let Some((_, generation)) = finished.into_iter().find(|(tag, _)| *tag == "joining") {
            generation?;
            break;
        }
    }
    Ok(JoinRun {
        prefill_chunk: prefill_chunk.map_or(Some(medcoder_infer::PREFILL_CHUNK), |c| {
            (c != usize::MAX).then_some(c)
        }),
        step_before_ms,
        longest_wait_ms,
        first_token_ms: joined.elapsed().as_secs_f64() * 1e3,
    })
}
