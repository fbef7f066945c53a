//! The bounded FIFO of jobs waiting for the device, and the job it is running.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::job::JobId;

/// Why a running job is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `DELETE /v1/videos/{id}`: the job ends canceled.
    Canceled,
    /// The server is shutting down: the job goes back to the queue for the next start.
    Shutdown,
}

/// Set by a handler, read by the worker at every denoising step.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicU8>);

impl StopFlag {
    fn request(&self, reason: StopReason) {
        let code = match reason {
            StopReason::Canceled => 1,
            StopReason::Shutdown => 2,
        };
        // The first reason wins: a job canceled by its user stays canceled at shutdown.
        let _ = self
            .0
            .compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn requested(&self) -> Option<StopReason> {
        match self.0.load(Ordering::SeqCst) {
            1 => Some(StopReason::Canceled),
            2 => Some(StopReason::Shutdown),
            _ => None,
        }
    }
}

/// What a cancel request found.
#[derive(Debug, PartialEq, Eq)]
pub enum Cancel {
    /// The job was waiting; it is out of the queue.
    Dequeued,
    /// The job is running; it stops at its next step.
    Stopping,
    /// The job is neither waiting nor running.
    NotActive,
}

/// Jobs waiting, oldest first, and the running one.
pub struct JobQueue {
    state: Mutex<QueueState>,
    wake: Condvar,
    capacity: usize,
}

#[derive(Default)]
struct QueueState {
    waiting: VecDeque<JobId>,
    running: Option<(JobId, StopFlag)>,
    closed: bool,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    Full { capacity: usize },
    Closed,
}

impl JobQueue {
    /// A queue holding at most `capacity` waiting jobs.
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a new job, unless the queue is full or closed; `record` runs under the queue's
    /// lock first (storing the job), so a job is never run before it is recorded.
    pub fn push<E>(
        &self,
        id: JobId,
        record: impl FnOnce() -> Result<(), E>,
    ) -> Result<Result<(), E>, PushError> {
        let mut state = self.lock();
        if state.closed {
            return Err(PushError::Closed);
        }
        if state.waiting.len() >= self.capacity {
            return Err(PushError::Full {
                capacity: self.capacity,
            });
        }
        if let Err(e) = record() {
            return Ok(Err(e));
        }
        state.waiting.push_back(id);
        self.wake.notify_one();
        Ok(Ok(()))
    }

    /// Queues jobs recovered from the store, whatever the capacity (they were accepted).
    pub fn restore(&self, ids: impl IntoIterator<Item = JobId>) {
        self.lock().waiting.extend(ids);
        self.wake.notify_one();
    }

    /// Waits for the next job and marks it running; `None` once the queue is closed.
    pub fn next(&self) -> Option<(JobId, StopFlag)> {
        let mut state = self.lock();
        loop {
            if state.closed {
                return None;
            }
            if let Some(id) = state.waiting.pop_front() {
                let flag = StopFlag::default();
                state.running = Some((id.clone(), flag.clone()));
                return Some((id, flag));
            }
            state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The running job is over.
    pub fn finish_running(&self) {
        self.lock().running = None;
    }

    /// Takes a waiting job out of the queue, or asks the running one to stop. `on_dequeued`
    /// runs under the lock (recording the cancel), so the worker cannot pick the job up
    /// between the two.
    pub fn cancel(&self, id: &JobId, on_dequeued: impl FnOnce()) -> Cancel {
        let mut state = self.lock();
        if let Some(position) = state.waiting.iter().position(|w| w == id) {
            state.waiting.remove(position);
            on_dequeued();
            return Cancel::Dequeued;
        }
        match &state.running {
            Some((running, flag)) if running == id => {
                flag.request(StopReason::Canceled);
                Cancel::Stopping
            }
            _ => Cancel::NotActive,
        }
    }

    /// The place of a waiting job in line, from 0.
    pub fn position(&self, id: &JobId) -> Option<usize> {
        self.lock().waiting.iter().position(|w| w == id)
    }

    /// Takes no more jobs, wakes the worker and asks the running job to stop for the shutdown.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        if let Some((_, flag)) = &state.running {
            flag.request(StopReason::Shutdown);
        }
        self.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(queue: &JobQueue, id: &JobId) -> Result<(), PushError> {
        queue
            .push(id.clone(), || Ok::<(), ()>(()))
            .map(|recorded| recorded.unwrap())
    }

    #[test]
    fn jobs_come_out_in_order_and_the_queue_is_bounded() {
        let queue = JobQueue::new(2);
        let (a, b, c) = (JobId::generate(), JobId::generate(), JobId::generate());
        push(&queue, &a).unwrap();
        push(&queue, &b).unwrap();
        assert_eq!(push(&queue, &c), Err(PushError::Full { capacity: 2 }));
        assert_eq!(queue.position(&b), Some(1));
        assert_eq!(queue.next().unwrap().0, a);
        push(&queue, &c).unwrap();
        assert_eq!(queue.next().unwrap().0, b);
    }

    #[test]
    fn cancel_dequeues_a_waiting_job_and_flags_the_running_one() {
        let queue = JobQueue::new(4);
        let (a, b) = (JobId::generate(), JobId::generate());
        push(&queue, &a).unwrap();
        push(&queue, &b).unwrap();
        let (running, flag) = queue.next().unwrap();
        assert_eq!(running, a);
        let mut recorded = false;
        assert_eq!(queue.cancel(&b, || recorded = true), Cancel::Dequeued);
        assert!(recorded);
        assert_eq!(queue.cancel(&a, || ()), Cancel::Stopping);
        assert_eq!(flag.requested(), Some(StopReason::Canceled));
        queue.close();
        assert_eq!(
            flag.requested(),
            Some(StopReason::Canceled),
            "first reason kept"
        );
        queue.finish_running();
        assert_eq!(queue.cancel(&a, || ()), Cancel::NotActive);
        assert!(queue.next().is_none());
        assert_eq!(push(&queue, &b), Err(PushError::Closed));
    }
}
