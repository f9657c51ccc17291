//! `medcoder export gguf`: a model (with a LoRA adapter folded in, when given) written as one
//! GGUF file that llama.cpp, Ollama and our own loader run, with its tokenizer and chat template
//! in the metadata, and an Ollama `Modelfile` beside it.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use medcoder_models::gguf_export::{
    gguf_tensors, model_metadata, write_gguf, ExportQuant, TensorChoice,
};
use medcoder_models::gguf_tokenizer_export::{copy_tokenizer_metadata, hf_tokenizer_metadata};
use medcoder_models::lora::{apply_peft_adapter, merge_adapters};
use medcoder_models::LoadedModel;
use serde::Serialize;

use crate::TrainError;

#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub out: PathBuf,
    /// `general.name`: the file's stem.
    pub name: String,
    pub modelfile: PathBuf,
    pub base: PathBuf,
    pub adapter: Option<PathBuf>,
    pub quant: ExportQuant,
    pub modules_merged: usize,
    pub tensors: usize,
    pub bytes: u64,
    pub modelfile_bytes: u64,
    /// Tensors written in another type than the quantization asks for (rows that do not split
    /// into its blocks).
    pub fallbacks: Vec<TensorChoice>,
    /// Whether the Modelfile carries a TEMPLATE (a ChatML template translated for Ollama); if
    /// not, Ollama uses the chat template embedded in the GGUF.
    pub modelfile_template: bool,
}

/// The model's dense tensors by HF name, in our model files' convention (Gemma norms `1 + w`,
/// which is GGUF's too), after folding `adapter` in.
fn merged_tensors(
    model: &mut LoadedModel,
    adapter: Option<&Path>,
) -> Result<(HashMap<String, Tensor>, usize), TrainError> {
    model.lm.dequantize()?;
    let mut merged = 0;
    if let Some(adapter) = adapter {
        apply_peft_adapter(&mut model.lm, adapter)?;
        merged = merge_adapters(&mut model.lm)?;
    }
    let mut tensors = HashMap::new();
    model.lm.visit_parameters_mut(|name, tensor| {
        tensors
            .entry(name.to_string())
            .or_insert_with(|| tensor.clone());
        Ok(())
    })?;
    Ok((tensors, merged))
}

/// Export `model` (the adapter folded in) as a GGUF file at `out`, and `Modelfile` beside it;
/// both are written to temp files and renamed into place.
pub fn export_gguf(
    mut model: LoadedModel,
    adapter: Option<&Path>,
    quant: ExportQuant,
    out: &Path,
) -> Result<ExportReport, TrainError> {
    let (tensors, modules_merged) = merged_tensors(&mut model, adapter)?;
    let spec = model.lm.spec().clone();
    let name = out
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let mut metadata = model_metadata(model.family, &spec, &name, quant)?;
    if model.source.is_dir() {
        metadata.extend(hf_tokenizer_metadata(
            &model.source,
            spec.vocab_size,
            &model.stop_token_ids,
        )?);
    } else {
        let content = medcoder_models::loader::read_gguf(&model.source)?;
        metadata.extend(copy_tokenizer_metadata(&content.metadata));
    }
    let (written, choices) = gguf_tensors(model.family, &spec, &tensors, quant)?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs_err::create_dir_all(&parent)?;
    let temp = parent.join(format!(".{name}.gguf.partial-{}", std::process::id()));
    crate::atomic::write_through(out, &temp, |temp| {
        let mut file = BufWriter::new(fs_err::File::create(temp)?);
        write_gguf(&mut file, &metadata, &written)?;
        file.flush()?;
        Ok(())
    })?;
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tokens: Vec<&str> = metadata
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| v.to_vec().ok())
        .map(|list| {
            list.iter()
                .filter_map(|t| t.to_string().ok())
                .map(String::as_str)
                .collect()
        })
        .unwrap_or_default();
    let (modelfile_text, modelfile_template) = modelfile(&file_name, &model, &tokens);
    let modelfile = parent.join("Modelfile");
    crate::atomic::write_file(&modelfile, modelfile_text.as_bytes())?;
    crate::atomic::sync_dir(&parent);
    Ok(ExportReport {
        out: out.to_path_buf(),
        name,
        bytes: fs_err::metadata(out)?.len(),
        modelfile_bytes: modelfile_text.len() as u64,
        modelfile,
        base: model.source.clone(),
        adapter: adapter.map(Path::to_path_buf),
        quant,
        modules_merged,
        tensors: written.len(),
        fallbacks: choices
            .into_iter()
            .filter(TensorChoice::fell_back)
            .collect(),
        modelfile_template,
    })
}

/// The ChatML template as an Ollama (Go) template.
const CHATML_GO: &str = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n";

/// Ollama's `Modelfile`: FROM the GGUF, a TEMPLATE only when the chat template is plain ChatML
/// (anything else is left to the template in the GGUF, which Ollama reads), and a stop
/// parameter per stop token. Returns the text and whether it has a TEMPLATE.
fn modelfile(gguf_name: &str, model: &LoadedModel, tokens: &[&str]) -> (String, bool) {
    let mut text = format!("FROM ./{gguf_name}\n");
    let template = model.tokenizer.chat_template.as_ref().map(|t| t.source());
    let chatml = template.is_some_and(|t| {
        t.contains("'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'")
            && !t.contains("tool")
    });
    if chatml {
        text.push_str(&format!("TEMPLATE \"\"\"{CHATML_GO}\"\"\"\n"));
    } else if template.is_some() {
        text.push_str(
            "# TEMPLATE: the chat template embedded in the GGUF (tokenizer.chat_template) is used\n",
        );
    }
    for id in &model.stop_token_ids {
        if let Some(token) = tokens.get(*id as usize) {
            if !token.is_empty() && !token.contains('"') {
                text.push_str(&format!("PARAMETER stop \"{token}\"\n"));
            }
        }
    }
    (text, chatml)
}
