//! Opening a model with its tokenizer and chat template, from a GGUF file or a
//! Hugging Face-style directory.

use crate::chat::ChatTemplate;
use crate::config::Config;
use crate::gguf::GgufFile;
use crate::model::Model;
use crate::safetensors::{config_from_json, SafetensorsDir};
use crate::tokenizer::Tokenizer;
use crate::Error;
use std::path::{Path, PathBuf};

pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub path: PathBuf,
    /// A short name for reports (the file or directory name).
    pub name: String,
    /// What identifies the weights and tokenizer (SHA-256, hex): a learned scorer or
    /// a stored compressed context is only ever used with the model it was made for.
    pub fingerprint: String,
}

impl LoadedModel {
    /// A GGUF file, or a directory with config.json, tokenizer.json and *.safetensors.
    pub fn open(path: &Path) -> Result<LoadedModel, Error> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
            .unwrap_or_else(|| path.display().to_string());
        if path.is_dir() {
            Self::open_hf_dir(path, name)
        } else {
            let f = GgufFile::open(path)?;
            let model = Model::from_gguf(&f)?;
            let tokenizer = Tokenizer::from_gguf(&f)?;
            if tokenizer.vocab_size() > model.cfg.vocab {
                return Err(Error::Tokenizer(format!(
                    "the tokenizer has {} tokens but the model only {}",
                    tokenizer.vocab_size(),
                    model.cfg.vocab
                )));
            }
            let template = ChatTemplate::from_gguf(&f);
            Ok(LoadedModel::new(model, tokenizer, template, path, name))
        }
    }

    fn open_hf_dir(dir: &Path, name: String) -> Result<LoadedModel, Error> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            return Err(Error::Format {
                path: dir.to_path_buf(),
                msg: "not a model directory: config.json is missing".into(),
            });
        }
        let cfg: Config = config_from_json(&cfg_path)?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::Tokenizer(format!(
                "{}: tokenizer.json is missing",
                dir.display()
            )));
        }
        let weights = SafetensorsDir::open(dir, cfg.arch)?;
        let model = Model::load(cfg, &weights)?;
        let tokenizer = Tokenizer::from_tokenizer_json(&tok_path)?;
        let template = ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json"));
        Ok(LoadedModel::new(model, tokenizer, template, dir, name))
    }

    /// The model with its fingerprint computed and, if this project ships a KVzap
    /// scorer trained for it, that scorer attached.
    fn new(
        mut model: Model,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        path: &Path,
        name: String,
    ) -> LoadedModel {
        let fingerprint = fingerprint(&model, &tokenizer);
        model.learned = crate::learned::shipped(&fingerprint).map(std::sync::Arc::new);
        LoadedModel {
            model,
            tokenizer,
            template,
            path: path.to_path_buf(),
            name,
            fingerprint,
        }
    }

    /// Attaches the KVzap scorer at `path` (trained with `kvmerger train-scorer`),
    /// refusing one trained for another model.
    pub fn attach_scorer(&mut self, path: &Path) -> Result<(), Error> {
        let s = crate::learned::LearnedScorer::read(path)?;
        if s.fingerprint != self.fingerprint {
            return Err(Error::Format {
                path: path.to_path_buf(),
                msg: format!(
                    "this scorer was trained for another model (fingerprint {}, this model's is {})",
                    short(&s.fingerprint),
                    short(&self.fingerprint)
                ),
            });
        }
        self.model.learned = Some(std::sync::Arc::new(s));
        Ok(())
    }
}

fn short(fp: &str) -> &str {
    &fp[..fp.len().min(12)]
}

/// SHA-256 (hex) of the model's identifying weights ([`Model::fingerprint_into`]) and
/// every token of its vocabulary with its type.
pub fn fingerprint(model: &Model, tokenizer: &Tokenizer) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    model.fingerprint_into(&mut |b| h.update(b));
    for id in 0..tokenizer.vocab_size() as u32 {
        h.update(tokenizer.token_str(id).unwrap_or_default().as_bytes());
        h.update(format!("\0{:?}\0", tokenizer.token_type(id)).as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
