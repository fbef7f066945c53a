//! Device memory accounting: what is allocated now and the high-water mark since the last reset.
//!
//! On CUDA, candle allocates through the stream-ordered allocator (`cuMemAllocAsync`), so the
//! device's default memory pool counts every tensor byte: its `USED_MEM_CURRENT` and
//! `USED_MEM_HIGH` attributes are the figures reported here. Memory outside the pool (the CUDA
//! context, cuBLAS workspaces, loaded kernels) is not included. The CPU has no such counter:
//! [`memory_usage`] returns `None` there. [`available_memory`] is what a stage may still
//! allocate (the default memory budget of the pipeline).

use candle_core::Device;

use crate::Result;

/// Bytes of device memory held by tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryUsage {
    /// Allocated now.
    pub in_use: u64,
    /// The most allocated at once since the last [`reset_peak_memory`] (or since start).
    pub peak: u64,
}

impl MemoryUsage {
    /// Bytes as GiB, for display.
    pub fn gib(bytes: u64) -> f64 {
        bytes as f64 / (1u64 << 30) as f64
    }
}

/// The memory `device` holds in tensors now and at its peak; `None` on the CPU. Waits for the
/// device's queued work first, so that the figures include it.
pub fn memory_usage(device: &Device) -> Result<Option<MemoryUsage>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda_pool::usage(cuda).map(Some),
        _ => Ok(None),
    }
}

/// Lets `device`'s memory pool keep the memory tensors free, for the next allocations, instead
/// of giving it back to the driver at every synchronisation (the pool's default release
/// threshold is 0). With the default, an allocation after a synchronisation maps its pages
/// afresh: on an H100, keeping it took the 1.3B linears' per-call time, every call waited
/// for, from 0.27 to 0.22 ms and from 1.73 to 1.24–1.43 ms (`docs/performance.md`, v12).
/// PyTorch's caching allocator keeps freed memory likewise. The kept memory stays reusable by this process's
/// tensors (and [`available_memory`] counts it as available); it is not available to other
/// processes or to allocations outside the pool. [`DeviceSpec::open`](crate::DeviceSpec::open)
/// calls this; call it on a device made otherwise. No-op on the CPU.
pub fn keep_freed_memory(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda_pool::keep_freed(cuda),
        _ => Ok(()),
    }
}

/// Starts a new peak measurement: the peak becomes the memory in use now. No-op on the CPU.
pub fn reset_peak_memory(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda_pool::reset_peak(cuda),
        _ => Ok(()),
    }
}

/// Bytes a new stage can allocate on `device`: on CUDA the device's free memory plus what the
/// memory pool holds reserved but unused (freed tensors the pool keeps for reuse); on the CPU
/// the memory the operating system says is available (`MemAvailable` of `/proc/meminfo`), so
/// that a request too large for the host fails with a typed error instead of an allocation
/// abort. `None` where that figure cannot be read (other systems, other devices).
pub fn available_memory(device: &Device) -> Result<Option<u64>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda_pool::available(cuda).map(Some),
        Device::Cpu => Ok(host_available_memory()),
        #[allow(unreachable_patterns)]
        _ => Ok(None),
    }
}

/// `MemAvailable` of `/proc/meminfo` in bytes; `None` where the file or the line is absent.
fn host_available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&meminfo)
}

/// The `MemAvailable:   123456 kB` line of a `/proc/meminfo` text, in bytes.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(feature = "cuda")]
mod cuda_pool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::CudaDevice;

    use super::MemoryUsage;
    use crate::{Error, Result};

    pub(super) fn usage(device: &CudaDevice) -> Result<MemoryUsage> {
        let pool = default_pool(device)?;
        Ok(MemoryUsage {
            in_use: attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            )?,
            peak: attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            )?,
        })
    }

    pub(super) fn available(device: &CudaDevice) -> Result<u64> {
        let pool = default_pool(device)?;
        let (free, _total) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
            .map_err(|e| driver_error("cuMemGetInfo", e))?;
        let reserved = attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
        )?;
        let used = attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        )?;
        Ok(free as u64 + reserved.saturating_sub(used))
    }

    pub(super) fn reset_peak(device: &CudaDevice) -> Result<()> {
        let pool = default_pool(device)?;
        // The driver accepts only 0 here: it resets the high-water mark to the current use.
        let mut zero: u64 = 0;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        // SAFETY: `pool` is the device's live default pool and `zero` outlives the call.
        let status = unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&raw mut zero).cast()) };
        check(status, "cuMemPoolSetAttribute(USED_MEM_HIGH)")
    }

    pub(super) fn keep_freed(device: &CudaDevice) -> Result<()> {
        let pool = default_pool(device)?;
        let mut threshold = u64::MAX;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
        // SAFETY: `pool` is the device's live default pool; the threshold is a 64-bit integer
        // that outlives the call.
        let status = unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&raw mut threshold).cast()) };
        check(status, "cuMemPoolSetAttribute(RELEASE_THRESHOLD)")
    }

    fn default_pool(device: &CudaDevice) -> Result<sys::CUmemoryPool> {
        let stream = device.cuda_stream();
        stream
            .synchronize()
            .map_err(|e| driver_error("synchronize", e))?;
        let context = stream.context();
        context
            .bind_to_thread()
            .map_err(|e| driver_error("bind context", e))?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: `pool` is a valid out-pointer and the device handle comes from a live context.
        let status = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()) };
        check(status, "cuDeviceGetDefaultMemPool")?;
        Ok(pool)
    }

    fn attribute(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Result<u64> {
        let mut value: u64 = 0;
        // SAFETY: the used-memory attributes are 64-bit integers written to `value`.
        let status = unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&raw mut value).cast()) };
        check(status, "cuMemPoolGetAttribute")?;
        Ok(value)
    }

    fn check(status: sys::CUresult, call: &str) -> Result<()> {
        match status {
            sys::CUresult::CUDA_SUCCESS => Ok(()),
            other => Err(Error::Candle(candle_core::Error::Msg(format!(
                "{call} failed: {other:?}"
            )))),
        }
    }

    fn driver_error(call: &str, error: impl std::fmt::Display) -> Error {
        Error::Candle(candle_core::Error::Msg(format!("{call} failed: {error}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       16318412 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(parse_mem_available(text), Some(8_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
        assert_eq!(
            parse_mem_available("MemAvailable: 99999999999999999999 kB\n"),
            None
        );
    }

    #[test]
    fn the_cpu_has_a_budget_where_the_host_says_how_much_is_free() {
        let budget = available_memory(&Device::Cpu).unwrap();
        if std::path::Path::new("/proc/meminfo").exists() {
            assert!(budget.is_some_and(|bytes| bytes > 0), "{budget:?}");
        }
    }
}
