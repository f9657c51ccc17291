//! What a continuous batch's thread takes from its queue between two decode steps: while idle
//! it sleeps until a job comes; while generating it takes only what is already waiting.

use tokio::sync::mpsc;

pub(crate) enum Intake<J> {
    Job(J),
    /// Generating, and nothing waiting: go on decoding.
    NoneWaiting,
    /// Idle and the queue is closed: the thread ends.
    Closed,
}

pub(crate) fn next_job<J>(receiver: &mut mpsc::Receiver<J>, idle: bool) -> Intake<J> {
    if idle {
        match receiver.blocking_recv() {
            Some(job) => Intake::Job(job),
            None => Intake::Closed,
        }
    } else {
        match receiver.try_recv() {
            Ok(job) => Intake::Job(job),
            Err(_) => Intake::NoneWaiting,
        }
    }
}
