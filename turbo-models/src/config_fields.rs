//! Reading a model's construction parameters from a JSON object (an upstream `config.json` or a
//! golden file's config), each missing or mistyped field a typed error naming it.

use serde_json::Value;
use turbo_core::{Error, Result};

/// The fields of one JSON config object.
pub(crate) struct ConfigFields<'a>(pub(crate) &'a Value);

impl ConfigFields<'_> {
    fn field(&self, name: &str) -> Result<&Value> {
        self.0.get(name).ok_or_else(|| invalid(name, "missing"))
    }

    pub(crate) fn usize(&self, name: &str) -> Result<usize> {
        as_usize(self.field(name)?, name)
    }

    pub(crate) fn f64(&self, name: &str) -> Result<f64> {
        self.field(name)?
            .as_f64()
            .ok_or_else(|| invalid(name, "not a number"))
    }

    pub(crate) fn str(&self, name: &str) -> Result<&str> {
        self.field(name)?
            .as_str()
            .ok_or_else(|| invalid(name, "not a string"))
    }

    pub(crate) fn bool(&self, name: &str) -> Result<bool> {
        self.field(name)?
            .as_bool()
            .ok_or_else(|| invalid(name, "not true or false"))
    }

    fn array(&self, name: &str) -> Result<&Vec<Value>> {
        self.field(name)?
            .as_array()
            .ok_or_else(|| invalid(name, "not a list"))
    }

    pub(crate) fn usize_list(&self, name: &str) -> Result<Vec<usize>> {
        self.array(name)?
            .iter()
            .map(|v| as_usize(v, name))
            .collect()
    }

    pub(crate) fn bool_list(&self, name: &str) -> Result<Vec<bool>> {
        self.array(name)?
            .iter()
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| invalid(name, "not a list of booleans"))
            })
            .collect()
    }

    /// A list of exactly three numbers (per-channel RGB constants).
    pub(crate) fn rgb(&self, name: &str) -> Result<[f64; 3]> {
        let values = self
            .array(name)?
            .iter()
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| invalid(name, "not a list of numbers"))
            })
            .collect::<Result<Vec<f64>>>()?;
        values
            .try_into()
            .map_err(|_| invalid(name, "not three numbers"))
    }
}

fn as_usize(value: &Value, name: &str) -> Result<usize> {
    value
        .as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| invalid(name, &format!("{value} is not a non-negative integer")))
}

fn invalid(name: &str, reason: &str) -> Error {
    Error::InvalidConfig {
        field: name.into(),
        reason: reason.into(),
    }
}
