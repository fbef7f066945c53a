//! Loading the DiT from files: single safetensors, sharded folders with an index, repack
//! prefixes, `config.json` beside the weights, and the errors a wrong file gives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::json;
use turbo_attention::Attention;
use turbo_core::{Error, KeyProblem};
use turbo_models::wan::{DitCheckpointInfo, PatchLayout, WanConfig, WanModel};
use turbo_models::Checkpoint;

mod common;

use common::DitCase;

/// A fresh folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("turbo-dit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Golden {
    case: DitCase,
}

impl std::ops::Deref for Golden {
    type Target = DitCase;

    fn deref(&self) -> &DitCase {
        &self.case
    }
}

impl Golden {
    fn open() -> Self {
        Self {
            case: DitCase::open("dit_t2v_sla"),
        }
    }

    fn weights(&self, prefix: &str) -> HashMap<String, Tensor> {
        let weights = self.file.weights().unwrap();
        weights
            .into_iter()
            .map(|(n, t)| (format!("{prefix}{n}"), t))
            .collect()
    }

    /// The published `config.json` fields.
    fn write_config_json(&self, dir: &Path) {
        let c = &self.cfg;
        let config = json!({
            "_class_name": "WanModel", "model_type": "t2v", "dim": c.dim, "ffn_dim": c.ffn_dim,
            "freq_dim": c.freq_dim, "in_dim": c.in_dim, "out_dim": c.out_dim, "num_heads": c.num_heads,
            "num_layers": c.num_layers, "eps": c.eps, "text_len": c.text_len, "text_dim": c.text_dim,
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    }

    fn assert_matches(&self, model: &WanModel<Box<dyn Attention>>) {
        let err = self.velocity_error(&self.velocity(model));
        assert!(err <= 1e-4, "relative error {err}");
    }

    fn load(
        &self,
        path: &Path,
        cfg: Option<&WanConfig>,
    ) -> turbo_core::Result<WanModel<Box<dyn Attention>>> {
        WanModel::from_checkpoint(path, cfg, &self.attention, DType::F32, &Device::Cpu)
    }
}

#[test]
fn single_file_with_config_json_beside() {
    let golden = Golden::open();
    let dir = TempDir::new("single");
    let file = dir.0.join("TurboWan-tiny.safetensors");
    candle_core::safetensors::save(&golden.weights(""), &file).unwrap();
    golden.write_config_json(&dir.0);
    let info = DitCheckpointInfo::inspect(&Checkpoint::open(&file).unwrap()).unwrap();
    assert_eq!(
        (info.patch, info.has_proj_l, info.quantized_linears),
        (PatchLayout::Linear, true, 0)
    );
    golden.assert_matches(&golden.load(&file, None).unwrap());
}

#[test]
fn sharded_folder_with_index() {
    let golden = Golden::open();
    let dir = TempDir::new("sharded");
    let (mut first, mut second) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (name, tensor)) in golden.weights("").into_iter().enumerate() {
        let (shard, file) = if i % 2 == 0 {
            (&mut first, "model-00001-of-00002.safetensors")
        } else {
            (&mut second, "model-00002-of-00002.safetensors")
        };
        weight_map.insert(name.clone(), json!(file));
        shard.insert(name, tensor);
    }
    candle_core::safetensors::save(&first, dir.0.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&second, dir.0.join("model-00002-of-00002.safetensors"))
        .unwrap();
    let index = json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        dir.0.join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    golden.assert_matches(&golden.load(&dir.0, Some(&golden.cfg)).unwrap());
}

#[test]
fn repack_prefix_is_recognised() {
    let golden = Golden::open();
    let dir = TempDir::new("prefix");
    let file = dir.0.join("repack.safetensors");
    candle_core::safetensors::save(&golden.weights("model.diffusion_model."), &file).unwrap();
    golden.assert_matches(&golden.load(&file, Some(&golden.cfg)).unwrap());
}

#[test]
fn wrong_files_are_reported_before_loading() {
    let golden = Golden::open();
    let dir = TempDir::new("errors");

    let file = dir.0.join("no-config.safetensors");
    candle_core::safetensors::save(&golden.weights(""), &file).unwrap();
    let err = golden.load(&file, None).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("no-config.safetensors"),
        "{err}"
    );

    let mut weights = golden.weights("");
    weights.remove("blocks.1.cross_attn.o.bias");
    weights.insert(
        "blocks.0.ffn.0.weight".into(),
        Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let file = dir.0.join("broken.safetensors");
    candle_core::safetensors::save(&weights, &file).unwrap();
    match golden.load(&file, Some(&golden.cfg)) {
        Err(err @ Error::CheckpointKeys { .. }) => {
            let text = err.to_string();
            for needle in [
                "broken.safetensors",
                "blocks.1.cross_attn.o.bias",
                "blocks.0.ffn.0.weight",
                "[3, 3]",
            ] {
                assert!(text.contains(needle), "{needle} not in: {text}");
            }
        }
        other => panic!("expected CheckpointKeys, got {other:?}"),
    }

    let mut weights = golden.weights("");
    let weight = weights.remove("blocks.0.self_attn.q.weight").unwrap();
    weights.insert(
        "blocks.0.self_attn.q.int8_weight".into(),
        weight.to_dtype(DType::U8).unwrap(),
    );
    weights.insert(
        "blocks.0.self_attn.q.scale".into(),
        Tensor::ones((1, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    // A file with some int8 block linears must hold all of them as int8: every float one left
    // is reported by key.
    let file = dir.0.join("tiny-quant.safetensors");
    candle_core::safetensors::save(&weights, &file).unwrap();
    match golden.load(&file, Some(&golden.cfg)) {
        Err(Error::CheckpointKeys { path, problems }) => {
            assert_eq!(path, file);
            let keys: Vec<String> = problems
                .iter()
                .map(|problem| match problem {
                    KeyProblem::Missing { key, .. }
                    | KeyProblem::Unexpected { key, .. }
                    | KeyProblem::WrongShape { key, .. } => key.clone(),
                })
                .collect();
            for key in [
                "blocks.0.self_attn.k.int8_weight",
                "blocks.1.ffn.2.scale",
                "blocks.0.self_attn.k.weight",
            ] {
                assert!(keys.iter().any(|k| k == key), "{key} not in {keys:?}");
            }
            assert!(!keys.iter().any(|k| k.starts_with("blocks.0.self_attn.q.")));
        }
        other => panic!("expected CheckpointKeys, got {other:?}"),
    }
}
