//! Reader for the golden reference files (`fixtures/golden/*.safetensors`).
//!
//! Each file holds weights under checkpoint key names, inputs under `in.*`, expected outputs
//! under `out.*`, and a JSON object with every hyper-parameter in the safetensors metadata field
//! `config`. Tests take every shape and setting from the file, so any file of the same schema
//! passes unchanged.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// Environment variable that points the test suites at another folder of golden files.
pub const GOLDEN_DIR_VAR: &str = "TURBO_GOLDEN_DIR";

/// The folder the golden files are read from: `$TURBO_GOLDEN_DIR` when set, else the
/// workspace's `fixtures/golden/`.
pub fn golden_dir() -> PathBuf {
    std::env::var_os(GOLDEN_DIR_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/golden"))
}

/// One golden file, read into memory.
pub struct GoldenFile {
    path: PathBuf,
    bytes: Vec<u8>,
    config: serde_json::Value,
}

impl GoldenFile {
    /// Opens `<golden_dir>/<name>.safetensors`.
    pub fn open(name: &str) -> Result<Self> {
        Self::from_path(golden_dir().join(format!("{name}.safetensors")))
    }

    pub fn from_path(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let bytes = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let invalid = |reason: String| Error::Golden {
            path: path.clone(),
            reason,
        };
        SafeTensors::deserialize(&bytes)
            .map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
        let (_, metadata) =
            SafeTensors::read_metadata(&bytes).map_err(|e| invalid(format!("bad header: {e}")))?;
        let config_text = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("config"))
            .ok_or_else(|| invalid("no `config` entry in the metadata".into()))?;
        let config = serde_json::from_str(config_text)
            .map_err(|e| invalid(format!("`config` is not JSON: {e}")))?;
        Ok(Self {
            path,
            bytes,
            config,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The JSON `config` object.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// Names of every tensor in the file.
    pub fn names(&self) -> Vec<String> {
        self.tensors()
            .names()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// A floating-point or integer tensor on the CPU, in its stored dtype.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let view = self.view(name)?;
        if view.dtype() == Dtype::I8 {
            return Err(self.error(format!("`{name}` is int8: read it with `i8_values`")));
        }
        Ok(candle_core::safetensors::Load::load(&view, &Device::Cpu)?)
    }

    /// An int8 tensor's values and shape (candle has no int8 dtype).
    pub fn i8_values(&self, name: &str) -> Result<(Vec<i8>, Vec<usize>)> {
        let view = self.view(name)?;
        if view.dtype() != Dtype::I8 {
            return Err(self.error(format!("`{name}` is {:?}, not int8", view.dtype())));
        }
        let values = view.data().iter().map(|&b| b as i8).collect();
        Ok((values, view.shape().to_vec()))
    }

    /// Every tensor that is neither an input (`in.*`) nor an output (`out.*`): the weights, under
    /// their checkpoint names, on the CPU.
    pub fn weights(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        self.names()
            .into_iter()
            .filter(|name| !name.starts_with("in.") && !name.starts_with("out."))
            .map(|name| Ok((name.clone(), self.tensor(&name)?)))
            .collect()
    }

    /// A number from `config`, addressed by a path of keys such as `["blocks", "q128_k64"]`.
    pub fn config_value(&self, path: &[&str]) -> Result<&serde_json::Value> {
        path.iter()
            .try_fold(&self.config, |value, key| value.get(key))
            .ok_or_else(|| self.error(format!("config has no `{}`", path.join("."))))
    }

    /// A number from `config`.
    pub fn config_f64(&self, path: &[&str]) -> Result<f64> {
        let value = self.config_value(path)?;
        value.as_f64().ok_or_else(|| {
            self.error(format!(
                "config `{}` is {value}, not a number",
                path.join(".")
            ))
        })
    }

    fn tensors(&self) -> SafeTensors<'_> {
        // `from_path` has already deserialised these bytes, so this cannot fail.
        SafeTensors::deserialize(&self.bytes).expect("validated in GoldenFile::from_path")
    }

    fn view(&self, name: &str) -> Result<safetensors::tensor::TensorView<'_>> {
        self.tensors()
            .tensor(name)
            .map_err(|_| self.error(format!("no tensor `{name}`")))
    }

    fn error(&self, reason: String) -> Error {
        Error::Golden {
            path: self.path.clone(),
            reason,
        }
    }
}

/// ‖got − want‖ / ‖want‖ in f64, whatever the dtypes and devices.
pub fn relative_error(got: &Tensor, want: &Tensor) -> Result<f64> {
    let got = got
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F64)?;
    let want = want
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F64)?;
    let diff = (&got - &want)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let norm = want.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((diff / norm).sqrt())
}
