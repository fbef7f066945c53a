//! What each stage holds: the bytes of the weights its model reads, and the device's figures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use turbo_core::{memory_usage, reset_peak_memory, Progress, Result, Stage, StageReport};

/// Adds up the bytes of every tensor read through the `VarBuilder`s it wraps.
#[derive(Debug, Clone, Default)]
pub(super) struct WeightBytes(Arc<AtomicU64>);

impl WeightBytes {
    /// A `VarBuilder` serving `vb`'s tensors and counting each one it hands out.
    pub(super) fn counting(&self, vb: VarBuilder<'static>) -> VarBuilder<'static> {
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let backend = Counting {
            inner: vb,
            bytes: self.clone(),
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device)
    }

    pub(super) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, tensor: &Tensor) {
        let bytes = tensor.elem_count() * tensor.dtype().size_in_bytes();
        self.0.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

struct Counting {
    inner: VarBuilder<'static>,
    bytes: WeightBytes,
}

impl SimpleBackend for Counting {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self
            .inner
            .get_with_hints_dtype(shape, name, init, dtype)?
            .to_device(device)?;
        self.bytes.add(&tensor);
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self
            .inner
            .get_unchecked_dtype(name, dtype)?
            .to_device(device)?;
        self.bytes.add(&tensor);
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Times a stage and measures the device's peak during it.
pub(super) struct StageMeter {
    started: Instant,
}

impl StageMeter {
    /// Starts a new peak measurement on `device`.
    pub(super) fn start(device: &Device) -> Result<Self> {
        reset_peak_memory(device)?;
        Ok(Self {
            started: Instant::now(),
        })
    }

    /// Reports `stage` as done, having held `resident_bytes` of weights.
    pub(super) fn finish(
        self,
        stage: Stage,
        resident_bytes: u64,
        device: &Device,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        // Reading the device's memory waits for its queued work: the time is taken after.
        let device_memory = memory_usage(device)?;
        let report = StageReport {
            stage,
            elapsed: self.started.elapsed(),
            resident_bytes,
            device_memory,
        };
        tracing::debug!(?report, "stage done");
        progress.stage_done(&report);
        Ok(())
    }
}
