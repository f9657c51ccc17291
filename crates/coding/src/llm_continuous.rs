//! The llm engine coding notes as they arrive, in one continuous batch: a note's chunks join
//! the batch between two decode steps (each prefilled alone, piece by piece between the
//! others' decode steps, then decoded with the rows already there) and leave it as soon as
//! they finish, so a short note is answered while a long one goes on, and a note arriving mid-way does not wait for the others to end. Each
//! chunk is generated under its own constrained decoding; a note is answered once all its
//! chunks are done, merged as [`LlmEngine::predict`] merges them.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use medcoder_infer::{ContinuousBatch, GenerateRequest, LogitsProcessor};

use crate::llm::{ChunkCodes, LlmEngine};
use crate::prediction::{CodeDescriber, NotePrediction};
use crate::CodingError;

/// A note in the batch: its chunks' codes as they finish.
struct NoteInFlight<T> {
    id: String,
    text: String,
    tag: T,
    chunks: Vec<Option<ChunkCodes>>,
    started: Instant,
}

/// One chunk's prompt, waiting for a row.
struct WaitingChunk {
    note: u64,
    chunk: usize,
    request: GenerateRequest,
    processor: Box<dyn LogitsProcessor>,
}

/// Notes coded in one continuous batch of at most `max_rows` chunks, each note tagged with
/// the caller's `T` (its reply channel, say).
pub struct ContinuousCoding<'e, T> {
    engine: &'e LlmEngine,
    batch: ContinuousBatch<'e, (u64, usize)>,
    max_rows: usize,
    notes: HashMap<u64, NoteInFlight<T>>,
    waiting: VecDeque<WaitingChunk>,
    next_note: u64,
}

impl<T> std::fmt::Debug for ContinuousCoding<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the notes' text: it is PHI.
        f.debug_struct("ContinuousCoding")
            .field("rows", &self.batch.len())
            .field("waiting", &self.waiting.len())
            .field("notes", &self.notes.len())
            .finish()
    }
}

/// A note's answer, with its tag.
pub type Answered<T> = (T, Result<NotePrediction, CodingError>);

/// A note refused before coding, with its tag and the reason.
pub type Refused<T> = Box<(T, CodingError)>;

impl LlmEngine {
    /// An empty continuous batch of at most `max_rows` chunks (at least one).
    pub fn continuous<T>(&self, max_rows: usize) -> ContinuousCoding<'_, T> {
        ContinuousCoding {
            engine: self,
            batch: ContinuousBatch::new(self.model()),
            max_rows: max_rows.max(1),
            notes: HashMap::new(),
            waiting: VecDeque::new(),
            next_note: 0,
        }
    }
}

impl<T> ContinuousCoding<'_, T> {
    /// Whether nothing is being coded or waiting.
    pub fn is_idle(&self) -> bool {
        self.notes.is_empty()
    }

    /// Whether another note's chunk would find a row at the next step.
    pub fn has_room(&self) -> bool {
        self.batch.len() + self.waiting.len() < self.max_rows
    }

    /// Notes being coded or waiting.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn notes(&self) -> usize {
        self.notes.len()
    }

    /// Takes a note in: its chunks wait for rows. A note that cannot be prompted is given back
    /// with the reason at once.
    pub fn admit(&mut self, id: &str, text: &str, tag: T) -> Result<(), Refused<T>> {
        let requests = self.engine.chunks(id, text).and_then(|chunks| {
            chunks
                .iter()
                .map(|chunk| self.engine.request(id, &chunk.text))
                .collect::<Result<Vec<_>, _>>()
        });
        let requests = match requests {
            Ok(requests) => requests,
            Err(error) => return Err(Box::new((tag, error))),
        };
        let note = self.next_note;
        self.next_note += 1;
        self.notes.insert(
            note,
            NoteInFlight {
                id: id.to_string(),
                text: text.to_string(),
                tag,
                chunks: vec![None; requests.len()],
                started: Instant::now(),
            },
        );
        for (chunk, (request, processor)) in requests.into_iter().enumerate() {
            self.waiting.push_back(WaitingChunk {
                note,
                chunk,
                request,
                processor,
            });
        }
        Ok(())
    }

    /// Waiting chunks join while rows are free, then every row decodes one token. Returns the
    /// notes finished since the last step: coded, failed, or cancelled (`cancelled` is asked
    /// of each note's tag at every token; its generation then stops).
    pub fn step(
        &mut self,
        describe: &CodeDescriber<'_>,
        cancelled: impl Fn(&T) -> bool,
    ) -> Vec<Answered<T>> {
        let mut answered = Vec::new();
        let Self {
            engine,
            batch,
            max_rows,
            notes,
            waiting,
            ..
        } = self;
        let keep = |notes: &HashMap<u64, NoteInFlight<T>>, (note, _): &(u64, usize)| {
            notes.get(note).is_some_and(|n| !cancelled(&n.tag))
        };
        while batch.len() < *max_rows {
            let Some(next) = waiting.pop_front() else {
                break;
            };
            if !keep(notes, &(next.note, next.chunk)) {
                fail(notes, next.note, None, &mut answered);
                continue;
            }
            if let Err(refused) =
                batch.join(next.request, vec![next.processor], (next.note, next.chunk))
            {
                let ((note, _), error) = *refused;
                fail(notes, note, Some(error.to_string()), &mut answered);
            }
        }
        match batch.step(|tag, _| keep(notes, tag)) {
            Ok(done) => {
                for (tag, generation) in done {
                    match generation {
                        Ok(generation) => {
                            finished(engine, notes, tag, &generation, &cancelled, &mut answered)
                        }
                        Err(error) => fail(notes, tag.0, Some(error.to_string()), &mut answered),
                    }
                }
            }
            Err(failure) => {
                let error = failure.error.to_string();
                for (note, _) in failure.abandoned {
                    fail(notes, note, Some(error.clone()), &mut answered);
                }
            }
        }
        // Notes whose every chunk is done.
        let complete: Vec<u64> = notes
            .iter()
            .filter(|(_, n)| n.chunks.iter().all(Option::is_some))
            .map(|(&key, _)| key)
            .collect();
        for key in complete {
            if let Some(note) = notes.remove(&key) {
                let per_chunk = note.chunks.into_iter().flatten().collect();
                let prediction =
                    engine.prediction(&note.id, &note.text, per_chunk, describe, note.started);
                answered.push((note.tag, Ok(prediction)));
            }
        }
        answered
    }
}

/// A chunk's generation is in: its codes, or the note cancelled.
fn finished<T>(
    engine: &LlmEngine,
    notes: &mut HashMap<u64, NoteInFlight<T>>,
    (note, chunk): (u64, usize),
    generation: &medcoder_infer::Generation,
    cancelled: &impl Fn(&T) -> bool,
    answered: &mut Vec<Answered<T>>,
) {
    let Some(n) = notes.get_mut(&note) else {
        return;
    };
    if cancelled(&n.tag) {
        fail(notes, note, None, answered);
        return;
    }
    n.chunks[chunk] = Some(engine.scored(generation));
}

/// The note leaves with an error (`None`: cancelled); its other chunks are dropped when they
/// come up.
fn fail<T>(
    notes: &mut HashMap<u64, NoteInFlight<T>>,
    note: u64,
    error: Option<String>,
    answered: &mut Vec<Answered<T>>,
) {
    if let Some(n) = notes.remove(&note) {
        let error = match error {
            Some(error) => CodingError::Invalid(format!("note {}: {error}", n.id)),
            None => CodingError::Cancelled(n.id.clone()),
        };
        answered.push((n.tag, Err(error)));
    }
}
