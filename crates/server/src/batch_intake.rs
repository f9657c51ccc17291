//! What a continuous batch's thread takes from its queue between two decode steps: while idle
//! it sleeps until a job comes; while generating it takes only what is already waiting. A job
//! taken leaves the queue-depth gauge; one whose client has gone is dropped there.

use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::mpsc;

pub(crate) enum Intake<J> {
    Job(J),
    /// Generating, and nothing waiting: go on decoding.
    NoneWaiting,
    /// Idle and the queue is closed: the thread ends.
    Closed,
}

/// The next job whose client still waits (`gone` says which do not, and may log them);
/// `queue_depth` counts every job taken off the queue.
pub(crate) fn next_job<J>(
    receiver: &mut mpsc::Receiver<J>,
    idle: bool,
    queue_depth: &AtomicI64,
    gone: impl Fn(&J) -> bool,
) -> Intake<J> {
    loop {
        let job = if idle {
            match receiver.blocking_recv() {
                Some(job) => job,
                None => return Intake::Closed,
            }
        } else {
            match receiver.try_recv() {
                Ok(job) => job,
                Err(_) => return Intake::NoneWaiting,
            }
        };
        queue_depth.fetch_sub(1, Ordering::Relaxed);
        if !gone(&job) {
            return Intake::Job(job);
        }
    }
}
