//! The coding engine runs on worker threads fed by a bounded queue, never inside a handler: a
//! handler submits a note and awaits the answer; a full queue is refused at once (503), and a
//! note whose client went away (or timed out) before a worker reached it is dropped unread.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use medcoder_coding::{Coder, CodingError, NotePrediction};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

struct CodingJob {
    id: String,
    text: String,
    reply: oneshot::Sender<Result<NotePrediction, CodingError>>,
}

/// Why a note was not coded.
#[derive(Debug)]
pub enum SubmitError {
    /// The queue is full: try again later.
    Full,
    /// The workers have stopped (shutting down).
    Closed,
}

#[derive(Debug, Clone)]
pub struct CodingQueue {
    sender: mpsc::Sender<CodingJob>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for CodingJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the text: it is PHI.
        f.debug_struct("CodingJob").field("id", &self.id).finish()
    }
}

impl CodingQueue {
    /// Starts `workers` threads sharing `coder`, behind a queue of `capacity` notes. An engine
    /// that codes best in batches (llm) takes every waiting note, up to `max_batch`, at once.
    pub fn start(
        coder: Arc<Coder>,
        workers: usize,
        capacity: usize,
        max_batch: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (sender, receiver) = mpsc::channel::<CodingJob>(capacity);
        let receiver = Arc::new(Mutex::new(receiver));
        let max_batch = if coder.batches() { max_batch.max(1) } else { 1 };
        for worker in 0..workers.max(1) {
            let receiver = receiver.clone();
            let coder = coder.clone();
            let metrics = metrics.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("coding-{worker}"))
                .spawn(move || {
                    while let Some(jobs) = next_jobs(&receiver, max_batch) {
                        metrics
                            .queue_depth
                            .fetch_sub(jobs.len() as i64, Ordering::Relaxed);
                        code_jobs(&coder, jobs, max_batch, &metrics);
                    }
                });
            if let Err(error) = spawned {
                tracing::error!(%error, "could not start a coding worker");
            }
        }
        Self { sender, metrics }
    }

    /// Queues a note; the receiver yields the engine's answer.
    pub fn submit(
        &self,
        id: String,
        text: String,
    ) -> Result<oneshot::Receiver<Result<NotePrediction, CodingError>>, SubmitError> {
        let (reply, answer) = oneshot::channel();
        let job = CodingJob { id, text, reply };
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        match self.sender.try_send(job) {
            Ok(()) => Ok(answer),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => SubmitError::Full,
                    mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
                })
            }
        }
    }

    /// Queues several notes at once, all or none (a batch is not half accepted).
    pub fn submit_all(
        &self,
        notes: Vec<(String, String)>,
    ) -> Result<Vec<oneshot::Receiver<Result<NotePrediction, CodingError>>>, SubmitError> {
        let permits = self
            .sender
            .try_reserve_many(notes.len().max(1))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::Full,
                mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
            })?;
        let mut answers = Vec::with_capacity(notes.len());
        for (permit, (id, text)) in permits.zip(notes) {
            let (reply, answer) = oneshot::channel();
            self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
            permit.send(CodingJob { id, text, reply });
            answers.push(answer);
        }
        Ok(answers)
    }
}

/// The next job, and as many others as are already waiting, up to `max_batch`; `None` once the
/// queue is closed. One worker waits on the queue at a time; the others wait for the lock.
fn next_jobs(
    receiver: &Mutex<mpsc::Receiver<CodingJob>>,
    max_batch: usize,
) -> Option<Vec<CodingJob>> {
    let mut receiver = receiver.lock().ok()?;
    let mut jobs = vec![receiver.blocking_recv()?];
    while jobs.len() < max_batch {
        match receiver.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
    Some(jobs)
}

/// Codes the jobs whose clients are still there and answers each.
fn code_jobs(coder: &Coder, mut jobs: Vec<CodingJob>, max_batch: usize, metrics: &Metrics) {
    jobs.retain(|job| {
        let gone = job.reply.is_closed();
        if gone {
            tracing::debug!(note = job.id, "client gone before coding: skipped");
        }
        !gone
    });
    if jobs.is_empty() {
        return;
    }
    let started = Instant::now();
    let results = if jobs.len() == 1 {
        // The llm engine stops generating when the client goes away.
        let job = &jobs[0];
        vec![coder.code_unless_cancelled(&job.id, &job.text, &|| job.reply.is_closed())]
    } else {
        let notes: Vec<(&str, &str)> = jobs
            .iter()
            .map(|j| (j.id.as_str(), j.text.as_str()))
            .collect();
        coder.code_batch(&notes, max_batch, &|| {
            jobs.iter().all(|j| j.reply.is_closed())
        })
    };
    metrics
        .notes_coded
        .fetch_add(jobs.len() as u64, Ordering::Relaxed);
    tracing::debug!(
        notes = jobs.len(),
        ms = started.elapsed().as_secs_f64() * 1e3,
        "coded"
    );
    for (job, result) in jobs.into_iter().zip(results) {
        let _ = job.reply.send(result);
    }
}
