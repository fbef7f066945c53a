//! Choosing between ways to run one product (cuBLASLt's algorithms, the W8A8 GEMM kernels) by
//! timing each on the device, on the real operands, the first time a shape is seen.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::WrapErr;
use candle_core::Result;

/// Rounds of timing: each candidate is timed once per round, in turn, and keeps its fastest
/// round, so that a GPU clock still rising during the first rounds favours no candidate (with
/// one timing per candidate in order, the first ones ran slowest).
const ROUNDS: usize = 3;
/// Launches per timing.
const TIMED_RUNS: usize = 2;

/// Milliseconds per launch of each candidate's fastest round, in the candidates' order; `None`
/// for a candidate whose first launch failed. That first launch is not timed: it also pays for
/// loading the candidate's kernel.
pub(crate) fn time_candidates<C>(
    stream: &Arc<CudaStream>,
    candidates: &[C],
    mut launch: impl FnMut(&C) -> Result<()>,
) -> Result<Vec<Option<f32>>> {
    let mut times: Vec<Option<f32>> = candidates
        .iter()
        .map(|candidate| launch(candidate).is_ok().then_some(f32::INFINITY))
        .collect();
    for _ in 0..ROUNDS {
        for (candidate, time) in candidates.iter().zip(&mut times) {
            if let Some(best) = time {
                *best = best.min(time_launches(stream, || launch(candidate))?);
            }
        }
    }
    Ok(times)
}

/// The index of the fastest candidate that ran.
pub(crate) fn fastest(times: &[Option<f32>]) -> Option<usize> {
    times
        .iter()
        .enumerate()
        .filter_map(|(index, time)| time.map(|ms| (index, ms)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(index, _)| index)
}

/// Milliseconds of [`TIMED_RUNS`] launches, per launch.
fn time_launches(stream: &Arc<CudaStream>, mut launch: impl FnMut() -> Result<()>) -> Result<f32> {
    let start = stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .w()?;
    for _ in 0..TIMED_RUNS {
        launch()?;
    }
    let end = stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .w()?;
    Ok(start.elapsed_ms(&end).w()? / TIMED_RUNS as f32)
}
