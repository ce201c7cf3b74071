//! Walking a trace's events in order, one frame at a time.

use std::collections::VecDeque;
use std::path::PathBuf;

use nyx_trace::{FrameKind, TraceReader};
use nyx_vmm::events::Event;

/// How many consumed events a divergence report shows.
const RECENT: usize = 12;

/// A mismatch noted where no error could be returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The guest wanted an event and the trace had none left.
    End,
    /// The guest wanted something other than the next event.
    Mismatch(String),
}

/// A place in the trace to come back to ([`Cursor::mark`]).
#[derive(Debug, Clone)]
pub struct CursorMark {
    frame: usize,
    taken_in_frame: usize,
    next_frame: usize,
    consumed: u64,
    position: u64,
    last_time: u64,
    recent: VecDeque<(u64, Event)>,
}

impl CursorMark {
    /// Events consumed at the mark.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }
}

/// The replay's place in the trace.
pub struct Cursor {
    reader: TraceReader,
    path: PathBuf,
    next_frame: usize,
    pending: VecDeque<Event>,
    /// The frame `pending` came from and how many of its events were taken.
    frame: usize,
    taken_in_frame: usize,
    consumed: u64,
    position: u64,
    recent: VecDeque<(u64, Event)>,
    failure: Option<Failure>,
    read_error: Option<nyx_trace::Error>,
    last_time: u64,
}

impl Cursor {
    /// A cursor at the start of `reader`'s events.
    pub fn new(reader: TraceReader, path: PathBuf) -> Self {
        Cursor {
            reader,
            path,
            next_frame: 0,
            pending: VecDeque::new(),
            frame: 0,
            taken_in_frame: 0,
            consumed: 0,
            position: 0,
            recent: VecDeque::new(),
            failure: None,
            read_error: None,
            last_time: 0,
        }
    }

    /// The trace's path.
    pub fn path(&self) -> &PathBuf {
        &self.path
    }

    fn fill(&mut self) {
        while self.pending.is_empty() && self.read_error.is_none() {
            let frames = self.reader.frames();
            let Some(idx) = (self.next_frame..frames.len()).find(|&i| frames[i].kind == FrameKind::Events) else {
                self.next_frame = frames.len();
                return;
            };
            self.next_frame = idx + 1;
            match nyx_vmm::events::read_events(&mut self.reader, idx) {
                Ok(events) => {
                    self.frame = idx;
                    self.taken_in_frame = 0;
                    self.pending.extend(events)
                }
                Err(e) => self.read_error = Some(e),
            }
        }
    }

    /// The next event, without consuming it.
    pub fn peek(&mut self) -> Option<&Event> {
        self.fill();
        self.pending.front()
    }

    /// The event after the next one (reading ahead into the next frame
    /// when the next event ends this one), without consuming anything.
    pub fn peek_second(&mut self) -> Option<Event> {
        self.fill();
        match self.pending.len() {
            0 => None,
            1 => {
                let frames = self.reader.frames();
                let idx = (self.next_frame..frames.len()).find(|&i| frames[i].kind == FrameKind::Events)?;
                nyx_vmm::events::read_events(&mut self.reader, idx)
                    .ok()
                    .and_then(|v| v.into_iter().next())
            }
            _ => self.pending.get(1).cloned(),
        }
    }

    /// Whether the event after the next one is a landing.
    pub fn second_is_landing(&mut self) -> bool {
        matches!(self.peek_second(), Some(Event::Landing(_)))
    }

    /// Consumes the next event.
    pub fn advance(&mut self) -> Option<Event> {
        self.fill();
        let e = self.pending.pop_front()?;
        self.taken_in_frame += 1;
        self.consumed += 1;
        match &e {
            Event::Exit(_) => self.position += 1,
            Event::Time(t) => self.last_time = *t,
            _ => {}
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((self.position, e.clone()));
        Some(e)
    }

    /// Consumes the next event if `pred` holds for it.
    pub fn take_if(&mut self, pred: impl FnOnce(&Event) -> bool) -> Option<Event> {
        if self.peek().is_some_and(pred) {
            self.advance()
        } else {
            None
        }
    }

    /// Whether every event has been consumed.
    pub fn at_end(&mut self) -> bool {
        self.peek().is_none()
    }

    /// Whether the recording's UART could still receive input here: the
    /// recorder kept polling (rather than ending the run) exactly then.
    pub fn has_more_input(&mut self) -> bool {
        matches!(self.peek(), Some(Event::Poll))
    }

    /// Guest-caused exits consumed so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Events consumed so far (of every kind): it changes only at the
    /// replay's sync points, so it orders them.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Where the cursor is, to come back to with [`Cursor::seek`].
    pub fn mark(&self) -> CursorMark {
        CursorMark {
            frame: self.frame,
            taken_in_frame: self.taken_in_frame,
            next_frame: self.next_frame,
            consumed: self.consumed,
            position: self.position,
            last_time: self.last_time,
            recent: self.recent.clone(),
        }
    }

    /// Puts the cursor back (or forward) to `mark`, re-reading the frame it
    /// was in. A frame that cannot be read is kept as the read error.
    pub fn seek(&mut self, mark: &CursorMark) {
        self.pending.clear();
        self.failure = None;
        self.frame = mark.frame;
        self.taken_in_frame = mark.taken_in_frame;
        self.next_frame = mark.next_frame;
        self.consumed = mark.consumed;
        self.position = mark.position;
        self.last_time = mark.last_time;
        self.recent = mark.recent.clone();
        if mark.next_frame > mark.frame {
            match nyx_vmm::events::read_events(&mut self.reader, mark.frame) {
                Ok(events) => self.pending.extend(events.into_iter().skip(mark.taken_in_frame)),
                Err(e) => self.read_error = Some(e),
            }
        }
    }

    /// The last time sample served.
    pub fn last_time(&self) -> u64 {
        self.last_time
    }

    /// The last events consumed, with their positions.
    pub fn recent(&self) -> impl Iterator<Item = &(u64, Event)> {
        self.recent.iter()
    }

    /// Notes a mismatch found where no error can be returned (clock, input).
    pub fn fail(&mut self, msg: &str) {
        if self.failure.is_none() {
            self.failure = Some(Failure::Mismatch(msg.to_string()));
        }
    }

    /// Notes that the guest wanted an event after the last one.
    pub fn fail_end(&mut self) {
        if self.failure.is_none() {
            self.failure = Some(Failure::End);
        }
    }

    /// The noted mismatch, if any.
    pub fn take_failure(&mut self) -> Option<Failure> {
        self.failure.take()
    }

    /// A frame that could not be read (checksum, decoding).
    pub fn take_read_error(&mut self) -> Option<nyx_trace::Error> {
        self.read_error.take()
    }
}
