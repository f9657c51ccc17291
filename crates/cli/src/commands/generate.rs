//! `medcoder generate`: continue a prompt (or answer a chat message) with a local model.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use medcoder_assets::MedcoderHome;
use medcoder_infer::{GenerateRequest, SamplingParams, StopConditions};
use medcoder_models::{ChatMessage, DeviceSpec, LoadedModel};

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Model: an asset alias (smollm2-135m-instruct, gemma3-270m), a folder or GGUF file, an
    /// HF repo id in the local hub cache, or a registered `name@VERSION` (its base model with
    /// its adapter). Defaults to the base model of a registered `--adapter`.
    #[arg(long, required_unless_present = "adapter")]
    model: Option<String>,
    /// A LoRA adapter folder in PEFT's format (adapter_config.json +
    /// adapter_model.safetensors), e.g. a `medcoder train` run folder, or a registered model
    /// (`name@production`, `name@staging`, `name@VERSION`).
    #[arg(long, value_name = "DIR|NAME@VERSION")]
    adapter: Option<PathBuf>,
    /// The prompt text (or use --prompt-file).
    #[arg(
        long,
        conflicts_with = "prompt_file",
        required_unless_present = "prompt_file"
    )]
    prompt: Option<String>,
    /// Read the prompt from a file (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<PathBuf>,
    /// Send the prompt as a user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// auto, cpu, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// Print one JSON object (text, tokens, finish reason, speeds) instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: GenerateArgs, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(text), _) => text.clone(),
        (None, Some(path)) if path.as_os_str() == "-" => {
            std::io::read_to_string(std::io::stdin()).context("reading the prompt from stdin")?
        }
        (None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        (None, None) => bail!("give --prompt or --prompt-file"),
    };
    let choice = medcoder_coding::registry::resolve_model_choice(
        args.model.as_deref(),
        args.adapter.as_deref(),
        home,
    )?;
    let resolved = choice.resolve_model(home)?;
    let device = args.device.device()?;
    let loading = Instant::now();
    let mut model = medcoder_models::load_model(&resolved, &device, None)?;
    if let Some(dir) = &choice.adapter {
        let applied = medcoder_models::lora::apply_peft_adapter(&mut model.lm, dir)?;
        let registered = choice.entry.as_ref().map(|e| e.id()).unwrap_or_default();
        tracing::info!(adapter = %dir.display(), registered, modules = applied.modules, rank = applied.rank, "adapter applied");
    }
    tracing::info!(
        family = model.family.as_str(),
        source = %model.source.display(),
        quantized = model.quantized,
        device = ?device,
        seconds = loading.elapsed().as_secs_f64(),
        "model loaded"
    );
    let prompt_ids = prompt_ids(&model, &prompt, &args)?;
    let mut stop = StopConditions::new(args.max_tokens);
    for id in &model.stop_token_ids {
        stop = stop.with_stop_token(*id);
    }
    for text in &args.stop {
        stop = stop.with_stop_string(text.clone());
    }
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        ..SamplingParams::default()
    };
    let request = GenerateRequest {
        prompt_ids,
        sampling,
        stop,
    };
    let stream = !args.json;
    let mut write_error = None;
    let generation = medcoder_infer::generate(&model, request, Vec::new(), |text| {
        if !stream {
            return true;
        }
        let mut out = std::io::stdout().lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => true,
            Err(e) => {
                write_error = Some(e);
                false
            }
        }
    })?;
    if let Some(error) = write_error {
        return Err(error.into());
    }
    tracing::info!(
        prompt_tokens = generation.prompt_tokens,
        generated_tokens = generation.token_ids.len(),
        prompt_tokens_per_s = format!("{:.1}", generation.prefill_tokens_per_second()),
        decode_tokens_per_s = format!("{:.1}", generation.decode_tokens_per_second()),
        finish = ?generation.finish_reason,
        seed = generation.seed,
        "generated"
    );
    if args.json {
        super::print_json(&generation)?;
    } else {
        outln!();
    }
    Ok(ExitCode::SUCCESS)
}

/// The prompt's token ids: as a plain text continuation (with the model's BOS if it uses one),
/// or through the chat template.
fn prompt_ids(model: &LoadedModel, prompt: &str, args: &GenerateArgs) -> anyhow::Result<Vec<u32>> {
    if !args.chat {
        return Ok(model.tokenizer.tokenize(prompt, true, true)?);
    }
    let Some(template) = &model.tokenizer.chat_template else {
        bail!(
            "{} has no chat template (a base model?): drop --chat to continue the prompt as text",
            model.source.display()
        );
    };
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::new("system", system.clone()));
    }
    messages.push(ChatMessage::new("user", prompt));
    let text = template.render(
        &messages,
        true,
        model.tokenizer.bos_token.as_deref(),
        model.tokenizer.eos_token.as_deref(),
    )?;
    Ok(model.tokenizer.encode(&text)?)
}
