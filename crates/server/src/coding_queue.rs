//! The coding engine runs on worker threads fed by a bounded queue, never inside a handler
//! (the llm engine on one thread, in a continuous batch): a handler submits a note and awaits
//! the answer; a full queue is refused at once (503), and a note whose client went away (or
//! timed out) before a worker reached it is dropped unread.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use medcoder_coding::{Coder, CodingError, NotePrediction};
use tokio::sync::{mpsc, oneshot};

use crate::batch_intake::{next_job, Intake};
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
    /// Starts `workers` threads sharing `coder`, behind a queue of `capacity` notes; an engine
    /// that codes best in batches (llm) gets one thread instead, coding notes as they arrive in
    /// one continuous batch of up to `max_batch` chunks.
    pub fn start(
        coder: Arc<Coder>,
        workers: usize,
        capacity: usize,
        max_batch: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (sender, receiver) = mpsc::channel::<CodingJob>(capacity);
        if coder.batches() {
            let shared = metrics.clone();
            let spawned = std::thread::Builder::new()
                .name("coding-llm".into())
                .spawn(move || continuous_loop(&coder, receiver, max_batch, &shared));
            if let Err(error) = spawned {
                tracing::error!(%error, "could not start the coding engine's thread");
            }
            return Self { sender, metrics };
        }
        let receiver = Arc::new(Mutex::new(receiver));
        for worker in 0..workers.max(1) {
            let receiver = receiver.clone();
            let coder = coder.clone();
            let metrics = metrics.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("coding-{worker}"))
                .spawn(move || {
                    while let Some(job) = next_shared_job(&receiver) {
                        metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                        code_job(&coder, job, &metrics);
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

/// The next job; `None` once the queue is closed. One worker waits on the queue at a time; the
/// others wait for the lock.
fn next_shared_job(receiver: &Mutex<mpsc::Receiver<CodingJob>>) -> Option<CodingJob> {
    receiver.lock().ok()?.blocking_recv()
}

/// Codes the job if its client is still there, and answers it.
fn code_job(coder: &Coder, job: CodingJob, metrics: &Metrics) {
    if job.reply.is_closed() {
        tracing::debug!(note = job.id, "client gone before coding: skipped");
        return;
    }
    let started = Instant::now();
    let result = coder.code_unless_cancelled(&job.id, &job.text, &|| job.reply.is_closed());
    metrics.notes_coded.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(
        note = job.id,
        ms = started.elapsed().as_secs_f64() * 1e3,
        "coded"
    );
    let _ = job.reply.send(result);
}

/// The llm engine's thread: one continuous batch of up to `max_batch` chunks. Between two
/// decode steps, waiting notes join; finished ones are answered and leave; a note whose client
/// went away stops generating. It sleeps only while nothing is being coded.
fn continuous_loop(
    coder: &Coder,
    mut receiver: mpsc::Receiver<CodingJob>,
    max_batch: usize,
    metrics: &Metrics,
) {
    type Reply = oneshot::Sender<Result<NotePrediction, CodingError>>;
    let Some(mut batch) = coder.continuous::<(String, Reply)>(max_batch) else {
        return;
    };
    let answer = |(id, reply): (String, Reply), result: Result<NotePrediction, CodingError>| {
        metrics.notes_coded.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(note = id, ok = result.is_ok(), "coded");
        let _ = reply.send(result);
    };
    loop {
        while batch.has_room() {
            let gone = |job: &CodingJob| {
                let gone = job.reply.is_closed();
                if gone {
                    tracing::debug!(note = job.id, "client gone before coding: skipped");
                }
                gone
            };
            let job = match next_job(&mut receiver, batch.is_idle(), &metrics.queue_depth, gone) {
                Intake::Job(job) => job,
                Intake::NoneWaiting => break,
                Intake::Closed => return,
            };
            let CodingJob { id, text, reply } = job;
            if let Err(refused) = batch.admit(&id, &text, (id.clone(), reply)) {
                let (tag, error) = *refused;
                answer(tag, Err(error));
            }
        }
        for (tag, result) in batch.step(|(_, reply)| reply.is_closed()) {
            answer(tag, result);
        }
    }
}
