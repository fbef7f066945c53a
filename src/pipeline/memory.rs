//! What each stage holds: the bytes of the weights its model reads, and the device's figures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use turbo_core::{memory_usage, reset_peak_memory, Progress, Result, Stage, StageReport};

/// Adds up the bytes of every tensor read through the `VarBuilder`s it wraps onto their
/// device, and keeps the most held at once: a model that drops its weights as it goes (the
/// streamed text encoder) says so with [`WeightBytes::release`].
#[derive(Debug, Clone, Default)]
pub(super) struct WeightBytes(Arc<Held>);

#[derive(Debug, Default)]
struct Held {
    now: AtomicU64,
    peak: AtomicU64,
}

impl WeightBytes {
    /// A `VarBuilder` serving `vb`'s tensors and counting each one it hands out on `vb`'s
    /// device (a tensor read elsewhere, as the text encoder's embedding table on the CPU, does
    /// not count).
    pub(super) fn counting(&self, vb: VarBuilder<'static>) -> VarBuilder<'static> {
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let backend = Counting {
            inner: vb,
            device: device.clone(),
            bytes: self.clone(),
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device)
    }

    /// The most bytes held at once.
    pub(super) fn get(&self) -> u64 {
        self.0.peak.load(Ordering::Relaxed)
    }

    /// Every tensor counted so far has been dropped.
    pub(super) fn release(&self) {
        self.0.now.store(0, Ordering::Relaxed);
    }

    fn add(&self, tensor: &Tensor) {
        let bytes = (tensor.elem_count() * tensor.dtype().size_in_bytes()) as u64;
        let now = self.0.now.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.0.peak.fetch_max(now, Ordering::Relaxed);
    }
}

struct Counting {
    inner: VarBuilder<'static>,
    /// The device whose tensors count.
    device: Device,
    bytes: WeightBytes,
}

impl Counting {
    fn count(&self, tensor: Tensor) -> Tensor {
        if tensor.device().same_device(&self.device) {
            self.bytes.add(&tensor);
        }
        tensor
    }

    /// The wrapped weights, read straight onto `device`.
    fn on(&self, device: &Device) -> VarBuilder<'static> {
        self.inner.clone().set_device(device.clone())
    }
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
            .on(device)
            .get_with_hints_dtype(shape, name, init, dtype)?;
        Ok(self.count(tensor))
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.on(device).get_unchecked_dtype(name, dtype)?;
        Ok(self.count(tensor))
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
